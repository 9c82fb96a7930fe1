"""Intervals over seeds and problems, and the verdict they support. Pure numpy.

A demo comparison is a table `values[seed][problem]`: one value per training seed (each
seed trains its own student: data order, sampling and evaluation draws change) and per
held-out problem (the same problems for every seed and method), or the difference of two
methods' tables, paired by seed index and problem. The mean's variance has three parts,
seed to seed, problem to problem, and what is left (a two-way crossed random-effects
layout, one value per cell):

    Var(mean) = s2_seed / S + s2_problem / P + s2_rest / (S P)
              = (MS_seed + MS_problem - MS_rest) / (S P)

from the three ANOVA mean squares, with Satterthwaite's degrees of freedom for the
Student t quantile. Of `S` seeds only `S - 1` degrees of freedom inform the seed term, so
with two or three seeds the interval is wide, as it should be: a bootstrap over three
seeds (ten distinct resamples) would claim far more than three students can show. With one
seed, or one value per seed, the interval falls back to the one term left and says so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

LEVEL = 0.95
VERDICTS = ("on-policy better", "offline better", "no difference detectable at this budget")
METHOD_TEXT = (
    "95% intervals from a two-way random-effects analysis over seeds and problems "
    "(Var = (MS_seed + MS_problem - MS_rest) / (S P), Satterthwaite degrees of freedom, "
    "Student t quantile): they contain the variance of training itself (seed to seed) "
    "and of the choice of held-out problems; a difference of two methods is taken per "
    "seed index and problem (the two runs of a seed share the data order and the "
    "evaluation draws)."
)


@lru_cache(maxsize=4096)
def t_quantile(p: float, df: float) -> float:
    """Quantile of Student's t with `df` >= 1 degrees of freedom (not necessarily whole).

    With t = sqrt(df) tan(u) the CDF is 1/2 + c * integral_0^u cos(v)^(df - 1) dv, whose
    integrand is smooth and bounded for df >= 1: Simpson's rule in float64, inverted by
    bisection on u. Accurate to about 1e-9 (tests compare with tabulated values)."""
    if not 0.0 < p < 1.0 or not df >= 1.0:
        raise ValueError(f"t_quantile: need 0 < p < 1 and df >= 1, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    if df > 1e7:
        return _normal_quantile(p)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(math.pi)

    def cdf_minus_half(u: float) -> float:
        v = np.linspace(0.0, u, 2001)
        f = np.exp(log_c + (df - 1) * np.log(np.maximum(np.cos(v), 1e-300)))
        return float(u / 6000 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum()))

    lo, hi = 0.0, math.pi / 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf_minus_half(mid) < p - 0.5 else (lo, mid)
    return math.sqrt(df) * math.tan((lo + hi) / 2)


def _normal_quantile(p: float) -> float:
    lo, hi = -40.0, 40.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if 0.5 * math.erfc(-mid / math.sqrt(2)) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def interval(values: Sequence[Sequence[float]], bounds: tuple[float, float] | None = None) -> dict:
    """Mean of `values[seed][problem]` and its 95% interval (see the module docstring).

    Returns `mean`, `ci95` (clipped to `bounds`, e.g. (0, 1) for a rate), `df`, `seeds`,
    `problems`, `per_seed` (each seed's mean over problems), `sd_seed` (spread of the
    per-seed means), `var_problem` (the problem term, s2_problem / P, which more seeds do
    not shrink) and `parts`: which variance terms the interval holds ("seed", "problem");
    NaN bounds where nothing can be estimated."""
    y = np.asarray(values, dtype=np.float64)
    if y.ndim != 2 or y.size == 0:
        raise ValueError(f"interval: need a non-empty [seeds, problems] table, got shape {y.shape}")
    if not np.isfinite(y).all():
        raise ValueError("interval: the table holds a NaN or infinite value")
    s, p = y.shape
    mean = float(y.mean())
    seed_means, problem_means = y.mean(axis=1), y.mean(axis=0)
    out = {
        "mean": mean,
        "seeds": s,
        "problems": p,
        "per_seed": [float(v) for v in seed_means],
        "sd_seed": float(seed_means.std(ddof=1)) if s > 1 else float("nan"),
        "var_problem": 0.0,
    }
    if s > 1 and p > 1:
        ms_seed = p * float(((seed_means - mean) ** 2).sum()) / (s - 1)
        ms_problem = s * float(((problem_means - mean) ** 2).sum()) / (p - 1)
        rest = y - seed_means[:, None] - problem_means[None, :] + mean
        ms_rest = float((rest**2).sum()) / ((s - 1) * (p - 1))
        terms = [(ms_seed, s - 1), (ms_problem, p - 1), (-ms_rest, (s - 1) * (p - 1))]
        total = ms_seed + ms_problem - ms_rest
        # A variance component estimated below zero is taken as zero: the variance is then
        # at least what the seed term or the problem term alone shows.
        for ms, dof in ((ms_seed, s - 1), (ms_problem, p - 1)):
            if ms > total:
                total, terms = ms, [(ms, dof)]
        var, parts = total / (s * p), ["seed", "problem"]
        out["var_problem"] = max(ms_problem - ms_rest, 0.0) / (s * p)
        denom = sum(m * m / d for m, d in terms)
        df = total * total / denom if denom > 0 else float(s - 1)
    elif s > 1:  # one value per seed: a t interval over seeds
        var, df, parts = float(seed_means.var(ddof=1)) / s, float(s - 1), ["seed"]
    elif p > 1:  # one seed: over problems only, training variance not in it
        var, df, parts = float(problem_means.var(ddof=1)) / p, float(p - 1), ["problem"]
    else:
        return {**out, "ci95": [float("nan")] * 2, "df": float("nan"), "parts": []}
    half = t_quantile(0.5 + LEVEL / 2, max(df, 1.0)) * math.sqrt(max(var, 0.0))
    lo, hi = mean - half, mean + half
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return {**out, "ci95": [lo, hi], "df": df, "parts": parts}


def difference(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> dict:
    """`interval` of a - b, paired by seed index and problem (same shapes required)."""
    ya, yb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if ya.shape != yb.shape:
        raise ValueError(f"difference: tables of shapes {ya.shape} and {yb.shape} do not pair")
    return interval(ya - yb)


def verdict(diff: dict) -> str:
    """On-policy minus offline: which is better, or that this budget cannot tell."""
    lo, hi = diff["ci95"]
    if "seed" not in diff["parts"] or not (math.isfinite(lo) and math.isfinite(hi)):
        return VERDICTS[2]  # one seed says nothing about a change of seed
    if lo > 0:
        return VERDICTS[0]
    if hi < 0:
        return VERDICTS[1]
    return VERDICTS[2]


def seeds_needed(effect: float, diff: dict, power: float = 0.8, limit: int = 10_000) -> int | None:
    """Seeds per method for a two-sided 5% test to find a true difference of `effect` with
    probability `power`, given the seed-to-seed and problem-to-problem spread measured in
    `diff` (an `interval` of per-seed differences over the same problems).

    The seed term shrinks with more seeds, the problem term does not (the same problems):
    None when the problem term alone hides `effect`, or beyond `limit` seeds."""
    if not math.isfinite(effect) or effect == 0 or diff["seeds"] < 2:
        return None
    sd, var_problem = diff["sd_seed"], diff["var_problem"]
    z_inf = _normal_quantile(0.5 + LEVEL / 2) + _normal_quantile(power)
    if z_inf * math.sqrt(var_problem) >= abs(effect):
        return None  # no number of seeds gets past the problem term
    # t quantiles shrink with n: search upward from the normal-theory answer's lower bound
    start = max(2, int(z_inf**2 * sd * sd / (effect * effect - z_inf**2 * var_problem)))
    for n in range(start, limit + 1):
        z = t_quantile(0.5 + LEVEL / 2, n - 1) + t_quantile(power, n - 1)
        if z * math.sqrt(sd * sd / n + var_problem) <= abs(effect):
            return n
    return None
