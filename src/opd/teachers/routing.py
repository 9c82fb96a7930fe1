"""Several teachers in one run: each row scored by the teacher its route names.

    teachers:
      math: {kind: remote, urls: [http://a:8000, http://b:8000]}
      code: {kind: local, path: Qwen/Qwen3-8B}
    routing: {key: domain, map: {algebra: math, python: code}, default: math}
    # or a fixed mix:  routing: {mix: {math: 0.7, code: 0.3}}

`RoutedTeacher` is one `Teacher` to the objectives and the loop: `score(batch, ...)` splits
the batch's rows by route, lets each teacher score its rows (remote ones concurrently,
through their `submit`), and puts the answers back in row order, so every loss and
estimator works unchanged. A route is a data column's value mapped to a teacher name
(`routing.key`, `routing.map`, `routing.default`; a value that names no teacher is refused
with the known ones), or a fixed mix: each row's teacher is drawn from the weights by a
hash of (seed, the row's tokens), so the draw does not depend on anything a resume could
lose and a resumed run routes every row as the uninterrupted one did.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable

import torch

from opd.config.parse import TrainConfig
from opd.config.teachers import teacher_configs
from opd.data.batch import SequenceBatch
from opd.teachers.base import TeacherScores

Route = Callable[[SequenceBatch, int], str]


def column_route(key: str, mapping: dict[str, str], default: str, names) -> Route:
    """Row r's teacher: `mapping[str(row[key])]`, else `default`; else refused."""

    def route(batch: SequenceBatch, r: int) -> str:
        row = batch.rows[r] if r < len(batch.rows) else {}
        value = row.get(key)
        name = mapping.get(str(value), default) if value is not None else default
        if not name:
            known = ", ".join(f"{v!r} -> {t}" for v, t in mapping.items())
            raise ValueError(
                f"a row's routing.key={key!r} value {value!r} names no teacher (routing.map: "
                f"{known}; teachers: {', '.join(names)}); add it to routing.map or set "
                "routing.default"
            )
        return name

    return route


def mix_route(weights: dict[str, float], seed: int) -> Route:
    """Row r's teacher drawn from `weights` by a hash of (seed, the row's tokens)."""
    total = sum(weights.values())
    bounds, at = [], 0.0
    for name, w in weights.items():
        at += w / total
        bounds.append((at, name))

    def route(batch: SequenceBatch, r: int) -> str:
        ids = batch.input_ids[r][batch.attention_mask[r].bool()].tolist()
        digest = hashlib.blake2b(f"{seed}:{ids}".encode(), digest_size=8).digest()
        u = int.from_bytes(digest, "little") / 2**64
        return next((name for bound, name in bounds if u < bound), bounds[-1][1])

    return route


def subset(batch: SequenceBatch, rows: list[int]) -> SequenceBatch:
    """The batch's `rows`, same prompt and completion widths (so scores align column-wise)."""
    index = torch.tensor(rows, dtype=torch.long, device=batch.input_ids.device)
    sampled = batch.sampler_logprobs
    return SequenceBatch(
        input_ids=batch.input_ids.index_select(0, index),
        attention_mask=batch.attention_mask.index_select(0, index),
        completion_mask=batch.completion_mask.index_select(0, index),
        prompt_width=batch.prompt_width,
        source=batch.source,
        sampler_logprobs=None if sampled is None else sampled.index_select(0, index),
        rows=[batch.rows[r] for r in rows] if batch.rows else [],
    )


class RoutedTeacher:
    """`teachers` by name behind one `score`; `route(batch, r)` names row r's teacher."""

    def __init__(self, teachers: dict, route: Route):
        self.teachers, self.route = teachers, route
        self._stats = _empty(teachers)

    @property
    def overlaps(self) -> bool:
        return all(getattr(t, "overlaps", False) for t in self.teachers.values())

    def routes(self, batch: SequenceBatch) -> dict[str, list[int]]:
        groups: dict[str, list[int]] = {}
        for r in range(batch.size):
            groups.setdefault(self.route(batch, r), []).append(r)
        return groups

    def score(
        self, batch: SequenceBatch, need: str, topk: int = 0, temperature: float = 1.0
    ) -> TeacherScores:
        kw = {"temperature": temperature} if temperature != 1.0 else {}
        parts, started = {}, {}
        groups = self.routes(batch)
        for name, rows in groups.items():  # remote teachers first, all at once
            teacher, sub = self.teachers[name], subset(batch, rows)
            started[name] = time.perf_counter()
            if hasattr(teacher, "submit") and not kw:
                parts[name] = (sub, teacher.submit(sub, need, topk))
        for name, rows in groups.items():
            if name not in parts:
                sub = subset(batch, rows)
                parts[name] = (sub, self.teachers[name].score(sub, need, topk, **kw))
                self._stats[name][2] += time.perf_counter() - started[name]
        out, done = None, []
        for name, (sub, result) in parts.items():
            scores = result if isinstance(result, TeacherScores) else result.result()
            done.append((name, scores))
            if not isinstance(result, TeacherScores):
                self._stats[name][2] += time.perf_counter() - started[name]
            stats = self._stats[name]
            stats[0] += len(groups[name])
            stats[1] += sub.num_target_tokens()
            out = _scatter(out, scores, groups[name], batch.size, need)
        if any(p[1].topk_tail_logmass is None for p in done):
            out.topk_tail_logmass = None  # the loss infers every row's tail alike
        out.tokens_scored = batch.num_target_tokens()
        out.routes = groups
        return out

    def add_divergence(self, routes: dict[str, list[int]], per_row, tokens_per_row) -> None:
        """The loss's divergence of one micro-batch, summed by row (`[B]` each), credited
        to the teacher that scored each row (`opd.objectives.base.report_divergence`)."""
        for name, rows in routes.items():
            index = torch.tensor(rows, dtype=torch.long)
            self._stats[name][3] += float(per_row.index_select(0, index).sum())
            self._stats[name][4] += int(tokens_per_row.index_select(0, index).sum())

    def step_record(self, sum_all: Callable[[list], list] | None = None) -> dict:
        """Per teacher since the last call: rows, scored tokens, their share, the loss's
        divergence over its rows (its token-weighted mean over teachers is the step's
        `divergence`), seconds spent scoring, failovers (a teacher with replicas). Summed
        over ranks by `sum_all` (a multi-process run's). A teacher without rows this step has
        share 0 and divergence null: never NaN."""
        names = list(self._stats)
        values = []
        for name in names:  # failovers since the last call, of a teacher with replicas
            sub = getattr(self.teachers[name], "step_record", dict)()
            values += [*self._stats[name], sub.get("teacher_failovers", 0)]
        if sum_all is not None:
            values = sum_all(values)
        per = {name: values[i * 6 : (i + 1) * 6] for i, name in enumerate(names)}
        total = sum(v[1] for v in per.values())
        record = {}
        for name, (rows, tokens, seconds, div_sum, div_tokens, failovers) in per.items():
            record |= {
                f"teacher_{name}_rows": rows,
                f"teacher_{name}_tokens": tokens,
                f"teacher_{name}_share": tokens / total if total else 0.0,
                f"teacher_{name}_divergence": div_sum / div_tokens if div_tokens else None,
                f"teacher_{name}_seconds": seconds,
                f"teacher_{name}_failovers": failovers,
            }
        self._stats = _empty(self.teachers)
        return record

    def checkpoint_state(self) -> dict:
        """The teachers manifest (resume checks it) and each teacher's own state."""
        return {
            "teachers": {name: manifest(t) for name, t in self.teachers.items()},
            "states": {
                name: t.checkpoint_state()
                for name, t in self.teachers.items()
                if hasattr(t, "checkpoint_state")
            },
        }

    def load_checkpoint_state(self, state: dict) -> None:
        saved = state.get("teachers")
        current = {name: manifest(t) for name, t in self.teachers.items()}
        if saved is not None and saved != current:
            raise ValueError(
                f"resume: the checkpoint was trained with teachers {saved}, this run has "
                f"{current}; resuming would not continue the same run"
            )
        for name, sub in state.get("states", {}).items():
            if hasattr(self.teachers.get(name), "load_checkpoint_state"):
                self.teachers[name].load_checkpoint_state(sub)

    def close(self) -> None:
        for teacher in self.teachers.values():
            if hasattr(teacher, "close"):
                teacher.close()


def build_routed_teacher(config: TrainConfig, build: Callable[[TrainConfig], object]):
    """`teachers:` with `routing:`; `build(config)` makes one teacher (the registry's)."""
    teachers = {name: build(c) for name, c in teacher_configs(config).items()}
    routing = config.routing
    if routing.key:
        route = column_route(routing.key, routing.map, routing.default, list(teachers))
    else:
        route = mix_route(routing.mix, config.seed)
    return RoutedTeacher(teachers, route)


def _empty(teachers) -> dict[str, list]:
    """Per teacher: rows, tokens, seconds, divergence sum, its tokens."""
    return {name: [0, 0, 0.0, 0.0, 0] for name in teachers}


def manifest(teacher) -> dict:
    """What a checkpoint records of one teacher: its class and the model it serves."""
    model = getattr(teacher, "model", None)
    name = (
        model
        if isinstance(model, str)
        else getattr(getattr(model, "config", None), "_name_or_path", "")
    )
    return {"kind": type(teacher).__name__, "model": name or ""}


def _scatter(
    out: TeacherScores | None, part: TeacherScores, rows: list[int], size: int, need: str
):
    """Put `part` (scores of `rows`) into `out`, a `size`-row `TeacherScores` made on first use."""
    index = torch.tensor(rows, dtype=torch.long)
    if out is None:
        out = TeacherScores()
    fields = ("logits", "token_logprobs", "topk_ids", "topk_logprobs", "topk_tail_logmass")
    for field in (*fields, "aligned", "span_end"):
        value = getattr(part, field)
        if value is None:
            continue
        full = getattr(out, field)
        if full is None:
            full = _filled(field, (size, *value.shape[1:]), value, need)
            setattr(out, field, full)
        full.index_copy_(0, index.to(value.device), value)
    return out


def _filled(field: str, shape, like: torch.Tensor, need: str) -> torch.Tensor:
    """Rows no teacher wrote yet: finite zeros (every row is written by exactly one
    teacher). A teacher with another tokenizer (opd.teachers.cross_tokenizer) says which
    positions it scored (`aligned`) and where spans end (`span_end`); the rows of one that
    does not keep these defaults: every position scored, each token its own span for
    `token` scores, no span term (-1) for kd scores (`TeacherScores`)."""
    if field == "aligned":
        return torch.ones(shape, dtype=torch.bool, device=like.device)
    if field == "span_end":
        if need != "token":
            return torch.full(shape, -1, dtype=torch.long, device=like.device)
        return torch.arange(shape[1], device=like.device).expand(shape).clone()
    return torch.zeros(shape, dtype=like.dtype, device=like.device)
