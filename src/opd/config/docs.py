"""Every config key with its type, default, allowed values and doc: `opd config`.

The docs are the `Attributes:` blocks of the config classes' docstrings (Google style, as
`help()` and API docs show them); the allowed values are the fields' `Literal` types. Both
live next to the field in opd.config.parse, so the listing cannot drift from the code.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from dataclasses import dataclass
from typing import Literal

from opd.config.checks import PRESET_DEFINES
from opd.config.parse import TrainConfig
from opd.config.presets import PRESET_NOTES, PRESETS


@dataclass(frozen=True)
class KeyDoc:
    key: str  # dotted, e.g. "loss.beta"
    type: str  # "float", "list[str]", ...
    default: object
    choices: tuple  # allowed values; () for any value of the type
    doc: str


def attribute_docs(cls) -> dict[str, str]:
    """`name -> one-line doc` from the `Attributes:` block of a class docstring."""
    docs, name, inside = {}, None, False
    for line in inspect.cleandoc(cls.__doc__ or "").splitlines():
        if line.strip() == "Attributes:":
            inside = True
            continue
        if not inside:
            continue
        if line and not line.startswith(" "):  # the next section (or prose) starts
            break
        match = re.match(r"^ {4}(\w+): (.*)$", line)
        if match:
            name = match.group(1)
            docs[name] = match.group(2).strip()
        elif name and line.strip():
            docs[name] += " " + line.strip()
    return docs


def _type_name(hint) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "str"
    if origin is list:
        return f"list[{_type_name(typing.get_args(hint)[0])}]"
    return getattr(hint, "__name__", str(hint))


def _choices(hint) -> tuple:
    if typing.get_origin(hint) is list:
        hint = typing.get_args(hint)[0]
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else ()


def key_docs(cls=TrainConfig, prefix: str = "") -> list[KeyDoc]:
    """Every leaf key of `cls` (sections expanded in field order)."""
    hints, docs, out = typing.get_type_hints(cls), attribute_docs(cls), []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out += key_docs(hint, f"{prefix}{f.name}.")
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        choices = _choices(hint)
        if cls is TrainConfig and f.name == "preset":
            choices = ("", *PRESETS)
        out.append(
            KeyDoc(prefix + f.name, _type_name(hint), default, choices, docs.get(f.name, ""))
        )
    return out


def section_docs(cls=TrainConfig) -> dict[str, str]:
    """`section name -> the first line of its class docstring` (e.g. loss -> ...)."""
    hints = typing.get_type_hints(cls)
    return {
        f.name: inspect.cleandoc(hints[f.name].__doc__ or "").splitlines()[0]
        for f in dataclasses.fields(cls)
        if dataclasses.is_dataclass(hints[f.name])
    }


def _show(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value) if value == "" or value != value.strip() or "\n" in value else value
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)


def format_preset(name: str, width: int = 100) -> str:
    """`opd config PRESET`: what the preset sets, and which of those define the method."""
    defines = {f"{section}.{key}" for section, key in PRESET_DEFINES.get(name, ())}
    lines = [f"preset={name}:"]
    lines += _wrap(PRESET_NOTES.get(name, ""), width, "  ")
    lines.append("sets:")
    for section, values in PRESETS[name].items():
        for key, value in values.items():
            dotted = f"{section}.{key}"
            mark = "  (defines the method: a config setting another value is refused)"
            lines.append(f"  {dotted}={_show(value)}{mark if dotted in defines else ''}")
    lines += _wrap(
        "Every other key keeps its default, and the keys above without the mark can be "
        f"overridden (preset={name} KEY=VALUE); `opd config KEY` describes a key.",
        width,
        "",
    )
    return "\n".join(lines)


def format_keys(query: str = "", width: int = 100) -> str:
    """The listing of `opd config [QUERY]`: one block per section, one line (wrapped) per key;
    a query keeps the keys of that section, or the keys whose name contains it; a preset's
    name shows what that preset sets."""
    if query in PRESETS:
        return format_preset(query, width)
    sections, lines, current = section_docs(), [], None
    docs = key_docs()
    if query:
        docs = [d for d in docs if d.key.startswith(query + ".") or query in d.key]
        if not docs:
            raise ValueError(f"no config key matches {query!r}; `opd config` lists them all")
    for doc in docs:
        section = doc.key.split(".")[0] if "." in doc.key else ""
        if section != current:
            current = section
            title = f"{section}.*: {sections[section]}" if section else "top level"
            lines += ["", title]
        head = f"  {doc.key} ({doc.type}, default {_show(doc.default)})"
        if doc.choices:
            head += " one of: " + ", ".join(_show(c) for c in doc.choices)
        lines.append(head)
        lines += _wrap(doc.doc, width, "      ")
    if not query:
        lines += ["", f"presets: {', '.join(PRESETS)} (`opd config PRESET` shows what one sets)"]
    return "\n".join(lines).lstrip("\n")


def _wrap(text: str, width: int, indent: str) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width, initial_indent=indent, subsequent_indent=indent)
