"""Per-sequence task metrics and rewards: `fn(completion_text, row) -> float`.

The same built-in kinds serve `eval_metric` and `reward.function`:

* `exact_match`: the final answer, normalized, equals the row's answer, normalized. The
  final answer is the text after the last `####` (GSM8K) or `#`, else the last `\\boxed{...}`,
  else the whole completion: "the answer is 8, not 7" does not match "7" (nor "8").
* `last_number`: the completion's last number equals the answer's by value (the lenient
  reading of free-form math answers: "so the answer is 8." matches "8", and so does "7,
  no, 8"); a completion without a number scores 0.
* `boxed`: the content of the last `\\boxed{...}` (nested braces allowed), normalized; a
  completion without one scores 0.
* `regex`: the first group (or the whole match) of the pattern's last match, normalized.

Normalization: case, surrounding whitespace, punctuation and `$` are ignored, runs of
spaces are one, and numbers compare by value (`1,000` = `1000`, `42.0` = `42`).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

from opd.config.sections import METRICS as BUILT_IN

Metric = Callable[[str, dict], float]

_NUMBER = re.compile(r"[-+]?(\d{1,3}(,\d{3})+|\d+)?(\.\d+)?")


def normalize_answer(text) -> str:
    s = re.sub(r"\s+", " ", str(text)).strip().lower()
    s = s.strip(" .,;:!?\"'`$").strip()
    if s and _NUMBER.fullmatch(s) and any(c.isdigit() for c in s):
        value = float(s.replace(",", ""))
        s = str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)
    return s


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`), braces balanced."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    if not starts:
        return None
    depth, start = 1, starts[-1]
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    return None  # unclosed


def _answer(row: dict, answer_field: str) -> str:
    if answer_field not in row:
        raise KeyError(
            f"the metric needs column {answer_field!r} in the row (columns: {sorted(row)})"
        )
    return normalize_answer(row[answer_field])


def exact_match(completion: str, row: dict, answer_field: str = "answer") -> float:
    answer = _answer(row, answer_field)
    for marker in ("####", "#"):  # GSM8K's "#### 42", the demo task's "#42"
        if marker in completion:
            return float(normalize_answer(completion.rsplit(marker, 1)[1]) == answer)
    boxed = last_boxed(completion)
    if boxed is not None:
        return float(normalize_answer(boxed) == answer)
    return float(bool(answer) and normalize_answer(completion) == answer)


def last_number(completion: str, row: dict, answer_field: str = "answer") -> float:
    answer = _answer(row, answer_field)
    numbers = [m.group(0) for m in _NUMBER.finditer(completion) if any(c.isdigit() for c in m.group(0))]
    return float(bool(numbers) and normalize_answer(numbers[-1]) == answer)


def boxed_match(completion: str, row: dict, answer_field: str = "answer") -> float:
    answer = _answer(row, answer_field)
    boxed = last_boxed(completion)
    return float(boxed is not None and normalize_answer(boxed) == answer)


def regex_match(completion: str, row: dict, pattern: str, answer_field: str = "answer") -> float:
    """1.0 when `pattern`'s first group (or whole match) of its last match equals the answer."""
    answer = _answer(row, answer_field)
    found = list(re.finditer(pattern, completion))
    if not found:
        return 0.0
    last = found[-1]
    text = last.group(1) if last.re.groups else last.group(0)
    return float(normalize_answer(text or "") == answer)


def resolve_metric(
    name: str, answer_field: str = "answer", key: str = "eval_metric", pattern: str = ""
) -> Metric:
    """A built-in kind (`BUILT_IN`) or a callable named as 'package.module:function'."""
    if name == "exact_match":
        return lambda completion, row: exact_match(completion, row, answer_field)
    if name == "last_number":
        return lambda completion, row: last_number(completion, row, answer_field)
    if name == "boxed":
        return lambda completion, row: boxed_match(completion, row, answer_field)
    if name == "regex":
        if not pattern:
            pattern_key = "reward.pattern" if key.startswith("reward") else "eval_pattern"
            raise ValueError(f"{key}='regex' needs {pattern_key}")
        compiled = re.compile(pattern)
        return lambda completion, row: regex_match(completion, row, compiled, answer_field)
    if ":" not in name:
        raise ValueError(f"{key}={name!r}: use one of {', '.join(BUILT_IN)} or 'module:function'")
    module_name, attr = name.split(":", 1)
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{key}={name!r} cannot be imported: {err}") from None
    if not callable(fn):
        raise ValueError(f"{key}={name!r} is not callable")
    return fn


def resolve_reward(function: str, pattern: str = "", answer_field: str = "answer") -> Metric:
    """The `reward.function` of a config; every reward is per sequence."""
    return resolve_metric(function, answer_field, key="reward.function", pattern=pattern)

