"""Build the demo's tokenizer, a teacher that recovers from slips, and a weak student.

    from opd.cli.demo.build import build_models
    paths = build_models("~/.cache/opd/demo", quick=True, seed=0)
    # paths["teacher_dir"], paths["student_dir"], paths["tokenizer_dir"], paths["meta"]

The teacher is trained on worked solutions of which half have one or two corrupted step
values (clean targets after them; `opd.cli.demo.pretrain`), so it learns to recompute the
running maximum from the prompt instead of copying what was written. The student, about
ten times smaller, gets a short warm-up on clean solutions only: it writes the format and
is often right, but it slips, and nothing taught it what to do after a slip. Everything
is saved with `save_pretrained` as a plain Hugging Face checkpoint. A build is cached
under `cache_dir` in a folder named by the hash of its configuration, written to a
temporary folder first and moved into place with `os.replace`, so an interrupted or
concurrent build never leaves a half-written cache behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from opd.cli.demo.pretrain import greedy_accuracy, pretrain_causal_lm
from opd.cli.demo.quiet import quiet_transformers
from opd.cli.demo.task import DEFAULT_SPEC, TaskSpec, make_examples, max_completion_chars
from opd.cli.demo.tiny import build_char_tokenizer, tiny_causal_lm

# Bump when the task, the training recipe or the file layout changes meaning, so that old
# caches are rebuilt instead of silently reused.
BUILD_VERSION = 3
META_FILE = "meta.json"


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of one tiny Llama and how long to train it.

    Training stops at `steps`, or earlier at the first check (every `check_every` steps
    from `min_steps` on) where greedy accuracy on the dev split reaches `target_accuracy`.
    `corrupt_prob`: share of training examples with corrupted step values (the teacher).
    """

    hidden: int
    layers: int
    heads: int
    steps: int
    lr: float
    batch_size: int = 32
    intermediate: int | None = None
    corrupt_prob: float = 0.0
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
    num_dev: int = 128
    num_eval: int = 256

    @property
    def max_new_tokens(self) -> int:
        return max_completion_chars(self.task) + 1

    @classmethod
    def preset(cls, quick: bool) -> BuildConfig:
        """The same models for `--quick` and the full run (one cache entry serves both)."""
        # Training stops at a dev-set accuracy, not a step count: the teacher once it is
        # near perfect (it must also have learnt to correct; 400-600 steps in our runs,
        # and the short cosine schedule is what gets it there), the student once it
        # writes the format and gets a fair share right, slipping often on long problems.
        teacher = ModelSpec(
            hidden=64,
            layers=2,
            heads=4,
            steps=900,
            lr=3e-3,
            corrupt_prob=0.5,
            target_accuracy=0.95,
            min_steps=400,
            check_every=100,
        )
        student = ModelSpec(
            hidden=32,
            layers=2,
            heads=4,
            steps=1000,
            lr=3e-3,
            target_accuracy=0.6,
            min_steps=200,
            check_every=50,
        )
        return cls(teacher=teacher, student=student, num_dev=64, num_eval=128)

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
        bar = tqdm(total=spec.steps, desc=f"build {name}", disable=None, dynamic_ncols=True)

        def reached_target(step: int, spec=spec, model=model, checks=checks, bar=bar, name=name):
            if spec.target_accuracy is None or step < spec.min_steps:
                return False
            acc = greedy_accuracy(model, tokenizer, dev, config.max_new_tokens)
            checks.append({"step": step, "dev_accuracy": acc})
            bar.set_postfix(dev_acc=f"{acc:.2f}")
            if log:
                log({"event": "check", "model": name, "step": step, "dev_accuracy": acc})
            return acc >= spec.target_accuracy

        def on_step(step: int, loss: float, bar=bar) -> None:
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss:.3f}")

        losses = pretrain_causal_lm(
            model,
            tokenizer,
            train,
            steps=spec.steps,
            batch_size=spec.batch_size,
            lr=spec.lr,
            seed=model_seed,
            corrupt_prob=spec.corrupt_prob,
            on_step=on_step,
            stop=reached_target,
            check_every=spec.check_every,
        )
        bar.close()
        train_s = time.perf_counter() - t
        acc = greedy_accuracy(model, tokenizer, evals, config.max_new_tokens)
        with quiet_transformers():
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
