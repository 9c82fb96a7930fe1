"""What a student and teacher must share, and which tokens end a completion.

Token-level distillation compares two distributions id by id, so what must agree is what
each id means over the student's vocabulary, and the special tokens the chat template
writes. Which token a checkpoint *calls* its EOS is a role, not a meaning: an instruct
teacher (`eos_token=<|im_end|>`) and its base student (`<|endoftext|>`) share every id, and
are accepted with the differing roles logged.

Completions end at any of: the ids of the student's `generation_config.json`
(`eos_token_id`, an int or a list: Qwen lists `<|im_end|>` and `<|endoftext|>`), the
tokenizer's EOS, the token the chat template ends an assistant turn with (Llama 3's
`<|eot_id|>`), and `sampling.eos_token_ids`.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("opd")

ROLES = ("bos_token", "eos_token", "pad_token", "unk_token")
SAMPLING_KEYS = ("do_sample", "temperature", "top_p", "top_k")
_PROBE = [
    {"role": "system", "content": "s"},
    {"role": "user", "content": "u"},
    {"role": "assistant", "content": "a"},
]


def _template_ids(tok) -> list[int]:
    if getattr(tok, "chat_template", None) is None:
        return []
    try:
        text = tok.apply_chat_template(_PROBE, tokenize=False, add_generation_prompt=False)
    except Exception:  # a template that rejects a system turn
        text = tok.apply_chat_template(_PROBE[1:], tokenize=False, add_generation_prompt=False)
    return tok(text, add_special_tokens=False).input_ids


def vocabulary_differences(student_tok, teacher_tok) -> list[str]:
    """'id N: student X, teacher Y' for student ids the teacher reads as another token,
    and for special tokens the student's chat template emits that the teacher lacks."""
    s_by_id = {i: t for t, i in student_tok.get_vocab().items()}
    t_vocab = teacher_tok.get_vocab()
    t_by_id = {i: t for t, i in t_vocab.items()}
    out = [
        f"id {i}: student {tok!r}, teacher {t_by_id.get(i)!r}"
        for i, tok in sorted(s_by_id.items())
        if t_by_id.get(i) != tok
    ]
    for i in sorted(set(_template_ids(student_tok))):
        token = s_by_id.get(i)
        if token is not None and t_vocab.get(token) != i:
            out.append(
                f"chat-template token {token!r}: student id {i}, teacher id {t_vocab.get(token)}"
            )
    return out


def role_differences(student_tok, teacher_tok) -> list[str]:
    out = []
    for role in ROLES:
        s, t = getattr(student_tok, role, None), getattr(teacher_tok, role, None)
        if str(s) != str(t):
            out.append(f"{role}: student {s!r}, teacher {t!r}")
    return out


def check_same_tokenizer(student_tok, teacher_tok, teacher_name: str) -> None:
    """Refuse a teacher whose ids mean other tokens (naming them); log differing roles."""
    differ = vocabulary_differences(student_tok, teacher_tok)
    if differ:
        shown = "; ".join(differ[:5]) + (f"; and {len(differ) - 5} more" if len(differ) > 5 else "")
        raise ValueError(
            f"teacher {teacher_name!r} reads {len(differ)} of the student's token ids as other "
            f"tokens ({shown}). Token-level distillation needs a shared vocabulary; use SeqKD "
            "on decoded text instead."
        )
    roles = role_differences(student_tok, teacher_tok)
    if roles:
        log.warning(
            "teacher %r shares the student's vocabulary and chat-template tokens; only "
            "special-token roles differ (%s). Proceeding: prompts and completions use the "
            "student's tokenizer and stop tokens.",
            teacher_name,
            "; ".join(roles),
        )


def generation_settings(model_path: str) -> dict:
    """The values a checkpoint's generation_config.json sets (not the library defaults)."""
    try:
        from transformers import GenerationConfig

        if (
            not (Path(model_path) / "generation_config.json").is_file()
            and Path(model_path).exists()
        ):
            return {}
        return GenerationConfig.from_pretrained(model_path).to_diff_dict()
    except (OSError, ValueError):  # no generation config (or none reachable)
        return {}


def end_token_ids(model_path: str, tokenizer, turn_end_id: int | None, extra=()) -> list[int]:
    """Every id that ends a completion (module doc), in a fixed order, each once."""
    gen = generation_settings(model_path).get("eos_token_id")
    gen = [gen] if isinstance(gen, int) else list(gen or [])
    ids = [*gen, tokenizer.eos_token_id, turn_end_id, *extra]
    return list(dict.fromkeys(i for i in ids if i is not None))


def describe_sampling(model_path: str, tokenizer, end_ids: list[int], sampling) -> str:
    """One log line: the stop ids, and generation_config sampling defaults not used."""
    names = ", ".join(f"{i} {tokenizer.convert_ids_to_tokens(i)!r}" for i in end_ids)
    line = f"sampling stops on token ids [{names}]"
    settings = generation_settings(model_path)
    ignored = {k: settings[k] for k in SAMPLING_KEYS if k in settings}
    if ignored:
        ours = f"temperature={sampling.temperature}, top_p={sampling.top_p}, top_k={sampling.top_k}"
        line += (
            f"; {model_path}/generation_config.json sets "
            + ", ".join(f"{k}={v}" for k, v in ignored.items())
            + f", overridden by sampling.* ({ours}): set those keys to use its values"
        )
    return line
