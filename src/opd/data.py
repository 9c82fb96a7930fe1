"""Prompt/completion datasets: loading, chat templates, tokenization, deterministic order."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from opd.config import DataConfig


def load_rows(path: str | Path) -> list[dict]:
    """Rows from a JSONL/JSON file, a Parquet file, a `datasets.save_to_disk` directory,
    or an opd teacher cache directory (rows then carry their stored token ids)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset {path} does not exist")
    from opd.cache.format import load_cache_rows, looks_like_cache

    if looks_like_cache(path):  # an `opd generate`/`opd score` cache, or what is left of one
        return load_cache_rows(path)
    if path.is_dir():
        try:
            from datasets import load_from_disk
        except ImportError as err:  # pragma: no cover - depends on extras
            raise ImportError("reading a datasets directory needs `pip install opd[data]`") from err
        return [dict(r) for r in load_from_disk(str(path))]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        if not isinstance(data, list):
            raise ValueError(f"{path}: a .json dataset must be a list of objects")
        return data
    rows = []
    with path.open() as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: each line must be a JSON object")
            rows.append(row)
    return rows


def require_fields(rows: list[dict], fields: list[str], where: str) -> None:
    for i, row in enumerate(rows):
        missing = [f for f in fields if f not in row]
        if missing:
            raise ValueError(
                f"{where}: row {i} has no column {missing[0]!r} (columns: {sorted(row)})"
            )


class Encoder:
    """Turns prompt and completion text into token ids the way the student will see them."""

    def __init__(self, tokenizer, config: DataConfig):
        self.tokenizer = tokenizer
        self.config = config
        has_template = getattr(tokenizer, "chat_template", None) is not None
        if config.chat_template == "on" and not has_template:
            raise ValueError("data.chat_template='on' but the tokenizer has no chat template")
        self.use_chat = config.chat_template == "on" or (
            config.chat_template == "auto" and has_template
        )

    def prompt_ids(self, prompt: str) -> list[int]:
        if self.use_chat:
            messages = [{"role": "user", "content": prompt}]
            if self.config.system_prompt:
                messages.insert(0, {"role": "system", "content": self.config.system_prompt})
            text = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
            ids = self.tokenizer(text, add_special_tokens=False).input_ids
        else:
            ids = self.tokenizer(self.config.system_prompt + prompt).input_ids
        # Keep the end of an over-long prompt: that is where the question and the
        # generation prompt are.
        return ids[-self.config.max_prompt_tokens :]

    def completion_ids(self, completion: str) -> list[int]:
        """Completion text + EOS (supervised: the student must learn to stop)."""
        ids = self.tokenizer(completion, add_special_tokens=False).input_ids
        ids = ids[: self.config.max_completion_tokens - 1]
        return [*ids, self.tokenizer.eos_token_id]


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
