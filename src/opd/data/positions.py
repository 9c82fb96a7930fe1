"""No sequence longer than the models have positions for, checked before any model loads.

Past `max_position_embeddings` a model does not fail cleanly: rotary models compute outside
the range they were trained on (garbage log-probs, no error), learned position tables fail
with an index error deep inside a forward, minutes into a run. The limit is in the model's
config.json, and the encoded rows give every sequence's length, so `check_positions` runs
after encoding and before loading.
"""

from __future__ import annotations

import json
from pathlib import Path

from opd.config.checks import uses_teacher
from opd.config.parse import TrainConfig


def model_positions(path: str) -> int | None:
    """`max_position_embeddings` in a local model's config.json (None: a hub id, or absent)."""
    config_file = Path(path).expanduser() / "config.json"
    if not config_file.is_file():
        return None
    value = json.loads(config_file.read_text()).get("max_position_embeddings")
    return value if isinstance(value, int) and value > 0 else None


def _parts(row: dict, new_tokens: int) -> list[tuple[str, int]]:
    """What one sequence of this row is made of: the prompt and its longest continuation."""
    parts = [("prompt", len(row["prompt_ids"]))]
    tails = [("completion", len(row["completion_ids"]))] if "completion_ids" in row else []
    if new_tokens:
        tails.append(("sampling.max_new_tokens", new_tokens))
    return parts + ([max(tails, key=lambda p: p[1])] if tails else [])


def check_positions(
    config: TrainConfig,
    train_rows: list[dict],
    eval_rows: list[dict],
    read_train: list[dict] = (),
    read_eval: list[dict] = (),
) -> None:
    """Every train row's prompt plus its longest continuation (its dataset completion, or
    `sampling.max_new_tokens` when the run samples) and every eval prompt plus
    `sampling.max_new_tokens`, against the student's and a local teacher's limit.
    `read_*`: the rows as read, to name the row at fault by its index in the file."""
    t = config.teacher
    paths = {"student.path": config.student.path}
    if uses_teacher(config) and t.kind in ("local", "vllm") and t.path:
        paths["teacher.path"] = t.path
    limits = {key: n for key, path in paths.items() if (n := model_positions(path))}
    if not limits:
        return
    key, limit = min(limits.items(), key=lambda kv: kv[1])
    sampled = config.source.lmbda > 0 or config.source.off_policy == "teacher"
    new = config.sampling.max_new_tokens
    d = config.data
    for name, rows, read, new_tokens in (
        ("train", train_rows, read_train, new if sampled else 0),
        ("eval", eval_rows, read_eval, new),
    ):
        for row in rows:
            parts = _parts(row, new_tokens)
            total = sum(n for _, n in parts)
            if total <= limit:
                continue
            prompt = row.get(d.prompt_field)
            index = next((i for i, r in enumerate(read) if r.get(d.prompt_field) is prompt), None)
            which = "a row" if index is None else f"row {index}"
            needs = " + ".join(f"{what} {n}" for what, n in parts)
            raise ValueError(
                f"data.{name}={getattr(d, name)}: {which} needs {total} positions ({needs}) but "
                f"{key}={paths[key]} has {limit} (max_position_embeddings in its config.json); "
                "lower data.max_prompt_tokens (prompts are cut from the left), "
                "data.max_completion_tokens or sampling.max_new_tokens"
            )
