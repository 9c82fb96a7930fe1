"""Loading students and teachers, checking they share a tokenizer, and scoring completions."""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd.modeling.quiet import transformers_bars_off

if TYPE_CHECKING:  # annotations only: modeling sits below the data room
    from opd.data.batch import SequenceBatch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_tokenizer(path: str):
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except OSError as err:  # not found locally or on the hub (offline, private, misspelt)
        raise ValueError(f"cannot load a tokenizer from {path!r}: {err}") from None
    if tok.pad_token_id is None:
        # Many causal LMs ship without a pad token; padding positions are always masked,
        # so reusing EOS is safe (the EOS we supervise is marked by completion_mask).
        tok.pad_token = tok.eos_token
    return tok


@contextmanager
def every_rank_reads_weights():
    """`from_pretrained` reads the real weights in every process of a multi-process run.

    Under `accelerate launch --use_fsdp` (FSDP_CPU_RAM_EFFICIENT_LOADING is true by default)
    transformers 5.16-5.19 fill every parameter with zeros on ranks other than 0, expecting
    FSDP to broadcast rank 0's weights when it wraps the model; 5.20 and later read them on
    every rank. A replicated teacher, or one opd shards itself (`teacher.shard`), is never
    broadcast, so under 5.19 it scored with zero weights on rank 1 (the FSDP run drifted
    from the one-process run by 6e-3). The student's broadcast, when accelerate does it,
    then copies equal weights."""
    key = "FSDP_CPU_RAM_EFFICIENT_LOADING"
    before = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def load_causal_lm(path: str, *, dtype: str = "float32", device: torch.device | str = "cpu"):
    if not (Path(path).exists() or "/" in path):
        raise FileNotFoundError(f"model path {path!r} does not exist (and is not a hub id)")
    # A local load needs no download bar, and transformers' per-load bar garbles opd's own.
    bars_off = transformers_bars_off() if Path(path).is_dir() else nullcontext()
    try:
        with bars_off, every_rank_reads_weights():
            model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    except OSError as err:
        raise ValueError(f"cannot load a model from {path!r}: {err}") from None
    return model.to(device)


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the vocabulary and special tokens: equal iff token ids mean the same text."""
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def shared_vocab_size(tokenizer, *models) -> int:
    """Rows of the LM head that correspond to real tokens, checked against every model.

    Checkpoints often pad the embedding matrix beyond the tokenizer (Qwen: 151,936 rows for
    the small models, 152,064 for the large ones, 151,669 real tokens); the padded rows are
    never real tokens, so every model's logits are cut to the tokenizer's length.
    """
    vocab = len(tokenizer)
    for model in models:
        rows = model.get_output_embeddings().weight.shape[0]
        if rows < vocab:
            name = getattr(model.config, "_name_or_path", type(model).__name__)
            raise ValueError(
                f"model {name!r} has {rows} output rows but the tokenizer has {vocab} tokens"
            )
    return vocab


def completion_logits(model, batch: SequenceBatch, vocab_size: int) -> torch.Tensor:
    """`[B, L, V]` next-token logits for the completion columns only.

    `logits_to_keep` asks the model for the last L+1 positions, so the LM head never runs on
    prompt positions; the last one (after the final token) is dropped.
    """
    L = batch.completion_width
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids(),
        logits_to_keep=L + 1,
        use_cache=False,
    )
    return out.logits[:, :-1, :vocab_size]


def token_logprobs(
    logits_BLV: torch.Tensor, ids_BL: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """log softmax(logits / temperature) at the given ids, in float32, `[B, L]`."""
    logits = logits_BLV.float() / temperature
    return logits.gather(-1, ids_BL.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


# Models whose logits are more than `hidden @ W.T + b` (soft-capping, scaling) must take
# the plain path: the fused loss recomputes logits from the head weight alone.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def supports_fused_head(model) -> bool:
    config = model.config
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return False
    return isinstance(model.get_output_embeddings(), torch.nn.Linear)


def completion_hidden(model, batch: SequenceBatch) -> torch.Tensor:
    """`[B, L, H]` final hidden states that predict the completion columns (no LM head)."""
    out = model.get_decoder()(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids(),
        use_cache=False,
    )
    return out.last_hidden_state[:, batch.prompt_width - 1 : -1]


def lm_head(model, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head's weight `[V, H]` and bias cut to the shared vocabulary (views: grads flow)."""
    head = model.get_output_embeddings()
    if head.weight.shape[0] <= vocab_size:  # nothing to cut: no slice whose backward copies
        return head.weight, head.bias  # the whole [V, H] gradient into a fresh zero tensor
    bias = None if head.bias is None else head.bias[:vocab_size]
    return head.weight[:vocab_size], bias
