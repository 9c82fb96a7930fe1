"""Peak memory of one opd training step at Qwen's vocabulary (V = 151,936), by objective.

    python benchmarks/step_memory.py                          # on_policy (pg), fused on and off
    python benchmarks/step_memory.py --presets on_policy gkd --src /path/to/other/opd/src

One `train_step` of 32 prompts x 64 sampled tokens with the tiny Llama pair of
`onpolicy_models.py` (size `tiny-152k`: teacher 256 x 4 layers, student 128 x 2), float32 on
CPU, with opd's default configuration otherwise (`sampling.engine=auto` and
`loss.fused_forward=auto`: the lean decoder and packed forward for these Llama models, the
fused loss): what a user gets. Every measurement runs in a fresh subprocess; "process peak" is its VmHWM after the
step (models, optimizer state and all), "step peak" the VmHWM reached during the step minus
the RSS before it (weights are paged in from their safetensors files during the first
step, so it includes them); "weights+grads+AdamW" is what any trainer holds at the
optimizer step (both models' weights, the student's gradients and AdamW's two moments,
computed from the parameter counts). `--src` runs the same step with another checkout's `src` first on the
path (e.g. an older main) for a before/after pair; `loss.fused=false` is the plain path.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from onpolicy_models import BATCH, build, status_kb

MAX_NEW = 64



def worker(args) -> dict:
    import torch

    from opd.config.parse import config_from_dict
    from opd.run.loop import train_step
    from opd.run.metrics import PhaseTimer
    from opd.run.setup import build_run

    torch.manual_seed(0)
    paths = build(Path(args.workdir), "tiny-152k", "float32")
    config = {
        "preset": args.preset,
        "student": {"path": str(paths["student"])},
        "teacher": {"path": str(paths["teacher"])},
        "data": {
            "train": str(paths["prompts"]),
            "chat_template": "off",
            "completion_field": "prompt",
        },
        "sampling": {"max_new_tokens": MAX_NEW},
        "loss": {"fused": args.fused == "on"},
        "batch_size": BATCH,
        "micro_batch_size": BATCH,
        "steps": 1,
        "save_every": 0,
        "log_every": 1000,
        "output_dir": tempfile.mkdtemp(),
    }
    run = build_run(config_from_dict(config))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := current RSS
    before = status_kb("VmRSS")
    record = train_step(run, 0, PhaseTimer())
    peak = status_kb("VmHWM")
    later = 0  # steps after the first: AdamW's moments exist, the heap is warm
    for step in range(1, args.steps):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        train_step(run, step, PhaseTimer())
        later = max(later, status_kb("VmHWM"))
    # What any trainer holds at the optimizer step: both models' weights, the student's
    # gradients and AdamW's two moments (float32 here).
    student = sum(p.numel() * p.element_size() for p in run.student.parameters())
    teacher = sum(p.numel() * p.element_size() for p in run.teacher.model.parameters())
    return {
        "process_peak_gb": peak * 1024 / 1e9,
        "step_peak_gb": (peak - before) * 1024 / 1e9,
        "later_peak_gb": later * 1024 / 1e9,
        "state_gb": (4 * student + teacher) / 1e9,
        "tokens": int(record.get("student_tokens_generated", 0)),
        "fused": bool(run.path.fused),
        "engine": run.path.sampler,
    }


def spawn(args, preset: str, fused: str, src: str | None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--preset", preset,
           "--fused", fused, "--workdir", args.workdir, "--steps", str(args.steps)]  # fmt: skip
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["on_policy"])
    p.add_argument("--src", default=None, help="also measure with this opd src first on the path")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "opd-bench-152k"))
    p.add_argument("--steps", type=int, default=1,
                   help="steps per process; > 1 also reports the later steps' peak")  # fmt: skip
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--preset", default="on_policy", help=argparse.SUPPRESS)
    p.add_argument("--fused", default="on", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    build(Path(args.workdir), "tiny-152k", "float32")  # once, outside the measured processes
    print(f"{BATCH} x {MAX_NEW} tokens, V=151936, tiny Llama pair, float32 CPU, load "
          f"{os.getloadavg()[0]:.1f}")  # fmt: skip
    for preset in args.presets:
        rows = [("this tree", "on", None), ("this tree", "off", None)]
        if args.src:
            rows.insert(0, (args.src, "on", args.src))
        for label, fused, src in rows:
            r = spawn(args, preset, fused, src)
            if "error" in r:
                print(f"{preset:12s} {label:30s} loss.fused={fused:3s} error: {r['error']}")
                continue
            print(f"{preset:12s} {label:30s} loss.fused={fused:3s} (fused path: {r['fused']!s:5s}, engine {r.get('engine', '?')}) "
                  f"process peak {r['process_peak_gb']:5.2f} GB  step peak "
                  f"{r['step_peak_gb']:5.2f} GB  weights+grads+AdamW {r['state_gb']:5.2f} GB  "
                  + (f"steps 2-{args.steps} peak {r['later_peak_gb']:5.2f} GB  " if args.steps > 1 else "")
                  + f"tokens {r['tokens']}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
