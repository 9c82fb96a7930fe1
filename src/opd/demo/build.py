"""Build the demo's tokenizer, a competent teacher and a weak, smaller student.

    from opd.demo.build import build_models
    paths = build_models("~/.cache/opd/demo", quick=True, seed=0)
    # paths["teacher_dir"], paths["student_dir"], paths["tokenizer_dir"], paths["meta"]

The teacher is trained on ground-truth worked solutions until it solves the task; the
student gets only a short warm-up on the same data, so it writes the format but makes
arithmetic and bookkeeping mistakes that distillation can then fix. Everything is saved
with `save_pretrained` and is a plain Hugging Face checkpoint. A build is cached under
`cache_dir` in a folder named by the hash of its configuration, written to a temporary
folder first and moved into place with `os.replace`, so an interrupted or concurrent
build never leaves a half-written cache behind.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from opd.demo.task import DEFAULT_SPEC, TaskSpec, accuracy, make_examples
from opd.demo.tiny import build_char_tokenizer, tiny_causal_lm

# Bump when the task, the training recipe or the file layout changes meaning, so that old
# caches are rebuilt instead of silently reused.
BUILD_VERSION = 1
META_FILE = "meta.json"


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of one tiny Llama and how long to train it on ground truth.

    Training stops at `steps`, or earlier at the first check (every `check_every` steps
    from `min_steps` on) where greedy accuracy on the dev split reaches `target_accuracy`.
    """

    hidden: int
    layers: int
    heads: int
    steps: int
    lr: float
    batch_size: int = 16
    intermediate: int | None = None
    target_accuracy: float | None = None
    min_steps: int = 0
    check_every: int = 100

    def model_kwargs(self) -> dict:
        return {
            "hidden": self.hidden,
            "layers": self.layers,
            "heads": self.heads,
            "intermediate": self.intermediate,
        }


@dataclass(frozen=True)
class BuildConfig:
    """Everything that determines the built artifacts (and so the cache key)."""

    teacher: ModelSpec
    student: ModelSpec
    task: TaskSpec = field(default_factory=lambda: DEFAULT_SPEC)
    num_train: int = 20000
    num_dev: int = 64
    num_eval: int = 256
    max_new_tokens: int = 80

    @classmethod
    def preset(cls, quick: bool) -> BuildConfig:
        # The hard part of the task is the label lookup (an induction-head circuit); tiny
        # models learn it in a sudden phase change somewhere between ~400 and ~1000 steps,
        # depending on the seed. So training stops on reaching a dev-set accuracy rather
        # than after a fixed count: the teacher once it is competent, the student once it
        # has just got through the change (right format, frequent slips) and still has
        # most of the way to go. Batch 16 reached the phase change in as few steps as 32.
        student = ModelSpec(
            hidden=48,
            layers=2,
            heads=4,
            steps=1200,
            lr=3e-3,
            target_accuracy=0.25,
            min_steps=300,
            check_every=50,
        )
        # Quick: a smaller teacher, the same student. A 32-wide student never got through
        # the change in 1,000 steps (dev accuracy 0-14%), and every method then broke it.
        if quick:
            teacher = ModelSpec(
                hidden=96,
                layers=2,
                heads=4,
                steps=1200,
                lr=2e-3,
                target_accuracy=0.95,
                min_steps=400,
                check_every=50,
            )
            quick_student = replace(student, steps=1000)
            return cls(teacher=teacher, student=quick_student, num_dev=64, num_eval=128)
        teacher = ModelSpec(
            hidden=128,
            layers=3,
            heads=4,
            steps=1400,
            lr=2e-3,
            target_accuracy=0.98,
            min_steps=500,
            check_every=100,
        )
        return cls(teacher=teacher, student=student, num_dev=128, num_eval=256)

    def to_dict(self) -> dict:
        return asdict(self)


def config_hash(config: BuildConfig, seed: int) -> str:
    payload = {"version": BUILD_VERSION, "seed": seed, "config": config.to_dict()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def build_tokenizer(out_dir: str | Path) -> PreTrainedTokenizerBase:
    """The demo's character tokenizer, saved to `out_dir` (reload with AutoTokenizer)."""
    tok = build_char_tokenizer()
    tok.save_pretrained(out_dir)
    return tok


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _encode(tokenizer: PreTrainedTokenizerBase, examples: Sequence[dict]) -> list[tuple]:
    """(prompt ids, completion ids + EOS) per example."""
    prompts = tokenizer([e["prompt"] for e in examples], add_special_tokens=False)["input_ids"]
    comps = tokenizer([e["completion"] for e in examples], add_special_tokens=False)["input_ids"]
    return [(p, [*c, tokenizer.eos_token_id]) for p, c in zip(prompts, comps)]


def collate_right_padded(
    pairs: Sequence[tuple], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`input_ids_BT`, `attention_mask_BT`, `loss_mask_BT` (true on completion+EOS tokens).

    Right padding keeps every real token at its natural position 0..len-1, so the default
    position ids are correct and causal attention never looks at the padding.
    """
    width = max(len(p) + len(c) for p, c in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(pairs), width), dtype=torch.long)
    loss = torch.zeros((len(pairs), width), dtype=torch.bool)
    for i, (p, c) in enumerate(pairs):
        n = len(p) + len(c)
        ids[i, :n] = torch.tensor(p + c)
        attn[i, :n] = 1
        loss[i, len(p) : n] = True
    return ids, attn, loss


def completion_nll(model, ids_BT, attn_BT, loss_BT) -> torch.Tensor:
    """Mean next-token cross-entropy over the completion (and EOS) tokens."""
    logits = model(input_ids=ids_BT, attention_mask=attn_BT).logits[:, :-1].float()
    targets, mask = ids_BT[:, 1:], loss_BT[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
    ).view_as(targets)
    return (nll * mask).sum() / mask.sum().clamp(min=1)


def pretrain_causal_lm(
    model,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[dict],
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    warmup_steps: int | None = None,
    weight_decay: float = 0.01,
    log_every: int = 0,
    log: Callable[[dict], None] | None = None,
    stop: Callable[[int], bool] | None = None,
    check_every: int = 0,
) -> list[float]:
    """Plain cross-entropy on prompt+completion, loss on completion tokens and EOS only.

    AdamW with linear warm-up and cosine decay to 10% of `lr` over `steps`; batches are
    drawn with replacement from `examples` with a seeded generator. Every `check_every`
    steps `stop(step)` is called (model in eval mode) and training ends if it returns
    True. Returns the per-step losses (their count is the number of steps taken).
    """
    pairs = _encode(tokenizer, examples)
    gen = torch.Generator().manual_seed(seed)
    warmup = max(1, steps // 20) if warmup_steps is None else warmup_steps
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(len(pairs), (batch_size,), generator=gen).tolist()
        batch = collate_right_padded([pairs[i] for i in idx], tokenizer.pad_token_id)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = completion_nll(model, *batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if log is not None and log_every and (step + 1) % log_every == 0:
            recent = losses[-log_every:]
            log(
                {
                    "step": step + 1,
                    "loss": sum(recent) / len(recent),
                    "lr": lr_at(step),
                    "elapsed_s": round(time.perf_counter() - start, 2),
                }
            )
        if stop is not None and check_every and (step + 1) % check_every == 0:
            model.eval()
            done = stop(step + 1)
            model.train()
            if done:
                break
    model.eval()
    return losses


@torch.no_grad()
def greedy_generate(
    model,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 128,
) -> list[str]:
    """Greedy completions (special tokens stripped) via `model.generate` on left-padded prompts."""
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(
                list(prompts[i : i + batch_size]),
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            )
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new = gen[:, enc["input_ids"].shape[1] :]
            out.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out


def greedy_accuracy(
    model,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[dict],
    max_new_tokens: int = 80,
    batch_size: int = 128,
) -> float:
    """Exact-match accuracy of greedy completions on `examples`."""
    texts = greedy_generate(
        model,
        tokenizer,
        [e["prompt"] for e in examples],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
    )
    return accuracy(texts, examples)


def _new_model(tokenizer: PreTrainedTokenizerBase, spec: ModelSpec, seed: int):
    return tiny_causal_lm(
        len(tokenizer),
        family="llama",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        max_positions=256,
        seed=seed,
        **spec.model_kwargs(),
    )


def _read_meta(folder: Path, key: str) -> dict | None:
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    if meta.get("config_hash") != key:
        return None
    needed = ("teacher/config.json", "student/config.json", "tokenizer/tokenizer.json")
    if not all((folder / name).is_file() for name in needed):
        return None
    return meta


def _paths(folder: Path, meta: dict) -> dict:
    return {
        "teacher_dir": folder / "teacher",
        "student_dir": folder / "student",
        "tokenizer_dir": folder / "tokenizer",
        "meta": meta,
    }


def build_models(
    cache_dir: str | Path,
    quick: bool = False,
    seed: int = 0,
    *,
    config: BuildConfig | None = None,
    log: Callable[[dict], None] | None = None,
    num_threads: int | None = None,
) -> dict:
    """Train (or reuse from `cache_dir`) the demo's teacher and initial student.

    Returns `{"teacher_dir", "student_dir", "tokenizer_dir", "meta"}`; `meta` holds the
    config, its hash, parameter counts, greedy eval accuracies and build times. `config`
    overrides the `quick`/full preset (tests use a tiny one). `num_threads`, if given, is
    the torch CPU thread count during the build (restored afterwards).
    """
    config = config or BuildConfig.preset(quick)
    key = config_hash(config, seed)
    cache_dir = Path(cache_dir).expanduser()
    folder = cache_dir / f"models-{key}"
    meta = _read_meta(folder, key)
    if meta is not None:
        if log:
            log({"event": "cache_hit", "dir": str(folder)})
        return _paths(folder, meta)
    cache_dir.mkdir(parents=True, exist_ok=True)
    if folder.exists():  # stale or broken: rebuild from scratch
        shutil.rmtree(folder, ignore_errors=True)

    tmp = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=cache_dir))
    threads_before = torch.get_num_threads()
    try:
        if num_threads:
            torch.set_num_threads(num_threads)
        meta = _build_into(tmp, config, seed, key, log)
        try:
            os.replace(tmp, folder)
        except OSError:
            # Another process finished the same build first; use theirs if it is whole.
            theirs = _read_meta(folder, key)
            if theirs is None:
                raise
            meta = theirs
    finally:
        torch.set_num_threads(threads_before)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return _paths(folder, meta)


def _build_into(tmp: Path, config: BuildConfig, seed: int, key: str, log) -> dict:
    t0 = time.perf_counter()
    tokenizer = build_tokenizer(tmp / "tokenizer")
    train = make_examples(config.num_train, seed, "train", config.task)
    dev = make_examples(config.num_dev, seed, "dev", config.task)
    evals = make_examples(config.num_eval, seed, "eval", config.task)
    meta: dict = {
        "config_hash": key,
        "build_version": BUILD_VERSION,
        "seed": seed,
        "config": config.to_dict(),
        "torch_threads": torch.get_num_threads(),
    }
    for name, spec, model_seed in (
        ("teacher", config.teacher, seed * 2 + 1),
        ("student", config.student, seed * 2 + 2),
    ):
        t = time.perf_counter()
        model = _new_model(tokenizer, spec, model_seed)
        checks: list[dict] = []

        def stage_log(rec: dict, name: str = name) -> None:
            if log:
                log({"event": "train", "model": name, **rec})

        def reached_target(step: int, spec: ModelSpec = spec, model=model, checks=checks) -> bool:
            if spec.target_accuracy is None or step < spec.min_steps:
                return False
            acc = greedy_accuracy(model, tokenizer, dev, config.max_new_tokens)
            checks.append({"step": step, "dev_accuracy": acc})
            stage_log({"step": step, "dev_accuracy": acc})
            return acc >= spec.target_accuracy

        losses = pretrain_causal_lm(
            model,
            tokenizer,
            train,
            steps=spec.steps,
            batch_size=spec.batch_size,
            lr=spec.lr,
            seed=model_seed,
            log_every=max(1, spec.steps // 10),
            log=stage_log,
            stop=reached_target,
            check_every=spec.check_every,
        )
        train_s = time.perf_counter() - t
        acc = greedy_accuracy(model, tokenizer, evals, config.max_new_tokens)
        model.save_pretrained(tmp / name, safe_serialization=True)
        tokenizer.save_pretrained(tmp / name)
        meta[name] = {
            "params": count_params(model),
            "steps": len(losses),
            "eval_accuracy": acc,
            "dev_checks": checks,
            "final_loss": sum(losses[-20:]) / max(1, len(losses[-20:])),
            "train_s": round(train_s, 2),
            "total_s": round(time.perf_counter() - t, 2),
        }
        if log:
            log({"event": "built", "model": name, **meta[name]})
    meta["build_s"] = round(time.perf_counter() - t0, 2)
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    return meta


def load_pair(paths: dict):
    """(teacher, student, tokenizer) loaded back through `from_pretrained`, in eval mode."""
    teacher = AutoModelForCausalLM.from_pretrained(paths["teacher_dir"]).eval()
    student = AutoModelForCausalLM.from_pretrained(paths["student_dir"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(paths["tokenizer_dir"])
    return teacher, student, tokenizer
