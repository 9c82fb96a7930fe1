"""Step time with a slow remote teacher: 1, 2 and 3 replicas, overlap on and off, failover.

    python benchmarks/teacher_fleet.py                  # teacher latency 4x the student's cost
    python benchmarks/teacher_fleet.py --ratio 1        # latency equal to the student's cost
    python benchmarks/teacher_fleet.py --steps 8 --micro 4

Two CPU cores cannot show a GPU teacher's compute scaling, so each replica emulates one: an
`opd serve` app in its own process (tiny teacher) whose batcher first sleeps `positions x c` seconds
while holding a per-replica lock, i.e. a server that scores `1/c` positions a second and
works on one request at a time (a compute-bound prefill). A fixed per-request sleep with no
lock would model a server with infinite capacity, where replicas could not matter. `c` is
calibrated so that scoring one micro-batch on one replica takes `--ratio` times the
student's measured forward + backward of that micro-batch. This emulation is a benchmark
option only; `opd serve` has none.

Each configuration trains `--steps` steps of `supervised_kd` (top-k, dataset completions, so
no sampling time) with `--micro` micro-batches per step; the first step is not timed. Printed
per configuration: mean step seconds, the teacher wait per step (`time_teacher_score`: how
long the loop waited for scores), and the ratios the issue sets goals for: the share of the
serial teacher wait that overlap hides, and how much 2 and 3 replicas cut the wait. Then a
failover: 2 replicas, one stops answering (its requests hang) at step 3; with
`teacher.timeout_s` = T, that step's extra time over the later steps of the same run (on the
survivor alone: the hung replica's health checks keep failing) is compared with T. The
structure bounds it below T: the micro-batch's half sent to the hung replica is moved to the
survivor as soon as it times out, and the survivor, done with its own half by then, scores
it in about half the time it would have taken for the whole micro-batch alone, so the
step's extra is about T minus half a micro-batch's scoring.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from opd.cli.demo.tiny import save_tiny_pair
from opd.config.parse import config_from_dict
from opd.modeling.hf import load_causal_lm, load_tokenizer
from opd.run.loop import train
from opd.run.metrics import read_metrics
from opd.teachers.remote import RemoteTeacher
from opd.teachers.server.app import BackgroundServer, ServeSettings, TeacherService, create_app
from opd.teachers.server.protocol import Limits

LIMITS = Limits(max_seq_len=256, max_seqs_per_request=256, max_topk=16, max_batch_tokens=8192)


class SlowReplica:
    """An `opd serve` process whose scoring costs `seconds_per_position` per position, one
    request at a time (this script run with `--serve`); `hang()` makes every later request
    wait forever, as a server stuck on a GPU fault would."""

    def __init__(self, teacher_dir: Path, seconds_per_position: float, workdir: Path):
        self.control = workdir / f"replica-{time.monotonic_ns()}"
        cmd = [sys.executable, __file__, "--serve", str(teacher_dir)]
        cmd += ["--cost", repr(seconds_per_position), "--control", str(self.control)]
        env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
        with open(f"{self.control}.log", "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        url_file, deadline = Path(f"{self.control}.url"), time.monotonic() + 120
        while not url_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"replica did not start; see {self.control}.log")
            time.sleep(0.1)
        self.url = url_file.read_text()

    def hang(self) -> None:
        Path(f"{self.control}.hang").touch()

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def serve_slow(teacher_dir: str, cost: float, control: str) -> None:
    """The replica process: an in-process `opd serve` app with the emulated cost."""
    service = TeacherService(
        load_causal_lm(teacher_dir),
        load_tokenizer(teacher_dir),
        name="t",
        limits=LIMITS,
        batch_wait_ms=1,
    )
    real, lock, hang = service.batcher.submit, None, Path(f"{control}.hang")

    async def submit(work):
        nonlocal lock
        lock = lock or asyncio.Lock()
        if hang.exists():
            await asyncio.sleep(3600)
        async with lock:  # one request at a time, as a busy GPU
            await asyncio.sleep(cost * sum(len(s) - b for s, b in zip(work.seqs, work.starts)))
        return await real(work)

    service.batcher.submit = submit
    settings = ServeSettings(model=teacher_dir, port=0, limits=LIMITS, graceful_timeout_s=1)
    server = BackgroundServer(create_app(service), settings).start()
    Path(f"{control}.url.tmp").write_text(server.url)
    os.replace(f"{control}.url.tmp", f"{control}.url")
    while True:
        time.sleep(3600)


def write_data(path: Path, rows: int, completion_len: int) -> Path:
    rng = random.Random(0)
    with path.open("w") as fh:
        for _ in range(rows):
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            body = f"{a}+{b}={a + b}; " * 40
            fh.write(
                json.dumps({"prompt": f"{a}+{b}=", "completion": body[:completion_len]}) + "\n"
            )
    return path


def config(args, root: Path, name: str, teacher: dict, steps: int):
    return config_from_dict(
        {
            "preset": "supervised_kd",
            "student": {"path": str(root / "student")},
            "teacher": {"kind": "remote", "max_retries": 2, **teacher},
            "data": {
                "train": str(root / "train.jsonl"),
                "max_prompt_tokens": 16,
                "max_completion_tokens": args.completion_len,
            },
            "loss": {"estimator": "topk", "topk": 8},
            "steps": steps,
            "batch_size": args.rows * args.micro,
            "micro_batch_size": args.rows,
            "save_every": 0,
            "output_dir": str(root / "runs" / name),
            "device": "cpu",
        }
    )


def timed(records) -> tuple[float, float]:
    """Mean step seconds and teacher-wait seconds, the first (warm-up) step left out."""
    rest = records[1:]
    return (
        statistics.mean(r["time_step"] for r in rest),
        statistics.mean(r["time_teacher_score"] for r in rest),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ratio", type=float, default=4.0, help="teacher latency / student cost")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--micro", type=int, default=4, help="micro-batches per step")
    p.add_argument("--rows", type=int, default=6, help="rows per micro-batch")
    p.add_argument("--completion-len", type=int, default=96)
    p.add_argument("--student-hidden", type=int, default=256)
    p.add_argument("--timeout", type=float, default=3.0, help="teacher.timeout_s (failover)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the trainer and of each replica: more than 1 on a shared "
        "2-core box lets OpenMP barriers stall for seconds when other processes run",
    )
    p.add_argument("--serve", help=argparse.SUPPRESS)  # internal: run one emulated replica
    p.add_argument("--cost", type=float, help=argparse.SUPPRESS)
    p.add_argument("--control", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.serve:
        return serve_slow(args.serve, args.cost, args.control)
    logging.getLogger("opd").setLevel(logging.ERROR)
    root = Path(tempfile.mkdtemp(prefix="opd-fleet-"))
    teacher_dir, _ = save_tiny_pair(
        root, student_kw={"hidden": args.student_hidden, "layers": 4, "heads": 4}
    )
    write_data(root / "train.jsonl", 256, args.completion_len)

    # Calibrate: the student's forward + backward per micro-batch, against a free teacher.
    free = SlowReplica(teacher_dir, 0.0, root)
    cal = config(args, root, "calibrate", {"url": free.url, "overlap": False}, 4)
    train(cal)
    records = read_metrics(cal.output_dir)
    student_s = statistics.mean(r["time_update"] for r in records[1:]) / args.micro
    positions = statistics.mean(r["teacher_tokens_scored"] for r in records) / args.micro
    free.stop()
    cost = args.ratio * student_s / positions
    print(
        f"student forward+backward per micro-batch {student_s * 1e3:.0f} ms; emulated teacher "
        f"{cost * 1e6:.0f} us/position -> {args.ratio * student_s * 1e3:.0f} ms per "
        f"micro-batch on one replica (ratio {args.ratio:g})"
    )

    replicas = [SlowReplica(teacher_dir, cost, root) for _ in range(3)]
    urls = [r.url for r in replicas]
    results = {}
    print(f"{'replicas':>8} {'overlap':>7} {'step s':>8} {'teacher wait s':>15}")
    for n in (1, 2, 3):
        for overlap in (False, True):
            name = f"r{n}-{'on' if overlap else 'off'}"
            cfg = config(args, root, name, {"urls": urls[:n], "overlap": overlap}, args.steps)
            train(cfg)
            results[n, overlap] = timed(read_metrics(cfg.output_dir))
            step, wait = results[n, overlap]
            print(f"{n:>8} {'on' if overlap else 'off':>7} {step:>8.3f} {wait:>15.3f}")
    # the ratio the runs saw (the calibration is one short run: load on the box shifts it)
    serial = read_metrics(root / "runs" / "r1-off")[1:]
    update = statistics.mean(r["time_update"] for r in serial)
    print(f"measured: teacher wait / student update on 1 replica, serial = {results[1, False][1] / update:.2f}")
    for n in (1, 2, 3):
        hidden = 1 - results[n, True][1] / results[n, False][1]
        print(f"{n} replica(s): overlap hides {hidden:.0%} of the serial teacher wait")
    for n in (2, 3):
        print(
            f"{n} replicas cut the serial teacher wait {results[1, False][1] / results[n, False][1]:.2f}x"
            f" (with overlap: step time {results[1, True][0] / results[n, True][0]:.2f}x)"
        )

    # Failover: a replica hangs at step 3; its requests time out once, then go elsewhere.
    fresh = [SlowReplica(teacher_dir, cost, root) for _ in range(2)]
    teacher = {"urls": [r.url for r in fresh], "timeout_s": args.timeout}
    cfg = config(args, root, "failover", teacher, max(args.steps, 6))
    real, calls = RemoteTeacher.score, {"n": 0}

    def score(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2 * args.micro + 1:
            fresh[1].hang()
        return real(self, *a, **kw)

    RemoteTeacher.score = score
    try:
        train(cfg)
    finally:
        RemoteTeacher.score = real
    records = read_metrics(cfg.output_dir)
    hit = next(i for i, r in enumerate(records) if r["teacher_failovers"])
    took = records[hit]["time_step"]
    before = [r["time_step"] for r in records[1:hit]]  # both replicas answering
    after = [r["time_step"] for r in records[hit + 1 :]]  # the survivor alone, same run
    alone = statistics.median(after)
    print(
        f"failover at step {hit + 1} (teacher.timeout_s={args.timeout:g}): the step took "
        f"{took:.2f} s; steps before it (2 replicas) {statistics.mean(before):.2f} s, after it "
        f"(the survivor alone, median of {len(after)}) {alone:.2f} s: +{took - alone:.2f} s = "
        f"{(took - alone) / args.timeout:.2f} x timeout over the survivor alone; against "
        f"the separate 1-replica run ({results[1, True][0]:.2f} s): "
        f"{(took - results[1, True][0]) / args.timeout:.2f} x (failovers "
        f"{sum(r['teacher_failovers'] for r in records)}, healthy after: "
        f"{[r['teacher_replicas_healthy'] for r in records[hit + 1 :]]})"
    )
    for r in (*replicas, *fresh):
        r.stop()


if __name__ == "__main__":
    main()
