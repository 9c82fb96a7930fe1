"""Datasets: loading rows from files, checking every row before a model loads, order.

A row is a prompt/completion pair (`{"prompt": str, "completion": str}`, optionally an
answer and other columns) or a conversation (`{"messages": [{"role", "content"}, ...]}`
with `data.prompt_field=messages`, TRL's conversational format). Turning rows into token
ids is `opd.data.encoding`.
"""

from __future__ import annotations

import json
import logging
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from opd.config.parse import TrainConfig
from opd.config.sections import metric_reads_answer
from opd.data.cache_format import check_cache_tokenizer, load_cache_rows, looks_like_cache
from opd.data.encoding import ROLES, Encoder
from opd.data.privileged import privileged_prompt
from opd.data.row_limits import DEFAULT_MAX_ROW_BYTES, MAX_DEPTH, bounds_problem, line_limit
from opd.modeling.vocab import describe_sampling, end_token_ids

log = logging.getLogger("opd")


def load_rows(
    path: str | Path, split: str = "train", max_row_bytes: int = DEFAULT_MAX_ROW_BYTES
) -> list[dict]:
    """Rows from a JSONL/JSON file, a Parquet file, a `datasets.save_to_disk` directory
    (a `DatasetDict` one gives its `split`), or an opd teacher cache directory (rows then
    carry their stored token ids). Each row is bounded (`opd.data.row_limits`: size, nesting,
    valid Unicode) before anything tokenizes it; a bad one is refused naming file and row."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset {path} does not exist")
    if looks_like_cache(path):  # an `opd generate`/`opd score` cache, or what is left of one
        return load_cache_rows(path)  # token ids, checked by the cache reader
    if path.is_dir():
        rows = _load_datasets_dir(path, split)
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    elif path.suffix == ".json":
        rows = _json_loads(_utf8(path.read_bytes(), path), str(path))
        if not isinstance(rows, list):
            raise ValueError(f"{path}: a .json dataset must be a list of objects")
    else:
        return _load_jsonl(path, max_row_bytes)
    for i, row in enumerate(rows):
        problem = bounds_problem(row, max_row_bytes)
        if problem:
            raise ValueError(f"{path}: row {i}: {problem}")
    return rows


def _json_loads(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: invalid JSON ({err.msg})") from None
    except RecursionError:  # the C parser recurses per level
        raise ValueError(
            f"{where}: nests lists/objects deeper than Python's parser can follow (rows may "
            f"nest {MAX_DEPTH} levels)"
        ) from None


def _load_jsonl(path: Path, max_row_bytes: int) -> list[dict]:
    """One object per line; a line over the bound is refused without reading it whole."""
    rows, limit = [], line_limit(max_row_bytes)
    with path.open("rb") as fh:
        lineno = 0
        while raw := fh.readline(limit + 1):
            lineno += 1
            if len(raw) > limit and not raw.endswith(b"\n"):
                raise ValueError(
                    f"{path}:{lineno}: the line is over {limit} bytes, more than a row within "
                    f"data.max_row_bytes={max_row_bytes} can take (the rest was not read); "
                    "split the row, or raise data.max_row_bytes"
                )
            line = _utf8(raw, path, lineno)
            if not line.strip():
                continue
            row = _json_loads(line, f"{path}:{lineno}")
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: each line must be a JSON object")
            problem = bounds_problem(row, max_row_bytes)
            if problem:
                raise ValueError(f"{path}:{lineno}: {problem}")
            rows.append(row)
    return rows


def _utf8(raw: bytes, path: Path, lineno: int | None = None) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        if lineno is None:  # a whole file: say which line the bad byte is on
            lineno = raw[: err.start].count(b"\n") + 1
        raise ValueError(
            f"{path}:{lineno}: not UTF-8 (byte 0x{raw[err.start]:02x}); re-encode the file "
            "as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None


def _load_datasets_dir(path: Path, split: str) -> list[dict]:
    try:
        from datasets import Dataset, DatasetDict, load_from_disk
    except ImportError as err:  # pragma: no cover - depends on extras
        raise ImportError("reading a datasets directory needs `pip install opd[data]`") from err
    loaded = load_from_disk(str(path))
    if isinstance(loaded, DatasetDict):
        if split not in loaded:
            raise ValueError(
                f"{path} is a DatasetDict without split {split!r}; its splits: "
                f"{', '.join(loaded)} (choose one with data.split / data.eval_split)"
            )
        loaded = loaded[split]
    if not isinstance(loaded, Dataset):
        raise ValueError(f"{path}: expected a datasets Dataset or DatasetDict directory")
    return loaded.to_list()


@dataclass
class RowSpec:
    """What every row of one file must hold (checked by `check_rows`)."""

    prompt_field: str = "prompt"
    completion_field: str | None = None  # None: completions are not used
    answer_field: str | None = None  # None: no metric or reward reads an answer
    extra_fields: tuple[str, ...] = ()  # e.g. the self teacher's privileged-context columns


def check_rows(rows: list[dict], spec: RowSpec, where: str) -> None:
    """Raise a ValueError naming `where`, the row and the column of the first bad row."""
    for i, row in enumerate(rows):
        problem = row_problem(row, spec)
        if problem:
            raise ValueError(f"{where}: row {i}: {problem}")


def row_problem(row: dict, spec: RowSpec) -> str | None:
    """What is wrong with one row, or None."""
    if not isinstance(row, dict):
        return f"expected an object with columns, got {type(row).__name__}"
    cols = f"(columns: {sorted(row)})"
    if "prompt_ids" in row and "completion_ids" in row:
        return None  # an opd cache row: token ids, already checked by the cache reader
    prompt = row.get(spec.prompt_field)
    if spec.prompt_field not in row:
        return f"no column {spec.prompt_field!r} {cols}"
    if isinstance(prompt, list):
        problem = _messages_problem(prompt, spec.prompt_field)
        if problem:
            return problem
    elif not isinstance(prompt, str) or not prompt:
        return f"column {spec.prompt_field!r} must be a non-empty string or a list of messages, got {prompt!r}"
    if spec.completion_field is not None and not _ends_with_assistant(prompt):
        c = row.get(spec.completion_field)
        if spec.completion_field not in row:
            return f"no column {spec.completion_field!r} and the conversation does not end with an assistant turn {cols}"
        if isinstance(c, list):  # TRL's conversational completion: [{"role": "assistant", ...}]
            if len(c) != 1 or _messages_problem(c, spec.completion_field):
                return f"column {spec.completion_field!r} must be a string or one assistant message, got {c!r}"
            if c[0]["role"] != "assistant":
                return f"column {spec.completion_field!r} holds a {c[0]['role']!r} message, not an assistant one"
        elif not isinstance(c, str):
            return f"column {spec.completion_field!r} must be a string, got {c!r}"
    if spec.answer_field is not None:
        a = row.get(spec.answer_field)
        if spec.answer_field not in row:
            return f"no column {spec.answer_field!r} (the metric/reward compares to it) {cols}"
        if isinstance(a, bool) or not isinstance(a, str | int | float):
            return f"column {spec.answer_field!r} must be a string or number, got {a!r}"
    for name in spec.extra_fields:
        if name not in row or row[name] is None:
            return f"no value in column {name!r} {cols}"
    return None


def _messages_problem(messages: list, field: str) -> str | None:
    if not messages:
        return f"column {field!r} is an empty list of messages"
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            return f"column {field!r} message {j} needs a 'role' in {ROLES}, got {m!r}"
        if not isinstance(m.get("content"), str):
            return f"column {field!r} message {j} needs string 'content', got {m.get('content')!r}"
    return None


def _ends_with_assistant(prompt) -> bool:
    return isinstance(prompt, list) and bool(prompt) and prompt[-1].get("role") == "assistant"


def require_fields(rows: list[dict], fields: list[str], where: str) -> None:
    """Only presence (for callers that read arbitrary columns)."""
    for i, row in enumerate(rows):
        missing = [f for f in fields if f not in row]
        if missing:
            raise ValueError(
                f"{where}: row {i} has no column {missing[0]!r} (columns: {sorted(row)})"
            )


@dataclass
class RunData:
    encoder: Encoder
    train_rows: list[dict]  # each with `prompt_ids` (and `completion_ids` when used)
    eval_rows: list[dict]  # each with `prompt_ids`


def load_run_data(
    config: TrainConfig,
    tokenizer,
    read_train: list[dict] | None = None,
    read_eval: list[dict] | None = None,
    retokenize=None,
) -> RunData:
    """Load, check and encode the train and eval rows: every row is checked (fields, types,
    lengths) and cut/dropped rows are counted and logged, before any model loads.

    `retokenize(rows, encoder) -> rows`: for an opd cache made with another tokenizer, its
    rows in the student's tokens (`opd.teachers.cross_tokenizer.cache`); without it such a
    cache is refused."""
    d = config.data
    if not d.train:
        raise ValueError("data.train is required: it provides the prompts (and completions)")
    encoder = Encoder(tokenizer, d)
    path, extra = config.student.path, config.sampling.eos_token_ids
    encoder.end_ids = end_token_ids(path, tokenizer, encoder.stop_id, extra)
    log.info("%s", describe_sampling(path, tokenizer, encoder.end_ids, config.sampling))
    if retokenize is None:
        check_cache_tokenizer(d.train, tokenizer)  # no-op unless it is an opd cache
    with_completion = config.source.lmbda < 1.0 and config.source.off_policy == "dataset"
    rewarded = bool(config.reward.function) and metric_reads_answer(config.reward.function)
    extra, privileged = (), None
    if config.teacher.kind == "self":
        template = config.teacher.privileged_template
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f}
        extra = tuple(sorted(fields - {"prompt"}))
        privileged = lambda row: privileged_prompt(template, row, encoder)  # noqa: E731
    spec = RowSpec(
        d.prompt_field,
        d.completion_field if with_completion else None,
        d.answer_field if rewarded else None,
        extra,
    )
    # `read_train` / `read_eval`: the rows `opd.run.preflight` already read (not read twice).
    rows = read_train if read_train is not None else load_rows(d.train, d.split, d.max_row_bytes)
    if retokenize is not None:
        rows = retokenize(rows, encoder)
    check_rows(rows, spec, d.train)
    train_rows, report = encoder.encode_rows(
        rows, with_completion=with_completion, where=d.train, extra_prompt=privileged
    )
    _log_report(report, d.train, d)
    if not with_completion:
        _log_unused_completions(config, encoder, rows)
    eval_rows = []
    if d.eval:
        rows = (
            read_eval
            if read_eval is not None
            else load_rows(d.eval, d.eval_split, d.max_row_bytes)
        )
        rows = rows[: config.eval_size]
        answer = d.answer_field if metric_reads_answer(config.eval_metric) else None
        check_rows(rows, RowSpec(d.prompt_field, None, answer), d.eval)
        eval_rows, report = encoder.encode_rows(rows, with_completion=False, where=d.eval)
        _log_report(report, d.eval, d)
    return RunData(encoder, train_rows, eval_rows)


def _log_unused_completions(config: TrainConfig, encoder: Encoder, rows: list[dict]) -> None:
    """Rows that carry a completion this run does not train on: say which sequences it trains
    on instead, and why (`preset=seqkd` on chat data samples the teacher; the rows' own
    assistant turns are then unused)."""
    d, source = config.data, config.source
    column = d.completion_field
    turns = sum(encoder.ends_with_assistant(row) for row in rows)
    n = turns or sum(row.get(column) not in (None, "") for row in rows)
    if not n:
        return
    what = "their last assistant turn" if turns else f"column {column!r}"
    if source.lmbda >= 1.0:
        trains_on = "the student's own samples (source.lmbda=1: on-policy)"
    else:
        trains_on = (
            f"the teacher's samples for each prompt (source.off_policy={source.off_policy}"
            + (f", with the student's own at source.lmbda={source.lmbda}" if source.lmbda else "")
            + ")"
        )
    log.info(
        "data.train=%s: %d of %d rows carry a completion (%s) that this run does not train "
        "on: it trains on %s; set source.off_policy=dataset (source.lmbda < 1) to train on "
        "the rows' completions",
        d.train,
        n,
        len(rows),
        what,
        trains_on,
    )


def _log_report(report, where: str, config) -> None:
    changed = report.prompts_cut or report.dropped or report.completions_cut
    (log.warning if changed else log.info)("%s", report.describe(where, config))


class PromptOrder:
    """Deterministic shuffled order: the k-th prompt depends only on (seed, k).

    Resuming at position k therefore continues exactly where the run stopped.
    """

    def __init__(self, n: int, seed: int):
        if n == 0:
            raise ValueError("the training set is empty")
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, None

    def index(self, k: int) -> int:
        epoch, offset = divmod(k, self.n)
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._epoch = epoch
        return int(self._perm[offset])

    def take(self, start: int, count: int) -> list[int]:
        return [self.index(k) for k in range(start, start + count)]
