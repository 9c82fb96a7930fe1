"""Checks on one config value, shared by the sections (`opd.config.sections`): a choice among
allowed values, a range (a float also finite: no setting means inf or nan), a `str.format`
template with named fields, a regular expression, a metric name."""

from __future__ import annotations

import functools
import math
import re
import string
import typing
from typing import Literal


def _one_of(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(
            f"{key}={value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}"
        )


def _in_range(key: str, value, lo=None, hi=None, *, lo_open=False) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{key}={value!r} must be a finite number")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ValueError(f"{key}={value!r} must be {'>' if lo_open else '>='} {lo}")
    if hi is not None and value > hi:
        raise ValueError(f"{key}={value!r} must be <= {hi}")


@functools.cache
def _literal_fields(cls) -> dict[str, tuple]:
    """Field name -> allowed values, for fields typed `Literal[...]` or `list[Literal[...]]`."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        if typing.get_origin(hint) is list:
            hint = typing.get_args(hint)[0]
        if typing.get_origin(hint) is Literal:
            out[name] = typing.get_args(hint)
    return out


def _check_choices(obj) -> None:
    """Every `Literal` field holds one of its values; the message names the key."""
    for name, allowed in _literal_fields(type(obj)).items():
        value = getattr(obj, name)
        for item in value if isinstance(value, list) else [value]:
            _one_of(name, item, allowed)


def _check_template(key: str, template: str) -> None:
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as err:
        raise ValueError(f"{key}={template!r} is not a valid template: {err}") from None
    if any(not f or not f.isidentifier() for f in fields):
        raise ValueError(f"{key}={template!r}: use named fields such as {{prompt}} or {{answer}}")


METRICS = ("exact_match", "last_number", "boxed", "regex")  # else "module:function"


def metric_reads_answer(name: str) -> bool:
    """Built-in kinds compare to the row's answer column (checked at load)."""
    return name in METRICS


def _check_metric(key: str, name: str, pattern: str, pattern_key: str) -> None:
    if name not in METRICS and ":" not in name:
        raise ValueError(
            f"{key}={name!r}: use one of {', '.join(METRICS)} or a callable 'module:function'"
        )
    if name == "regex" and not pattern:
        raise ValueError(f"{key}='regex' needs {pattern_key} (a regular expression)")
    _check_regex(pattern_key, pattern)


def _check_regex(key: str, pattern: str) -> None:
    """A pattern compiles, whether or not a metric reads it."""
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{key}={pattern!r} is not a regex: {err}") from None
