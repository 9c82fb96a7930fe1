"""The data section checked before any model loads: files exist, rows load, and every row has
the columns the run will read (prompts, completions the objective needs, the self-teacher's
template fields, the metric's answers)."""

from __future__ import annotations

import string
from pathlib import Path

from opd.config.checks import dataset_batches, uses_teacher
from opd.config.parse import TrainConfig
from opd.config.sections import metric_reads_answer
from opd.data.rows import load_rows, require_fields


def template_fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def check_columns(rows: list[dict], where: str, fields: list[str]) -> None:

    if not rows:
        raise ValueError(f"{where} has no rows")
    require_fields(rows, fields, where)


def train_fields(config: TrainConfig, rows: list[dict] | None = None) -> list[str]:
    data, fields = config.data, [config.data.prompt_field]
    # A `messages` row carries its completion as the last assistant turn (opd.data.rows).
    chat = bool(rows) and isinstance(rows[0].get(data.prompt_field), list)
    if dataset_batches(config) and not chat:
        fields.append(data.completion_field)
    if config.teacher.kind == "self" and uses_teacher(config):
        fields += [f for f in template_fields(config.teacher.privileged_template) if f != "prompt"]
    if config.reward.function and metric_reads_answer(config.reward.function):
        fields.append(data.answer_field)
    return list(dict.fromkeys(fields))


def _needs_answers(metric: str) -> bool:
    return metric_reads_answer(metric)


def check_data(config: TrainConfig) -> tuple[list[dict], list[dict]]:
    """`(train rows, eval rows)`, read once and checked for the columns the run reads."""
    if not config.data.train:
        raise ValueError("data.train is required: it provides the prompts (and completions)")
    for key in ("train", "eval"):
        path = getattr(config.data, key)
        if path and not Path(path).exists():
            raise FileNotFoundError(
                f"data.{key}={path}: no such file or directory (JSONL, JSON, Parquet, a "
                "`datasets` directory or an opd cache)"
            )
    limit = config.data.max_row_bytes  # each row bounded before any tokenizer sees it
    train_rows = load_rows(config.data.train, config.data.split, limit)
    fields = train_fields(config, train_rows)
    check_columns(train_rows, f"data.train={config.data.train}", fields)
    eval_rows = []
    if config.data.eval:
        eval_rows = load_rows(config.data.eval, config.data.eval_split, limit)[: config.eval_size]
        fields = [config.data.prompt_field]
        if _needs_answers(config.eval_metric):
            fields.append(config.data.answer_field)
        check_columns(eval_rows, f"data.eval={config.data.eval}", fields)
    return train_rows, eval_rows
