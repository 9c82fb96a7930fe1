"""Peak memory of `opd eval` at Qwen's vocabulary (V = 151,936) and long completions.

    python benchmarks/eval_memory.py                               # 64 rows x 1,024 positions
    python benchmarks/eval_memory.py --rows 8 --src /path/to/other/opd/src   # before/after

`opd eval` (`opd.cli.eval.evaluate_model`) on `--rows` held-out rows whose completions are
`--positions` tokens long, with the tiny Llama pair of `onpolicy_models.py` (size
`tiny-152k`, position limit raised to fit): the greedy task metric, the held-out loss over
every completion position, and the exposure-bias probe against the teacher (both models
sample `--new-tokens` tokens per row, then the divergences are taken on those samples).
Evaluation holds the models' weights and, per chunk of 64 sequences, hidden states; logits
exist 128 positions at a time (`opd.evaluation.divergence.ROWS`). The target: the process
peak (VmHWM, imports included) within twice the weights of the models it loads plus 1 GB.
One `[64, 1024, V]` float32 logits tensor, as evaluation built before, is 40 GB.
Each measurement runs in a fresh subprocess; `--src` puts another checkout's `src` first.
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
from onpolicy_models import CHARS, build, status_kb


def prepare(workdir: Path, rows: int, positions: int) -> dict:
    """The pair (position limit raised to `positions` + 64) and the held-out rows."""
    paths = build(workdir, "tiny-152k", "float32")
    for name in ("teacher", "student"):
        cfg_path = paths[name] / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["max_position_embeddings"] = max(cfg["max_position_embeddings"], positions + 64)
        cfg_path.write_text(json.dumps(cfg, indent=2))
    paths["eval"] = workdir / f"eval-{rows}x{positions}.jsonl"
    with paths["eval"].open("w") as f:
        for i in range(rows):
            text = "".join(CHARS[(7 * i + 3 * j) % 36] for j in range(positions - 1))
            f.write(json.dumps({"prompt": f"what is {i:02d}+1?", "completion": text,
                                "answer": str(i + 1)}) + "\n")  # fmt: skip
    return paths


def worker(args) -> dict:
    from opd.cli.eval import evaluate_model
    from opd.config.parse import config_from_dict

    paths = {k: Path(v) for k, v in json.loads(args.paths).items()}
    config = config_from_dict({
        "student": {"path": str(paths["student"])},
        "teacher": {"path": str(paths["teacher"])},
        "data": {"train": str(paths["eval"]), "eval": str(paths["eval"]), "chat_template": "off",
                 "max_completion_tokens": args.positions},
        "sampling": {"max_new_tokens": args.new_tokens},
        "eval_size": args.rows,
        "device": "cpu",
        "output_dir": tempfile.mkdtemp(),
    })  # fmt: skip
    before = status_kb("VmHWM")
    result = evaluate_model(config, config.student.path)
    # the models' own weights: their safetensors files (float32, no optimizer here)
    weights = sum((paths[n] / "model.safetensors").stat().st_size for n in ("student", "teacher"))
    return {
        "process_peak_gb": status_kb("VmHWM") * 1024 / 1e9,
        "peak_before_eval_gb": before * 1024 / 1e9,
        "weights_gb": weights / 1e9,
        "heldout_loss": result.get("heldout_loss"),
        "divergence_to_teacher": result.get("divergence_to_teacher", {}).get("reverse_kl"),
    }


def spawn(args, paths: dict, src: str | None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--paths",
           json.dumps({k: str(v) for k, v in paths.items()}), "--rows", str(args.rows),
           "--positions", str(args.positions), "--new-tokens", str(args.new_tokens)]  # fmt: skip
    env = {**os.environ, "TQDM_DISABLE": "1"}
    if src:
        env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--positions", type=int, default=1024, help="completion tokens per row")
    p.add_argument("--new-tokens", type=int, default=32, help="sampled per row by each model")
    p.add_argument("--src", default=None, help="also measure with this opd src first on the path")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "opd-bench-152k"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--paths", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    paths = prepare(Path(args.workdir), args.rows, args.positions)
    print(f"opd eval: {args.rows} rows x {args.positions} completion positions, V=151936, "
          f"{args.new_tokens} sampled tokens per row and model, tiny Llama pair, float32 CPU, "
          f"load {os.getloadavg()[0]:.1f}")  # fmt: skip
    for label, src in ([(args.src, args.src)] if args.src else []) + [("this tree", None)]:
        r = spawn(args, paths, src)
        if "error" in r:
            print(f"{label:30s} error: {r['error']}")
            continue
        bound = 2 * r["weights_gb"] + 1.0
        print(f"{label:30s} process peak {r['process_peak_gb']:5.2f} GB  (bound 2 x weights "
              f"{r['weights_gb']:.2f} GB + 1 GB = {bound:.2f} GB: "
              f"{'within' if r['process_peak_gb'] <= bound else 'OVER'})  held-out loss "
              f"{r['heldout_loss']:.4f}  reverse KL on own samples "
              f"{r['divergence_to_teacher']['div_on_student']:.4f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
