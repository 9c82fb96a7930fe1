"""Tiny real Hugging Face tokenizers and models, built locally (no hub access needed).

The tests and `opd demo` use these: a character-level `PreTrainedTokenizerFast` and small
random Llama- or Qwen-style `AutoModelForCausalLM`s, saved with `save_pretrained` and
loaded back with `from_pretrained` exactly like real checkpoints.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
DEFAULT_CHARS = (
    string.digits + string.ascii_lowercase + string.ascii_uppercase + " +-*/=()<>.,:;?!_#\n"
)


def build_char_tokenizer(
    chars: str = DEFAULT_CHARS, *, chat: bool = False
) -> PreTrainedTokenizerFast:
    """One token per character, plus pad/eos/unk (and role tokens when `chat`)."""
    specials = [PAD, EOS, UNK, *(ROLE_TOKENS if chat else ())]
    unique = list(dict.fromkeys(chars))
    vocab = {tok: i for i, tok in enumerate(specials + unique)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, eos_token=EOS, unk_token=UNK
    )
    if chat:
        tok.add_special_tokens({"additional_special_tokens": list(ROLE_TOKENS)})
        tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_causal_lm(
    vocab_size: int,
    *,
    family: str = "llama",
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    kv_heads: int | None = None,
    intermediate: int | None = None,
    max_positions: int = 512,
    pad_token_id: int = 0,
    eos_token_id: int = 1,
    seed: int = 0,
    tie_embeddings: bool = False,
):
    """A randomly initialised `AutoModelForCausalLM` of the given family ('llama', 'qwen2', 'qwen3')."""
    config = AutoConfig.for_model(
        family,
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        intermediate_size=intermediate or 4 * hidden,
        max_position_embeddings=max_positions,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=tie_embeddings,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def save_tiny_pair(
    root: str | Path,
    *,
    family: str = "llama",
    chat: bool = False,
    teacher_kw: dict | None = None,
    student_kw: dict | None = None,
) -> tuple[Path, Path]:
    """Write a tokenizer plus a teacher and a smaller student under `root`; return both dirs."""
    root = Path(root)
    tok = build_char_tokenizer(chat=chat)
    dirs = []
    for name, kw, seed in (
        ("teacher", teacher_kw or {"hidden": 48, "layers": 2}, 1),
        ("student", student_kw or {}, 2),
    ):
        model = tiny_causal_lm(
            len(tok),
            family=family,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            seed=seed,
            **kw,
        )
        out = root / name
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
        dirs.append(out)
    return dirs[0], dirs[1]
