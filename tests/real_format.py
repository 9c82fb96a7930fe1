"""Real-format fixtures: what Hugging Face checkpoints and datasets look like, built offline.

* a byte-level BPE tokenizer trained here (`tokenizers`), with Qwen's specials
  `<|endoftext|>` (pad, base EOS) / `<|im_start|>` / `<|im_end|>` (instruct EOS), a Jinja
  chat template, and text with multi-byte characters so that some characters are split
  over several tokens;
* Qwen3 and tied-embedding Llama checkpoints, the teacher's embedding padded past the
  tokenizer (as Qwen's 151,936 rows for 151,669 tokens), a `generation_config.json` with
  two EOS ids and Qwen's sampling defaults;
* prompt/completion and `messages` rows as JSONL, Parquet and `datasets` directories
  (`save_to_disk` of a Dataset and of a DatasetDict).

Import from tests: `from real_format import build_tokenizer, build_pair, write_data`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Qwen2.5/Qwen3 instruct generation_config: both ids end a reply, and sampling defaults.
GENERATION_DEFAULTS = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20}
WORDS = (
    "what is the sum of and answer think step carefully result equals café naïve 日本語 "
    "東京 émoji 🙂 größe déjà vu résumé question reply system you are a helpful assistant "
    "zero one two three four five six seven eight nine ten plus minus times"
)


def corpus() -> list[str]:
    lines = [WORDS]
    for a in range(12):
        for b in range(6):
            lines.append(
                f"What is {a} plus {b}? The answer is {a + b}. café 日本語 🙂 \\boxed{{{a + b}}}"
            )
    return lines


def build_tokenizer(eos: str = "<|im_end|>", vocab_size: int = 420) -> PreTrainedTokenizerFast:
    """A trained byte-level BPE tokenizer with Qwen's specials and chat template.

    `eos`: `<|im_end|>` as an instruct checkpoint ships it, `<|endoftext|>` as a base one."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=eos,
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def eos_ids(tok) -> list[int]:
    return [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]


def _model(arch: str, vocab: int, hidden: int, layers: int, tok, seed: int):
    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
        eos_token_id=eos_ids(tok),
    )
    if arch == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(**common, tie_word_embeddings=False))
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=True))
    raise ValueError(arch)


def save_checkpoint(path: Path, model, tok) -> Path:
    model.save_pretrained(path)
    tok.save_pretrained(path)
    GenerationConfig(
        eos_token_id=eos_ids(tok), pad_token_id=tok.pad_token_id, **GENERATION_DEFAULTS
    ).save_pretrained(path)
    return path


def build_pair(root: Path, arch: str, *, pad_teacher: int = 13, teacher_scale: float = 8.0):
    """(teacher_dir, student_dir) of `arch` ('qwen3' or 'llama', the latter with tied
    embeddings), the teacher wider, deeper, peaked, its embedding `pad_teacher` rows past
    the tokenizer."""
    tok = build_tokenizer()
    V = len(tok)
    teacher = _model(arch, V + pad_teacher, 48, 2, tok, seed=1)
    with torch.no_grad():
        teacher.get_output_embeddings().weight.mul_(teacher_scale)
    student = _model(arch, V, 32, 1, tok, seed=2)
    t = save_checkpoint(Path(root) / f"{arch}-teacher", teacher, tok)
    s = save_checkpoint(Path(root) / f"{arch}-student", student, tok)
    return t, s


# ------------------------------------------------------------------------------------ data


def rows(n: int = 12) -> dict[str, list[dict]]:
    """Rows in both shapes. Conversations: a per-row system prompt on even rows, and a
    multi-turn history on every third."""
    plain, chats = [], []
    for i in range(n):
        a, b = i % 7, (3 * i) % 5
        question, answer = f"What is {a} plus {b}? café 🙂", str(a + b)
        completion = f"The answer is \\boxed{{{a + b}}}. 日本語"
        plain.append({"prompt": question, "completion": completion, "answer": answer})
        turns = []
        if i % 2 == 0:
            turns.append({"role": "system", "content": f"You are helpful {i}."})
        if i % 3 == 0:
            turns += [
                {"role": "user", "content": "What is one plus one?"},
                {"role": "assistant", "content": "two"},
            ]
        turns += [
            {"role": "user", "content": question},
            {"role": "assistant", "content": completion},
        ]
        chats.append({"messages": turns, "answer": answer})
    return {"plain": plain, "messages": chats}


def write_data(root: Path, kind: str, fmt: str, n: int = 12) -> Path:
    """`kind`: plain | messages; `fmt`: jsonl | parquet | dataset | datasetdict (a
    DatasetDict with train and test splits, the test split a different slice)."""
    root = Path(root)
    data = rows(n)[kind]
    path = root / f"{kind}.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in data))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(data), path)
    elif fmt in ("dataset", "datasetdict"):
        from datasets import Dataset, DatasetDict

        ds = Dataset.from_list(data)
        if fmt == "datasetdict":
            ds = DatasetDict({"train": ds, "test": Dataset.from_list(data[: n // 2])})
        ds.save_to_disk(str(path))
    else:
        raise ValueError(fmt)
    return path
