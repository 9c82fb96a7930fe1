"""Models, prompts and opd's side shared by `onpolicy_vs_trl.py`, `onpolicy_profile.py` and
`onpolicy_floor.py`.

Random-initialised teacher/student pairs written with `save_pretrained` under a work
directory (reused when present), a character tokenizer whose length equals the models'
vocabulary (so that every LM-head row is a real token and both libraries use all of
them), and 32 prompts of equal length; opd's training config for them (`opd_config`) and
its per-phase step timing (`time_steps`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

SIZES = {
    # name: vocabulary, teacher (hidden, layers, heads, kv heads) or a Qwen3 shape, student, steps
    "tiny": {"vocab": 49, "teacher": (256, 4, 4, 4), "student": (128, 2, 2, 2), "steps": 10},
    # The tiny pair at Qwen's vocabulary: the logits, not the layers, set the memory.
    "tiny-152k": {
        "vocab": 151936,
        "teacher": (256, 4, 4, 4),
        "student": (128, 2, 2, 2),
        "steps": 1,
    },
    "large": {"vocab": 32000, "teacher": (512, 8, 8, 8), "student": (256, 4, 4, 4), "steps": 3},
    "qwen3": {"vocab": 151936, "teacher": "qwen3-1.7b", "student": "qwen3-0.6b", "steps": 5},
    # The Qwen3 path with small layers, to try the GPU set-up on a CPU first.
    "qwen3-smoke": {
        "vocab": 151936,
        "teacher": "qwen3-smoke-t",
        "student": "qwen3-smoke-s",
        "steps": 1,
    },
}
CHARS = "0123456789abcdefghijklmnopqrstuvwxyz +-*/=()?"  # + pad/eos/unk = 49 tokens
BATCH, MAX_NEW = 32, 48


def status_kb(key: str) -> int:
    """A field of /proc/self/status in kB (VmRSS, VmHWM: this process's memory)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def qwen3_config(name: str, vocab: int):
    from transformers import Qwen3Config

    shapes = {  # the published configs of Qwen/Qwen3-0.6B and Qwen/Qwen3-1.7B
        "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28),
        "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28),
        "qwen3-smoke-s": dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=16
        ),
        "qwen3-smoke-t": dict(
            hidden_size=96, intermediate_size=192, num_hidden_layers=2, head_dim=16
        ),
    }[name]
    return Qwen3Config(
        vocab_size=vocab,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=shapes.pop("head_dim", 128),
        max_position_embeddings=40960,
        rope_theta=1000000,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=None,
        **shapes,
    )


def filler_chars(n: int) -> str:
    """`n` distinct non-ASCII characters (CJK onwards, surrogates skipped) to pad the vocabulary."""
    out, code = [], 0x4E00
    while len(out) < n:
        if not 0xD800 <= code <= 0xDFFF:
            out.append(chr(code))
        code += 1
    return "".join(out)


def build(workdir: Path, size: str, dtype: str, device: str = "cpu") -> dict:
    """Tokenizer, teacher, student and prompts under `workdir` (reused if already there)."""
    import torch
    from transformers import AutoModelForCausalLM

    from opd.cli.demo.tiny import build_char_tokenizer, tiny_causal_lm

    spec = SIZES[size]
    paths = {"teacher": workdir / "teacher", "student": workdir / "student"}
    paths["prompts"] = workdir / "prompts.jsonl"
    if all((p / "config.json").exists() for p in (paths["teacher"], paths["student"])):
        return paths
    workdir.mkdir(parents=True, exist_ok=True)
    tok = build_char_tokenizer(CHARS + filler_chars(spec["vocab"] - 3 - len(CHARS)))
    assert len(tok) == spec["vocab"]  # every LM-head row is a real token: both sides use all
    for seed, name in enumerate(("teacher", "student"), start=1):
        shape = spec[name]
        if isinstance(shape, str):
            torch.manual_seed(seed)
            config = qwen3_config(shape, spec["vocab"])
            config.pad_token_id, config.eos_token_id = tok.pad_token_id, tok.eos_token_id
            with torch.device(device):  # initialise on the GPU: seconds, not a minute
                model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
        else:
            hidden, layers, heads, kv = shape
            model = tiny_causal_lm(
                spec["vocab"],
                hidden=hidden,
                layers=layers,
                heads=heads,
                kv_heads=kv,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
                seed=seed,
            )
        model.save_pretrained(paths[name])
        tok.save_pretrained(paths[name])
    # Equal-length prompts: TRL passes no position ids to the training forward (positions
    # count from the first column, padding included), opd skips left padding. With no
    # padding the two agree, so both sides train on exactly the same objective.
    with paths["prompts"].open("w") as f:
        for i in range(BATCH):
            a, b = (37 * i + 11) % 100, (53 * i + 29) % 100
            f.write(json.dumps({"prompt": f"what is {a:02d}+{b:02d}?"}) + "\n")
    return paths


def opd_config(paths: dict, output_dir, *, steps: int, dtype: str = "float32",
               teacher_dtype: str | None = None, device: str = "cpu", seed: int = 0,
               engine: str = "auto"):  # fmt: skip
    """opd's side of the comparison: preset `minillm_like` (student samples, full-vocabulary
    reverse KL), batch 32, up to 48 new tokens at temperature 1, AdamW lr 1e-6 with
    clipping at 1.0 as TRL, nothing saved; otherwise opd's defaults: what a user gets
    (`sampling.engine=auto`, `loss.fused_forward=auto`: the lean decoder and packed forward
    for these Llama models, checked against the HF forward on the first batch). `engine`
    sets both keys (`hf`: the Hugging Face forward throughout, for comparison)."""
    from opd.config.parse import config_from_dict

    sampling = {"max_new_tokens": MAX_NEW, "temperature": 1.0, "engine": engine}
    return config_from_dict(
        {
            "preset": "minillm_like",
            # a fully trained student keeps float32 weights; bfloat16 is the compute dtype
            "student": {"path": str(paths["student"])},
            "bf16": dtype == "bfloat16",
            "teacher": {"path": str(paths["teacher"]), "dtype": teacher_dtype or dtype},
            "data": {"train": str(paths["prompts"]), "chat_template": "off"},
            "sampling": sampling,
            "loss": {"fused_forward": engine},
            "optim": {"lr": 1e-6},
            "batch_size": BATCH,
            "micro_batch_size": BATCH,
            "steps": steps,
            "save_every": 0,
            "log_every": 1000,
            "device": device,
            "output_dir": str(output_dir),
            "seed": seed,
        }
    )


def time_steps(run, steps: int, clock=time.perf_counter) -> dict[str, list[float]]:
    """Run opd's `train_step` `steps` times; per phase (opd's own phase timer) and for the
    whole step ("total", by `clock`), the seconds of every step after the first, which
    warms the allocator and the kernels."""
    from opd.run.loop import train_step
    from opd.run.metrics import PhaseTimer

    timer, phases = PhaseTimer(), {}
    for step in range(steps):
        start = clock()
        train_step(run, step, timer)
        record = {**timer.pop(), "total": clock() - start}
        if step:
            for key, value in record.items():
                phases.setdefault(key, []).append(value)
    return phases
