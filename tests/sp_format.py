"""A SentencePiece-style teacher tokenizer, trained here with `tokenizers` (offline).

Metaspace pre-tokenizer (`▁` for a space, no dummy prefix, as Gemma), digits split one by
one (where the byte-level student of `real_format` merges them), BPE with byte fallback
(`<0x00>`..`<0xFF>` in the vocabulary: characters the training corpus lacks, such as most
emoji and CJK, become byte tokens), a Llama-3-style chat template with `<|eot_id|>` ending
a turn and a BOS the template writes. Import: `from sp_format import build_sp_tokenizer`.
"""

from __future__ import annotations

import json

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from real_format import corpus

SP_SPECIALS = ["<unk>", "<s>", "</s>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
SP_CHAT_TEMPLATE = (
    "{{ '<s>' }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content']"
    " + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)


def build_sp_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    # The alphabet: ASCII letters and the Latin accents only, so 日本語 and 🙂 need bytes.
    alphabet = [chr(c) for c in range(32, 127)] + list("éïöüàçñ▁")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SP_SPECIALS,
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    spec = json.loads(tok.to_str())  # add the 256 byte-fallback pieces to the vocabulary
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    tok = Tokenizer.from_str(json.dumps(spec))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
        additional_special_tokens=["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    )
    fast.chat_template = SP_CHAT_TEMPLATE
    return fast


def tiny_model(
    tokenizer, *, seed: int, hidden: int = 32, layers: int = 1, scale: float = 1.0, heads: int = 4
):
    """A Qwen3 model over `tokenizer`'s vocabulary (random weights, logits scaled by
    `scale` to make it peaked)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(heads // 2, 1),
        head_dim=hidden // heads,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(scale)
    return model.eval()


def save_cross_pair(root, *, heads: int = 4):
    """(teacher_dir, student_dir): a SentencePiece-style teacher (peaked, 2 layers) and a
    byte-level BPE student (`real_format.build_tokenizer`), both Qwen3 checkpoints
    (`heads=2`: head dimension 32 for the teacher, which vLLM's CPU kernels need)."""
    from pathlib import Path

    from real_format import build_tokenizer

    root = Path(root)
    t_tok, s_tok = build_sp_tokenizer(), build_tokenizer()
    hidden = 64 if heads == 2 else 48
    teacher = tiny_model(t_tok, seed=1, hidden=hidden, layers=2, scale=8.0, heads=heads)
    student = tiny_model(s_tok, seed=2)
    out = []
    for name, model, tok in (("sp-teacher", teacher, t_tok), ("bpe-student", student, s_tok)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out.append(root / name)
    return tuple(out)
