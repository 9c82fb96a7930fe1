"""TRL's GOLD trainer (`trl.experimental.gold`, TRL 1.16) on the pair, data and update budget
of `cross_tokenizer.py`: the demo student, a teacher of another tokenizer, the same training
prompts in the same order of batches (one optimizer step per batch of `batch_size`), fully
on-policy (`lmbda=1`), student samples at temperature 1 (no top-p / top-k), AdamW at the
same learning rate after the same linear warm-up, gradient norm clipped at 1, no weight
decay.

GOLD across tokenizers is its ULD loss (`use_uld_loss=True`: sorted probabilities compared
position by position, with its extended byte alignment when `extended` is set; TRL's docs
say to turn that off for tokenizers that are not byte-level BPE, which the demo's character
tokenizer is not, so both are offered); `hybrid` turns on GOLD's hybrid loss (JSD over the
tokens both vocabularies spell alike, ULD over the rest). The student's prompt reaches GOLD as a chat whose
template writes the prompt text as it is and the answer followed by the EOS token: the same
text opd trains on without a chat template.

Needs the environment with TRL (`/work/main/.venv` here: transformers 5.25).
"""

from __future__ import annotations

import time
from pathlib import Path

PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
)


def run_gold(
    student_dir: Path,
    teacher_dir: Path,
    train_rows: list[dict],
    out: Path,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    warmup: int,
    max_new_tokens: int,
    seed: int,
    extended: bool,
    hybrid: bool = False,
):
    """Train a copy of the student with GOLD; returns (the trained model, its tokenizer,
    seconds)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.gold import GOLDConfig, GOLDTrainer

    tok = AutoTokenizer.from_pretrained(student_dir)
    tok.chat_template = PLAIN_TEMPLATE
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    rows = [
        {"messages": [{"role": "user", "content": r["prompt"]},
                      {"role": "assistant", "content": r["completion"]}]}
        for r in train_rows[: steps * batch_size]
    ]  # fmt: skip
    cfg = GOLDConfig(
        output_dir=str(out),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=1,
        max_steps=steps,
        learning_rate=lr,
        lr_scheduler_type="constant_with_warmup",  # opd's optim.schedule=constant + warm-up
        warmup_steps=warmup,
        weight_decay=0.0,
        max_grad_norm=1.0,
        lmbda=1.0,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_completion_length=max_new_tokens,
        max_length=max_new_tokens + 64,
        teacher_tokenizer_name_or_path=str(teacher_dir),
        use_uld_loss=True,
        use_extended_uld=extended,
        # GOLD's hybrid: JSD over tokens the two vocabularies share by text, ULD over the rest
        uld_use_hybrid_loss=hybrid,
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=seed,
        dataloader_num_workers=0,
    )
    trainer = GOLDTrainer(
        model=student,
        teacher_model=str(teacher_dir),
        args=cfg,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
    )
    t0 = time.perf_counter()
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return trainer.model.eval(), AutoTokenizer.from_pretrained(student_dir), {
        "seconds": round(time.perf_counter() - t0, 1),
        "losses": losses,
    }
