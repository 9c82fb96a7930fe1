"""The privileged prompt of self-distillation (OPSD/SDFT): the row put through
`teacher.privileged_template`. Text only, so the data room renders it when rows are encoded and
the self teacher (`opd.teachers.self_teacher`) reads the same ids."""

from __future__ import annotations


def render_privileged(template: str, row: dict, prompt_field: str = "prompt") -> str:
    """The teacher's prompt text: `{prompt}` is the row's prompt, other fields its columns."""
    return _format(template, {**row, "prompt": row[prompt_field]})


def privileged_prompt(template: str, row: dict, encoder):
    """The teacher's prompt for a row, as `encoder.prompt_ids` takes it: the template's text;
    for a conversation, the conversation with its last user turn's text put through the
    template (`{prompt}` is that text), so system prompt and earlier turns stay."""
    prompt = encoder.row_prompt(row)
    if not isinstance(prompt, list):
        return _format(template, {**row, "prompt": prompt})
    last_user = max((i for i, m in enumerate(prompt) if m["role"] == "user"), default=None)
    if last_user is None:
        raise ValueError("teacher.kind=self needs a user turn in each conversation")
    turns = [dict(m) for m in prompt]
    turns[last_user]["content"] = _format(template, {**row, "prompt": prompt[last_user]["content"]})
    return turns


def _format(template: str, fields: dict) -> str:
    try:
        return template.format_map(fields)
    except KeyError as err:
        raise ValueError(
            f"teacher.privileged_template needs column {err.args[0]!r} in every row "
            f"(this row has: {sorted(k for k in fields if k != 'prompt')})"
        ) from None
