"""What `cross_tokenizer.py` measures on a model, with the demo's own probes, and the
statistics over seeds.

Accuracy: answer exact match on held-out problems (`opd.cli.demo.probes.make_eval_sets`,
the demo's lengths and problems in the `full` setting), sampled at T=1 with `samples`
completions per problem and greedy, by `opd.cli.demo.probes.generate` / `score_texts`
with the sampling seed `seed + length` the demo's `measure` uses: the same code and
numbers the demo's "answer accuracy" tables are made of. Every model (the student before,
each run's student after, GOLD's, either teacher in its own tokenizer) goes through it.

Statistics (`opd.cli.demo.stats.interval`, the demo's two-way seed x problem analysis):
a run's gain is the table `after[seed][problem] - before[seed][problem]` (the student
before is measured with each seed's sampling draws); the goal test "cross gain >= 0.9 x
same gain" is the paired table `gain_x - 0.9 gain_same` (paired by seed and problem),
whose 95% interval lying above 0 shows the goal and below 0 refutes it. The ratio of
gains is also given per seed (`gain_x / gain_same` of the seed means) with a Student t
interval over seeds.
"""

from __future__ import annotations

import math
import statistics

import numpy as np

from opd.cli.demo import probes
from opd.cli.demo.stats import interval, t_quantile

GOAL = 0.9


def accuracy(model, encoder, eval_sets: dict, samples: int, seed: int, max_new: int) -> dict:
    """Per length: per-problem sampled (mean of `samples` draws) and greedy answer accuracy."""
    model.eval()
    out = {}
    for n, rows in eval_sets.items():
        kw = {"seed": seed + n, "max_new_tokens": max_new}
        _, _, texts = probes.generate(model, encoder, rows, samples=samples, temperature=1.0, **kw)
        _, _, greedy = probes.generate(model, encoder, rows, samples=1, temperature=0.0, **kw)
        out[n] = {
            "sampled": probes.score_texts(texts, rows, samples)["answer"],
            "greedy": probes.score_texts(greedy, rows, 1)["answer"],
        }
    return out


def flat(acc: dict, kind: str) -> list[float]:
    """Every problem's value, lengths in order (one row of a seed x problem table)."""
    return [v for n in sorted(acc) for v in acc[n][kind]]


def mean_of(acc: dict, kind: str) -> float:
    return float(np.mean(flat(acc, kind)))


def _fmt(iv: dict) -> str:
    lo, hi = iv["ci95"]
    return f"{iv['mean']:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def t_interval(values: list[float]) -> dict:
    """Mean and 95% Student t interval over seeds (NaN bounds with one value)."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return {"mean": mean, "ci95": [math.nan, math.nan], "n": len(values)}
    half = t_quantile(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": len(values)}


def summarize(before: dict, after: dict[str, dict], refs: dict[str, str]) -> dict:
    """`before[seed]`, `after[name][seed]`: `accuracy` results. `refs` maps a run to the runs
    its gain is a share of (`permuted` -> [`same`], `permuted_rkl` -> [`same_rkl`]); a ratio
    pairs the seeds both have."""
    out: dict = {}
    gains: dict[str, dict[str, dict[int, np.ndarray]]] = {}
    for name, runs in after.items():
        out[name] = {"seeds": sorted(runs)}
        gains[name] = {}
        for kind in ("sampled", "greedy"):
            g = {s: np.array(flat(a, kind)) - np.array(flat(before[s], kind)) for s, a in runs.items()}
            gains[name][kind] = g
            iv = interval(np.array([g[s] for s in sorted(g)]))
            out[name][kind] = {
                "after": float(np.mean([mean_of(a, kind) for a in runs.values()])),
                "gain": _fmt(iv),
                "gain_mean": iv["mean"],
                "gain_per_seed": [round(v, 4) for v in iv["per_seed"]],
            }
    for name, ref in ((n, r) for n, rs in refs.items() for r in rs):
        if name not in gains or ref not in gains:
            continue
        for kind in ("sampled", "greedy"):
            common = sorted(set(gains[name][kind]) & set(gains[ref][kind]))
            gx = np.array([gains[name][kind][s] for s in common])
            gs = np.array([gains[ref][kind][s] for s in common])
            ratios = [float(x.mean() / s.mean()) for x, s in zip(gx, gs, strict=True)]
            goal = interval(gx - GOAL * gs)
            out[name][kind][f"vs_{ref}"] = (
                {
                    "ratio_seeds": common,
                    "ratio_of_means": float(gx.mean() / gs.mean()),
                    "ratio_per_seed": [round(r, 3) for r in ratios],
                    "ratio_t95": _fmt(t_interval(ratios)) if all(map(math.isfinite, ratios)) else "n/a",
                    f"gain_minus_{GOAL}x_{ref}": _fmt(goal),
                    "goal": "shown" if goal["ci95"][0] > 0 else "refuted" if goal["ci95"][1] < 0 else "not shown",
                }
            )  # fmt: skip
    return out
