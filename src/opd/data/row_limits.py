"""Bounds on a data row, checked as rows are read, before any tokenizer sees them.

A tokenizer holds about 200 bytes of memory per byte of text it encodes (a fast BPE
tokenizer with offsets): one 50 MB row took 15 GB and the process. So a row is refused,
naming its file and line (or row), when

* its text is over `data.max_row_bytes` (default 1 MiB, about 250k tokens of English: far
  past any `data.max_prompt_tokens` + `data.max_completion_tokens`, which cut it anyway);
  a JSONL line over the bound is refused before it is parsed, and never read whole;
* it nests deeper than `MAX_DEPTH` lists/objects (a conversation is 3 deep; a row 200,000
  deep would otherwise end in a RecursionError somewhere in the stack);
* it holds text that is not valid Unicode (a lone surrogate such as "\\ud800", which JSON
  can spell but UTF-8 cannot), which no tokenizer accepts.
"""

from __future__ import annotations

from opd.config.sections import DEFAULT_MAX_ROW_BYTES

MAX_DEPTH = 32


def bounds_problem(row, max_bytes: int = DEFAULT_MAX_ROW_BYTES) -> str | None:
    """What makes `row` unsafe to tokenize, or None. Walks the row without recursion."""
    size, stack = 0, [(row, 0, "")]
    while stack:
        value, depth, where = stack.pop()
        if depth > MAX_DEPTH:
            return f"nests lists/objects deeper than {MAX_DEPTH} levels"
        if isinstance(value, str):
            try:
                size += len(value.encode("utf-8"))
            except UnicodeEncodeError as err:
                bad = value[err.start : err.end].encode("unicode_escape").decode("ascii")
                return (
                    f"{where or 'a value'} holds {bad}, which is not valid Unicode (a lone "
                    "surrogate); fix the text at its source"
                )
            if size > max_bytes:
                return _too_big(size, max_bytes)
        elif isinstance(value, dict):
            for key, item in value.items():
                if isinstance(key, str):
                    stack.append((key, depth + 1, f"a column name in {where or 'the row'}"))
                stack.append((item, depth + 1, f"column {key!r}" if not depth else where))
        elif isinstance(value, list | tuple):
            stack.extend((item, depth + 1, where) for item in value)
        else:
            size += 8  # a number, a bool, None
    return _too_big(size, max_bytes) if size > max_bytes else None


def _too_big(size: int, max_bytes: int) -> str:
    return (
        f"holds more than {max_bytes} bytes of text (data.max_row_bytes; at least {size}); "
        "split it, or raise data.max_row_bytes if it is meant to be this long"
    )


def line_limit(max_bytes: int) -> int:
    """Bytes a JSONL line of a row within `max_bytes` of text may take: JSON escapes
    (`\\u00e9`, `\\n`) spell one byte of text in up to 6."""
    return 6 * max_bytes + (1 << 16)
