"""Where an on-policy step's time goes, opd and TRL side by side (issue 10).

    python benchmarks/onpolicy_profile.py --workdir /tmp/opdbench            # tiny
    python benchmarks/onpolicy_profile.py --workdir /tmp/opdbench --size large --steps 3

Uses the models `onpolicy_vs_trl.py` builds (same sizes, same `--workdir`; built here if
missing) and the same settings. Each side runs in its own subprocess with one thread and
reports the median process CPU time per phase over the steps after the first (CPU time,
not wall time, so that a shared machine's load does not blur the split):

  opd   its own phase timer (`opd.run.metrics.PhaseTimer`): generate (student sampling),
        teacher_score (teacher forward), update (student forward/backward, fused loss,
        clipping, AdamW)
  trl   wrapped methods of DistillationTrainer: generate (`_generate_single_turn`),
        forward (`_compute_loss`: student and teacher forward and the chunked loss); the
        rest of the step (backward, clipping, AdamW, Trainer bookkeeping) is total minus both
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from onpolicy_models import BATCH, MAX_NEW, build, opd_config, time_steps


def profile_ours(paths: dict, steps: int) -> dict:
    import opd.run.metrics

    opd.run.metrics.time = types.SimpleNamespace(perf_counter=time.process_time)  # CPU time
    from opd.run.setup import build_run

    run = build_run(opd_config(paths, tempfile.mkdtemp(), steps=steps))
    phases = time_steps(run, steps, clock=time.process_time)
    return {k: statistics.median(v) for k, v in phases.items()}


def profile_trl(paths: dict, steps: int) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    tok = AutoTokenizer.from_pretrained(paths["student"], padding_side="left")
    rows = [json.loads(line) for line in paths["prompts"].read_text().splitlines()]
    current, phases = {}, {}

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            current.clear()
            current["start"] = time.process_time()

        def on_step_end(self, args, state, *a, **k):
            record = {**current, "total": time.process_time() - current.pop("start")}
            record.pop("start", None)
            if state.global_step > 1:
                for key, value in record.items():
                    phases.setdefault(key, []).append(value)

    trainer = DistillationTrainer(
        model=AutoModelForCausalLM.from_pretrained(paths["student"]),
        teacher_model=AutoModelForCausalLM.from_pretrained(paths["teacher"]),
        args=DistillationConfig(
            output_dir=tempfile.mkdtemp(),
            per_device_train_batch_size=BATCH,
            max_steps=steps,
            max_completion_length=MAX_NEW,
            beta=1.0,
            learning_rate=1e-6,
            lr_scheduler_type="constant",
            bf16=False,
            gradient_checkpointing=False,
            use_cpu=True,
            logging_steps=1000,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
        ),
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        callbacks=[Clock()],
    )
    for name, key in (("_generate_single_turn", "generate"), ("_compute_loss", "forward")):
        inner = getattr(trainer, name)

        def timed(*a, _inner=inner, _key=key, **k):
            start = time.process_time()
            out = _inner(*a, **k)
            current[_key] = current.get(_key, 0.0) + time.process_time() - start
            return out

        setattr(trainer, name, timed)
    trainer.train()
    out = {k: statistics.median(v) for k, v in phases.items()}
    out["backward+optimizer+rest"] = out["total"] - out["generate"] - out["forward"]
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", default="tiny", choices=("tiny", "large"))
    p.add_argument("--steps", type=int, default=6, help="steps per side; the first is not counted")
    p.add_argument("--workdir", default=tempfile.gettempdir() + "/opdbench")
    p.add_argument("--side", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    paths = build(Path(args.workdir) / args.size, args.size, "float32")
    if args.side:
        import torch

        torch.set_num_threads(1)
        fn = profile_ours if args.side == "opd" else profile_trl
        print(json.dumps(fn(paths, args.steps)))
        return
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}
    for side in ("opd", "trl"):
        cmd = [sys.executable, __file__, "--size", args.size, "--steps", str(args.steps)]
        cmd += ["--workdir", args.workdir, "--side", side]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
        phases = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{side:4} CPU s/step: " + "  ".join(f"{k} {v:.3f}" for k, v in phases.items()))


if __name__ == "__main__":
    main()
