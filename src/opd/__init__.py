"""opd: distil a teacher language model into a student, offline or on-policy, in one loop."""

__version__ = "0.1.0"

# Imported on first use, so that `opd --help` and `opd config` start without torch.
_LAZY = {"TrainConfig": "opd.config.parse", "load_config": "opd.config.parse", "train": "opd.run.loop"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'opd' has no attribute {name!r}")


__all__ = ["TrainConfig", "__version__", "load_config", "train"]
