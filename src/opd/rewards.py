"""Per-sequence task metrics and rewards: `fn(completion_text, row) -> float`."""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

Metric = Callable[[str, dict], float]


def extract_final_answer(text: str) -> str | None:
    """The answer after the last '####' (GSM8K style) or '#', else the last word."""
    for marker in ("####", "#"):
        if marker in text:
            tail = text.rsplit(marker, 1)[1].strip()
            return tail.split()[0] if tail.split() else None
    words = text.split()
    return words[-1] if words else None


def exact_match(completion: str, row: dict, answer_field: str = "answer") -> float:
    if answer_field not in row:
        raise KeyError(
            f"exact_match needs column {answer_field!r} in the row (columns: {sorted(row)})"
        )
    return float(extract_final_answer(completion) == str(row[answer_field]).strip())


def regex_match(completion: str, row: dict, pattern: str, answer_field: str = "answer") -> float:
    """1.0 when `pattern`'s first group (or whole match) equals the row's answer."""
    found = re.findall(pattern, completion)
    if not found:
        return 0.0
    last = found[-1]
    last = last[0] if isinstance(last, tuple) else last
    return float(last.strip() == str(row[answer_field]).strip())


def resolve_metric(name: str, answer_field: str = "answer", key: str = "eval_metric") -> Metric:
    """'exact_match' or a callable named as 'package.module:function'."""
    if name == "exact_match":
        return lambda completion, row: exact_match(completion, row, answer_field)
    if ":" not in name:
        raise ValueError(f"{key}={name!r}: use 'exact_match' or 'module:function'")
    module_name, attr = name.split(":", 1)
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{key}={name!r} cannot be imported: {err}") from None
    if not callable(fn):
        raise ValueError(f"{key}={name!r} is not callable")
    return fn


def resolve_reward(function: str, pattern: str = "", answer_field: str = "answer") -> Metric:
    """The `reward.function` of a config: 'exact_match', 'regex' (with `pattern`) or
    'module:function'; every reward is per sequence, `fn(completion_text, row) -> float`."""
    if function == "regex":
        if not pattern:
            raise ValueError("reward.function='regex' needs reward.pattern")
        return lambda completion, row: regex_match(completion, row, pattern, answer_field)
    if function not in ("exact_match",) and ":" not in function:
        raise ValueError(
            f"reward.function={function!r}: use 'exact_match', 'regex' or 'module:function'"
        )
    return resolve_metric(function, answer_field, key="reward.function")
