"""Rows to token ids the way the student sees them: chat templates, conversations, cuts.

* A prompt is a string or a conversation (a list of `{"role", "content"}` messages). With a
  chat template it is rendered with `add_generation_prompt=True`; a string becomes one user
  turn after `data.system_prompt`; a conversation keeps its own system turn, if any.
* A conversation that ends with an assistant turn is a prompt (everything before that
  turn) plus a completion (that turn's text), as TRL reads conversational data.
* A completion is supervised up to and including the token that ends an assistant turn:
  the token the chat template writes after the turn's text (`<|im_end|>`, `<|eot_id|>`),
  else the tokenizer's EOS. A completion cut at `data.max_completion_tokens` gets no such
  token: appending one would teach the student to stop mid-answer.
* A prompt longer than `data.max_prompt_tokens` keeps its end (where the question is) only
  if what frames it survives: leading special tokens (BOS) and `data.system_prompt` stay.
  A rendered chat prompt cannot be cut without losing its header: such rows are dropped.
Rows are encoded once, at start, and the counts of cut and dropped rows are reported.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from opd.config.parse import DataConfig

log = logging.getLogger("opd")

ROLES = ("system", "user", "assistant", "tool")
_PROBE = "opd-turn-probe-7f3a"  # assistant text whose rendering shows what ends a turn


def is_conversation(prompt) -> bool:
    return isinstance(prompt, list)


def special_ids(tokenizer) -> set[int]:
    """Ids of special tokens: the named ones and added tokens marked special (Llama 3's
    `<|eot_id|>` is only the latter)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_ids) | {i for i, t in added.items() if t.special}


@dataclass
class EncodeReport:
    rows: int = 0
    prompts_cut: int = 0
    dropped: int = 0
    completions_cut: int = 0

    def describe(self, where: str, config: DataConfig) -> str:
        parts = [f"{where}: {self.rows - self.dropped} of {self.rows} rows used"]
        if self.prompts_cut:
            parts.append(
                f"{self.prompts_cut} prompts longer than data.max_prompt_tokens="
                f"{config.max_prompt_tokens} cut from the left (BOS and system prompt kept)"
            )
        if self.dropped:
            parts.append(
                f"{self.dropped} rows dropped: their chat-template prompt is longer than "
                f"data.max_prompt_tokens={config.max_prompt_tokens} (a cut would remove the "
                "template's header)"
            )
        if self.completions_cut:
            parts.append(
                f"{self.completions_cut} completions cut at data.max_completion_tokens="
                f"{config.max_completion_tokens} (their cut end is not supervised as a stop)"
            )
        return "; ".join(parts)


class Encoder:
    """Turns prompts and completions into token ids the way the student will see them."""

    def __init__(self, tokenizer, config: DataConfig):
        self.tokenizer = tokenizer
        self.config = config
        has_template = getattr(tokenizer, "chat_template", None) is not None
        if config.chat_template == "on" and not has_template:
            raise ValueError("data.chat_template='on' but the tokenizer has no chat template")
        self.use_chat = config.chat_template == "on" or (
            config.chat_template == "auto" and has_template
        )
        self.stop_id = self._turn_end_id() if self.use_chat else tokenizer.eos_token_id
        # Every id that ends a sampled completion; `opd.data.rows.load_run_data` adds those of the
        # student's generation_config and sampling.eos_token_ids.
        self.end_ids = list(dict.fromkeys([self.stop_id, tokenizer.eos_token_id]))

    def _turn_end_id(self) -> int:
        """The special token the chat template writes right after an assistant turn's text."""
        tok = self.tokenizer
        turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
        try:
            text = tok.apply_chat_template(turns, tokenize=False)
        except Exception:  # a template that refuses this shape: fall back to EOS
            return tok.eos_token_id
        tail = text.split(_PROBE, 1)[1] if _PROBE in text else ""
        ids = tok(tail, add_special_tokens=False).input_ids if tail.strip() else []
        if ids and ids[0] in special_ids(tok):
            return ids[0]
        return tok.eos_token_id

    # -- what a row holds ------------------------------------------------------------------

    def ends_with_assistant(self, row: dict) -> bool:
        """The row is a conversation whose last turn is the assistant's (its completion)."""
        prompt = row[self.config.prompt_field]
        return is_conversation(prompt) and bool(prompt) and prompt[-1]["role"] == "assistant"

    def row_prompt(self, row: dict):
        """The prompt part of a row: its string, or its conversation before a final
        assistant turn."""
        prompt = row[self.config.prompt_field]
        return prompt[:-1] if self.ends_with_assistant(row) else prompt

    def row_completion(self, row: dict) -> str:
        prompt = row[self.config.prompt_field]
        if self.ends_with_assistant(row):
            return prompt[-1]["content"]
        completion = row[self.config.completion_field]
        return completion[0]["content"] if isinstance(completion, list) else completion

    # -- prompts -----------------------------------------------------------------------------

    def fit_prompt(self, prompt) -> tuple[list[int] | None, bool]:
        """(ids, cut): the prompt within `max_prompt_tokens`, or None when it cannot be cut."""
        limit = self.config.max_prompt_tokens
        if self.use_chat:
            ids = self._chat_ids(prompt)
            return (ids, False) if len(ids) <= limit else (None, False)
        if is_conversation(prompt):
            raise ValueError(
                "a conversation (list of messages) needs a chat template, but "
                + (
                    "data.chat_template=off"
                    if self.config.chat_template == "off"
                    else "the tokenizer has none"
                )
            )
        tok, system = self.tokenizer, self.config.system_prompt
        ids = tok(system + prompt).input_ids
        if len(ids) <= limit:
            return ids, False
        specials = special_ids(tok)
        lead = next((i for i, t in enumerate(ids) if t not in specials), len(ids))
        keep = lead
        if system:
            system_ids = tok(system, add_special_tokens=False).input_ids
            if ids[lead : lead + len(system_ids)] != system_ids:
                return None, False  # the system prompt merged into the text: no clean cut
            keep += len(system_ids)
        room = limit - keep
        if room < 1:
            return None, False
        return ids[:keep] + ids[-room:], True

    def _chat_ids(self, prompt) -> list[int]:
        if is_conversation(prompt):
            messages = [dict(m) for m in prompt]
        else:
            messages = [{"role": "user", "content": prompt}]
        if self.config.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.config.system_prompt})
        text = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def prompt_ids(self, prompt) -> list[int]:
        """The prompt's ids; a prompt that cannot be fitted is an error here (rows loaded by
        `encode_rows` were checked already)."""
        ids, _ = self.fit_prompt(prompt)
        if ids is None:
            raise ValueError(
                f"prompt of {len(self._chat_ids(prompt)) if self.use_chat else '?'} tokens "
                f"exceeds data.max_prompt_tokens={self.config.max_prompt_tokens} and cannot "
                "be cut without losing its template"
            )
        return ids

    def row_prompt_ids(self, row: dict) -> list[int]:
        return row["prompt_ids"] if "prompt_ids" in row else self.prompt_ids(self.row_prompt(row))

    # -- completions -------------------------------------------------------------------------

    def fit_completion(self, text: str) -> tuple[list[int], bool]:
        """(ids, cut): the text's ids + the turn-ending token, or the first
        `max_completion_tokens` ids without it when the text is longer."""
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        limit = self.config.max_completion_tokens
        if len(ids) + 1 <= limit:
            return [*ids, self.stop_id], False
        return ids[:limit], True

    def completion_ids(self, completion: str) -> list[int]:
        return self.fit_completion(completion)[0]

    # -- whole files -------------------------------------------------------------------------

    def encode_rows(
        self,
        rows: list[dict],
        *,
        with_completion: bool,
        where: str,
        extra_prompt: Callable[[dict], object] | None = None,
    ) -> tuple[list[dict], EncodeReport]:
        """Rows with `prompt_ids` (and `completion_ids`) added, rows that cannot be fitted
        dropped, and the counts. `extra_prompt(row)`: another prompt the run will encode
        from the row (the self teacher's privileged one), which must fit as well."""
        report, out = EncodeReport(rows=len(rows)), []
        limit = self.config.max_completion_tokens
        for i, row in enumerate(rows):
            if "prompt_ids" in row and "completion_ids" in row:  # an opd cache row
                ids = list(row["completion_ids"])
                if len(ids) > limit:
                    report.completions_cut += 1
                    row = {**row, "completion_ids": ids[:limit]}
                out.append(row)
                continue
            try:
                prompt_ids, cut = self.fit_prompt(self.row_prompt(row))
                fits_extra = extra_prompt is None or self.fit_prompt(extra_prompt(row))[0]
            except ValueError as err:
                raise ValueError(f"{where}: row {i}: {err}") from None
            if prompt_ids is None or not fits_extra:
                report.dropped += 1
                continue
            report.prompts_cut += cut
            encoded = {**row, "prompt_ids": prompt_ids}
            if with_completion:
                encoded["completion_ids"], cut = self.fit_completion(self.row_completion(row))
                report.completions_cut += cut
            out.append(encoded)
        if rows and not out:
            raise ValueError(report.describe(where, self.config) + ": no row is left")
        return out, report
