"""Teachers: one `score` interface over local, self, remote, cached and vLLM implementations,
plus what serves and stores a teacher outside the loop (`server/`: `opd serve`; `cache/`:
`opd generate` / `opd score` / `opd inspect`).

Names are imported on first use: `opd.teachers.checks` runs in preflight, before torch is
imported, and must not pull the torch-backed teachers in with the package."""

_LAZY = {
    "Teacher": "opd.teachers.base",
    "TeacherScores": "opd.teachers.base",
    "check_need": "opd.teachers.base",
    "scores_from_logits": "opd.teachers.base",
    "CachedTeacher": "opd.teachers.cached",
    "LocalTeacher": "opd.teachers.local",
    "SelfTeacher": "opd.teachers.self_teacher",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'opd.teachers' has no attribute {name!r}")


__all__ = sorted(_LAZY)
