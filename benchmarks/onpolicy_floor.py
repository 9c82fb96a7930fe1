"""The arithmetic floor of one on-policy step, and the most any loop can beat TRL by (issue 10).

    python benchmarks/onpolicy_floor.py --workdir /tmp/opdbench                # tiny, 2 threads
    python benchmarks/onpolicy_floor.py --workdir /tmp/opdbench --teacher-dtype bfloat16
    python benchmarks/onpolicy_floor.py --workdir /tmp/opdbench --size large --steps 3

A step of `onpolicy_vs_trl.py` must do a fixed amount of matrix arithmetic whatever the
loop around it: the student samples (prefill of the prompts, then one token per row per
decode step), the teacher reads every real token once, the student reads them again with
gradients (forward + backward = 3x the forward's products), and the heads. This script

1. samples one batch exactly as the loop does (same models, prompts, seed, step 0) and
   counts, on its real tokens, the multiply-adds each phase cannot avoid: linear layers
   (a row's last token fed to nobody, the last layer's attention output and MLP only on
   supervised positions, as `opd.modeling.lean` already does), causal attention, the LM heads;
2. measures this machine's matmul rate at each phase's own shapes (`[tokens, hidden]` times
   the layer's widest weight; `[batch, hidden]` for decoding), best of several, at the
   benchmark's thread count and in the teacher's dtype;
3. times opd's phases on the same steps (the loop's own phase timer, wall clock);
4. runs TRL's `DistillationTrainer` in a fresh subprocess (`onpolicy_vs_trl.py`'s worker).

It prints, per phase, GFLOP, the floor (GFLOP / rate), opd's time and its efficiency, and
the ratio TRL's step / floor: the throughput multiple over TRL that a loop with zero
overhead, running every product at the measured rate, would reach. No loop can beat it
without changing the arithmetic (precision, or skipping work the loss needs).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).parent))
from onpolicy_models import BATCH, build, opd_config, time_steps


def _shape(model) -> dict:
    c = model.config
    d = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return dict(
        H=c.hidden_size,
        I=c.intermediate_size,
        L=c.num_hidden_layers,
        q=c.num_attention_heads * d,
        kv=c.num_key_value_heads * d,
        V=c.vocab_size,
    )


def _linear_flops(s: dict, tokens: int, last_layer_tokens: int) -> float:
    """2 x multiply-adds of the projections: q, k, v, o and the gated MLP, per token fed."""
    kv = 2 * s["H"] * 2 * s["kv"]
    rest = 2 * s["H"] * 2 * s["q"] + 2 * 3 * s["H"] * s["I"]
    return (s["L"] - 1) * tokens * (kv + rest) + tokens * kv + last_layer_tokens * rest


def _attention_flops(s: dict, lengths: list[int]) -> float:
    """Causal q.k and p.v over each row's real tokens (half the square), every layer."""
    return s["L"] * sum(2 * 2 * (t * (t + 1) / 2) * s["q"] for t in lengths)


def count_flops(student, teacher, prompt_lens: list[int], completion_lens: list[int]) -> dict:
    st, te = _shape(student), _shape(teacher)
    total = [p + c for p, c in zip(prompt_lens, completion_lens, strict=True)]
    fed = [t - 1 for t in total]  # a row's last token predicts nothing
    supervised = sum(completion_lens)
    # Teacher: every fed token through the model (its head is charged to the update below,
    # where opd's fused loss and TRL's loss both compute it).
    teacher_f = _linear_flops(te, sum(fed), supervised) + _attention_flops(te, fed)
    teacher_head = 2 * supervised * te["H"] * te["V"]
    # Student update: the same forward with gradients (backward = 2 products per forward one).
    student_fwd = _linear_flops(st, sum(fed), supervised) + _attention_flops(st, fed)
    student_fwd += 2 * supervised * st["H"] * st["V"]
    # Sampling: the prompts once (head on their last column), then each generated token but
    # the row's last is fed back, attending to everything before it.
    prefill = _linear_flops(st, sum(prompt_lens), len(prompt_lens))
    prefill += _attention_flops(st, prompt_lens) + 2 * len(prompt_lens) * st["H"] * st["V"]
    decode_tokens = supervised - len(completion_lens)
    decode = _linear_flops(st, decode_tokens, decode_tokens)
    decode += _attention_flops(st, fed) - _attention_flops(st, prompt_lens)
    decode += 2 * decode_tokens * st["H"] * st["V"]
    return {
        "generate": prefill + decode,
        "teacher_score": teacher_f,
        "update": 3 * student_fwd + teacher_head,
        "tokens": sum(total),
        "completion_tokens": supervised,
    }


def matmul_rate(rows: int, inner: int, outer: int, dtype: torch.dtype, repeats: int = 50) -> float:
    """Best FLOP/s of `[rows, inner] @ [inner, outer]` on this machine."""
    a = torch.randn(rows, inner, dtype=dtype)
    b = torch.randn(inner, outer, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(10):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = min(best, (time.perf_counter() - start) / repeats)
    return 2 * rows * inner * outer / best


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", default="tiny", choices=("tiny", "large"))
    p.add_argument("--steps", type=int, default=10, help="opd and TRL steps timed (after warm-up)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--teacher-dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--workdir", default=tempfile.gettempdir() + "/opdbench")
    p.add_argument("--trl-runs", type=int, default=3, help="TRL runs, fresh processes")
    p.add_argument("--no-trl", action="store_true", help="compare with the issue's anchor only")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    paths = build(Path(args.workdir) / args.size, args.size, "float32")

    from opd.run.metrics import PhaseTimer
    from opd.run.setup import build_run
    from opd.run.sources import make_micro_batch

    config = opd_config(
        paths, tempfile.mkdtemp(), steps=args.steps + 1, teacher_dtype=args.teacher_dtype
    )
    run = build_run(config)
    batch = make_micro_batch(run, 0, 0, PhaseTimer())
    prompt_lens = batch.attention_mask[:, : batch.prompt_width].sum(-1).tolist()
    completion_lens = batch.loss_mask().sum(-1).tolist()
    flops = count_flops(run.student, run.teacher.model, prompt_lens, completion_lens)
    st, te = _shape(run.student), _shape(run.teacher.model)
    n = flops["tokens"]
    tdtype = getattr(torch, args.teacher_dtype)
    rates = {
        "generate": matmul_rate(BATCH, st["H"], 2 * st["I"], torch.float32),
        "teacher_score": matmul_rate(n, te["H"], 2 * te["I"], tdtype),
        "update": matmul_rate(n, st["H"], 2 * st["I"], torch.float32),
    }
    # The count checked against what PyTorch's FLOP counter sees opd's teacher forward run:
    # opd's last layer still projects q for every token (one joint qkv matmul), which the
    # floor does not charge, so the counter must read the floor plus exactly that.
    from torch.utils.flop_counter import FlopCounterMode

    from opd.objectives.fused import teacher_hidden

    forward = run.config.loss.fused_forward
    teacher_hidden(run.teacher, batch, forward)  # the lean forward's start-up check, uncounted
    with FlopCounterMode(display=False) as counter:
        teacher_hidden(run.teacher, batch, forward)
    counted = sum(
        counter.get_flop_counts()["Global"].get(op, 0)
        for op in (torch.ops.aten.mm, torch.ops.aten.addmm)
    )
    fed, supervised = flops["tokens"] - BATCH, flops["completion_tokens"]
    expected = _linear_flops(te, fed, supervised) + 2 * te["H"] * te["q"] * (fed - supervised)
    print(f"check: teacher linear GFLOP counted {counted / 1e9:.4f}, expected {expected / 1e9:.4f}")
    # The same run: its first timed step (step 0 again) is the warm-up, not counted.
    ours = {k: statistics.mean(v) for k, v in time_steps(run, args.steps + 1).items()}
    if args.no_trl:
        trl_step, trl_label = 0.65, "the issue's anchor"
    else:
        from onpolicy_vs_trl import spawn

        ns = SimpleNamespace(
            size=args.size,
            device="cpu",
            dtype="float32",
            teacher_dtype=args.teacher_dtype,
            steps=args.steps,
            warmup=2,
            threads=args.threads,
            seed=0,
            trl_defaults=False,
            engine="auto",
        )
        runs = [spawn("trl", ns, paths)["steps_per_s"] for _ in range(args.trl_runs)]
        trl_step = 1 / statistics.median(runs)
        trl_label = f"TRL measured now (median of {args.trl_runs} runs)"

    print(
        f"{args.size}: one step of {BATCH} rows, {flops['tokens']} real tokens of which "
        f"{flops['completion_tokens']} sampled; {args.threads} threads; teacher in "
        f"{args.teacher_dtype}, student float32"
    )
    print(f"{'phase':15}{'GFLOP':>8}{'GFLOP/s':>9}{'floor s':>9}{'opd s':>9}{'opd/floor':>11}")
    floor = 0.0
    for phase in ("generate", "teacher_score", "update"):
        f, r = flops[phase], rates[phase]
        floor += f / r
        print(
            f"{phase:15}{f / 1e9:8.2f}{r / 1e9:9.0f}{f / r:9.4f}{ours[phase]:9.4f}"
            f"{ours[phase] / (f / r):11.2f}"
        )
    print(f"{'step':15}{'':17}{floor:9.4f}{ours['total']:9.4f}{ours['total'] / floor:11.2f}")
    print(
        f"\n{trl_label}: {trl_step:.4f} s/step. opd now: {trl_step / ours['total']:.2f}x TRL. "
        f"Highest ratio any loop can reach here (TRL step / floor): {trl_step / floor:.2f}x"
    )


if __name__ == "__main__":
    main()
