"""Fused LM head + divergence against the matmul floor and TRL, side by side.

    python benchmarks/fused_loss.py                 # N=1024, V=151,936, H=512, CPU, all methods
    python benchmarks/fused_loss.py --kinds pg topk --methods floor ours plain check
                                                    # the student side of pg and top-k kd
    python benchmarks/fused_loss.py --quick         # N=256, V=32,768: a minute
    python benchmarks/fused_loss.py --device cuda
    python benchmarks/fused_loss.py --methods ours floor --token-chunk 128   # tuning

Every measurement runs in a fresh subprocess, so one method's freed memory cannot hide
another's peak. "Extra peak" is the peak minus the memory held before the forward (inputs
built): on CPU from /proc/self/status (VmHWM after resetting it through
/proc/self/clear_refs), on CUDA from torch.cuda.max_memory_allocated. It includes the
gradients the step produces (the [V, H] weight gradient is 0.31 GB here). Times are one
forward + backward of the mean over tokens, best of --repeats; "cpu" is the process's CPU
time (all threads) over the same region, a steadier figure when other jobs share the cores.

Methods
  floor        the four unavoidable products: student logits, teacher logits, and the
               student's input and weight gradients (h W^T twice, G W, G^T h), nothing else
  ours         opd.losses.fused_token_divergence
  plain        opd.losses.token_divergence on materialized logits (autograd)
  trl_gkd      TRL 1.16 GKDTrainer.generalized_jsd_loss on materialized logits
  trl_chunked  TRL 1.16 DistillationTrainer's _chunked_divergence_loss (tiled, recompute)
  check        ours vs plain: relative error of the loss and of the gradients (not timed)

Kinds: `jsd` and `reverse_kl` (full-vocabulary kd, both heads); `pg` (the sampled-token
policy gradient: the student's log p of given tokens, `fused_token_logprobs` vs
`token_logprobs` on logits) and `topk` (top-64 + tail kd against fixed teacher top-k:
`fused_sparse_token_divergence` vs `sparse_token_divergence`), whose floor is the student's
three products alone (h W^T, G W, G^T h). TRL has neither, so only ours / plain / check run.

reverse KL is beta=1 for TRL (its convention: beta=1 -> KL(student || teacher)).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

METHODS = ("floor", "ours", "plain", "trl_gkd", "trl_chunked", "check")
KINDS = {"jsd": ("jsd", 0.5), "reverse_kl": ("reverse_kl", 1.0)}  # name -> (ours, TRL beta)
STUDENT_ONLY = ("pg", "topk")  # the student's head alone; the teacher gives per-token numbers
TOPK = 64


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


class PeakMeter:
    """Extra peak memory of one region, in bytes."""

    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.base = _status_kb("VmRSS") * 1024

    def stop(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return _status_kb("VmHWM") * 1024 - self.base


def make_inputs(n: int, v: int, h: int, device: torch.device, seed: int = 0):
    """A student and a teacher that roughly agree (logit std ~2, as in trained LMs)."""
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, h, generator=g)
    ws = torch.randn(v, h, generator=g) * (2.0 / h**0.5)
    ht = hs + 0.5 * torch.randn(n, h, generator=g)
    wt = ws + torch.randn(v, h, generator=g) * (1.0 / h**0.5)
    return [x.to(device) for x in (hs, ws, ht, wt)]


def student_only_fn(method: str, kind: str, inputs):
    """pg / topk: (hs, ws, ht, wt) -> loss; the teacher's per-token numbers are made here,
    before the measured region."""
    from opd.losses import (
        distill_advantages,
        fused_sparse_token_divergence,
        fused_token_logprobs,
        policy_gradient_loss,
        sparse_token_divergence,
    )
    from opd.modeling.hf import token_logprobs

    hs, ws, ht, wt = inputs
    g = torch.Generator().manual_seed(1)
    n, v = hs.shape[0], ws.shape[0]
    ids = torch.randint(v, (n,), generator=g).to(hs.device)
    with torch.no_grad():
        if kind == "pg":
            teacher = (-5 * torch.rand(n, generator=g)).to(hs.device)
        else:
            top = [
                torch.log_softmax(ht[r : r + 128] @ wt.T, -1).topk(TOPK, -1)
                for r in range(0, n, 128)
            ]
            top_lp = torch.cat([t.values for t in top])
            top_ids = torch.cat([t.indices for t in top])
    if method not in ("ours", "plain"):
        raise ValueError(f"{method} has no {kind} variant")
    if kind == "pg":

        def run(hs, ws, ht, wt):
            if method == "ours":
                lp = fused_token_logprobs(hs, ws, ids)
            else:
                lp = token_logprobs(hs @ ws.T, ids)
            adv = distill_advantages(lp[None], teacher[None], torch.ones_like(lp[None]))
            return policy_gradient_loss(lp[None], adv).mean()

        return run

    def run(hs, ws, ht, wt):
        if method == "ours":
            return fused_sparse_token_divergence(hs, ws, top_ids, top_lp, "forward_kl").mean()
        return sparse_token_divergence(hs @ ws.T, top_ids, top_lp, "forward_kl").mean()

    return run


def step_fn(method: str, kind: str, args, inputs=None):
    """A function (hs, ws, ht, wt) -> loss whose backward completes the step."""
    if kind in STUDENT_ONLY:
        return student_only_fn(method, kind, inputs)
    ours_kind, trl_beta = KINDS[kind]
    beta = 0.5 if ours_kind == "jsd" else None
    if method == "ours":
        from opd.losses import fused_token_divergence

        def run(hs, ws, ht, wt):
            return fused_token_divergence(
                hs, ws, ht, wt, ours_kind, beta=beta,
                token_chunk=args.token_chunk, vocab_chunk=args.vocab_chunk or None,
            ).mean()  # fmt: skip

        return run
    if method == "plain":
        from opd.losses import token_divergence

        def run(hs, ws, ht, wt):
            with torch.no_grad():
                lt = ht @ wt.T
            return token_divergence(hs @ ws.T, lt, ours_kind, beta=beta).mean()

        return run
    if method == "trl_gkd":
        from trl.experimental.gkd import GKDTrainer

        def run(hs, ws, ht, wt):
            with torch.no_grad():
                lt = ht @ wt.T
            loss = GKDTrainer.generalized_jsd_loss((hs @ ws.T)[None], lt[None], beta=trl_beta)
            return loss / hs.shape[0]  # batchmean over one row: a sum over tokens

        return run
    if method == "trl_chunked":
        from trl.trainer.distillation_trainer import _chunked_divergence_loss

        def run(hs, ws, ht, wt):
            mask = torch.ones(1, hs.shape[0], dtype=torch.long, device=hs.device)
            return _chunked_divergence_loss(hs[None], ht[None], ws, wt, mask, beta=trl_beta)[0]

        return run
    raise ValueError(method)


def floor1_step(hs, ws, ht, wt):
    """The student's three products alone (pg, topk): logits, G W, G^T h."""
    ls = hs @ ws.T
    return ls, ls @ ws, ls.T @ hs


def floor_step(hs, ws, ht, wt):
    """The four products any head+loss must do, on materialized [N, V] operands."""
    ls = hs @ ws.T
    lt = ht @ wt.T
    dh = ls @ ws  # stands in for G @ W_S (G has the logits' shape)
    dw = lt.T @ hs  # G^T @ h_S
    return ls, lt, dh, dw


def worker(args) -> dict:
    torch.manual_seed(0)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    hs, ws, ht, wt = make_inputs(args.n, args.v, args.hidden, device)
    meter = PeakMeter(device)
    if args.worker == "check":
        return check(args, hs, ws, ht, wt)
    times, cpus, peaks, loss = [], [], [], None
    floor = args.worker in ("floor", "floor1")
    fn = None if floor else step_fn(args.worker, args.kind, args, (hs, ws, ht, wt))
    for _ in range(args.repeats):
        hs.grad = ws.grad = None
        hs.requires_grad_(not floor)
        ws.requires_grad_(not floor)
        meter.start()
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        if floor:
            out = (floor_step if args.worker == "floor" else floor1_step)(hs, ws, ht, wt)
        else:
            value = fn(hs, ws, ht, wt)
            value.backward()
            loss = value.item()
        sync()
        times.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        peaks.append(meter.stop())
        out = value = None  # noqa: F841
    return {
        "time_s": min(times),
        "times_s": times,
        "cpu_s": min(cpus),
        "extra_peak_b": peaks[0],
        "loss": loss,
    }


def check(args, hs, ws, ht, wt) -> dict:
    def grads(method):
        hs_, ws_ = hs.detach().clone().requires_grad_(), ws.detach().clone().requires_grad_()
        value = step_fn(method, args.kind, args, (hs, ws, ht, wt))(hs_, ws_, ht, wt)
        value.backward()
        return value.detach(), hs_.grad, ws_.grad

    ours, plain = grads("ours"), grads("plain")

    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()

    return {
        "loss_ours": ours[0].item(),
        "loss_plain": plain[0].item(),
        "loss_rel_err": rel(ours[0], plain[0]),
        "grad_h_rel_err": rel(ours[1], plain[1]),
        "grad_w_rel_err": rel(ours[2], plain[2]),
    }


def spawn(method: str, kind: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, "--kind", kind]
    for key in ("n", "v", "hidden", "device", "repeats", "threads", "token_chunk", "vocab_chunk"):
        value = getattr(args, key)
        if value is not None:
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=None, help="tokens (default 1024; 256 with --quick)")
    p.add_argument("--v", type=int, default=None, help="vocabulary (151936; 32768 with --quick)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=[*KINDS, *STUDENT_ONLY])
    p.add_argument("--token-chunk", type=int, default=None, help="ours: token_chunk")
    p.add_argument("--vocab-chunk", type=int, default=None, help="ours: vocab_chunk")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--kind", default="jsd", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.n = args.n or (256 if args.quick else 1024)
    args.v = args.v or (32768 if args.quick else 151936)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.token_chunk is None or args.vocab_chunk is None:
        from opd.losses.fused import DEFAULT_TOKEN_CHUNK, DEFAULT_VOCAB_CHUNK

        args.token_chunk = args.token_chunk or DEFAULT_TOKEN_CHUNK
        args.vocab_chunk = args.vocab_chunk or DEFAULT_VOCAB_CHUNK
    if args.worker:
        print(json.dumps(worker(args)))
        return
    print(
        f"N={args.n} V={args.v} H={args.hidden} device={args.device} "
        f"threads={torch.get_num_threads()} torch={torch.__version__} "
        f"ours: token_chunk={args.token_chunk} vocab_chunk={args.vocab_chunk}",
        flush=True,
    )
    results = []
    floors = {}
    if "floor" in args.methods:
        wanted = {
            "floor": set(args.kinds) - set(STUDENT_ONLY),
            "floor1": set(args.kinds) & set(STUDENT_ONLY),
        }
        for name, kinds in wanted.items():
            if not kinds:
                continue
            floor = floors[name] = spawn(name, "jsd", args)
            results.append({"method": name, "kind": "-", **floor})
            print(f"{name:12s} {'-':10s} {floor['time_s']:7.2f} s  1.00x  cpu {floor['cpu_s']:6.2f} s "
                  f"1.00x  {floor['extra_peak_b'] / 1e9:6.2f} GB", flush=True)  # fmt: skip
    for kind in args.kinds:
        floor = floors.get("floor1" if kind in STUDENT_ONLY else "floor")
        for method in args.methods:
            if method == "floor" or (kind in STUDENT_ONLY and method.startswith("trl")):
                continue
            r = spawn(method, kind, args)
            results.append({"method": method, "kind": kind, **r})
            if "error" in r:
                print(f"{method:12s} {kind:10s} error: {r['error']}", flush=True)
            elif method == "check":
                print(f"{'check':12s} {kind:10s} loss rel err {r['loss_rel_err']:.1e}, "
                      f"grad_h {r['grad_h_rel_err']:.1e}, grad_W {r['grad_w_rel_err']:.1e}",
                      flush=True)  # fmt: skip
            else:
                ratio = r["time_s"] / floor["time_s"] if floor else float("nan")
                cpu_ratio = r["cpu_s"] / floor["cpu_s"] if floor else float("nan")
                print(f"{method:12s} {kind:10s} {r['time_s']:7.2f} s  {ratio:4.2f}x  "
                      f"cpu {r['cpu_s']:6.2f} s {cpu_ratio:4.2f}x  "
                      f"{r['extra_peak_b'] / 1e9:6.2f} GB  loss {r['loss']:.6f}", flush=True)  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
