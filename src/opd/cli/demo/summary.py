"""From per-seed runs to what the report says: intervals, comparisons, verdicts, costs.

Pure Python over the `results` dict that `opd demo` writes (no torch, no models), so the
statistics of a finished run can be recomputed from its `results.json`. Each method's
`runs` holds one entry per training seed; the held-out problems are the same for every
seed and method, so tables are `[seed][problem]` and two methods pair by seed and problem.
"""

from __future__ import annotations

import math

from opd.cli.demo import stats

FORCED = ("clean_error", "fix_after_slip", "carry_on")
AMORTIZE_OVER = (1, 3, 10)  # students trained from one stored teacher dataset


def by_length(run: dict, n) -> dict:
    """`by_length` keys are ints in memory and strings after a JSON round trip."""
    table = run["by_length"]
    return table[n] if n in table else table[str(n)]


def per_problem(m: dict, n, key: str = "sampled") -> list[list[float]]:
    """`[seed][problem]` answer accuracies of a method at length `n` (`n=None`: all)."""
    lengths = [n] if n is not None else None
    out = []
    for run in m["runs"]:
        ns = lengths or list(run["by_length"])
        out.append([v for k in ns for v in by_length(run, k)[f"{key}_per_problem"]])
    return out


def _per_seed(m: dict, get) -> list[list[float]]:
    """One value per seed (`[[v], ...]`), the seeds where it is defined (not NaN)."""
    values = [get(run) for run in m["runs"]]
    return [[float(v)] for v in values if v is not None and math.isfinite(v)]


def _interval_or_none(table: list[list[float]], bounds=None) -> dict | None:
    return stats.interval(table, bounds) if table and table[0] else None


RATE = (0.0, 1.0)  # accuracies and probabilities: intervals clipped to [0, 1]


def method_summary(m: dict, lengths: list[int]) -> dict:
    """Every figure of one method (or reference) across its seeds, with intervals."""
    out: dict = {"by_length": {}, "forced": {}, "own_slips": {}}
    for n in lengths:
        out["by_length"][n] = {
            f"{key}_accuracy": stats.interval(per_problem(m, n, key), RATE)
            for key in ("sampled", "greedy")
        }
        out["by_length"][n]["sampled_all_steps"] = stats.interval(
            per_problem(m, n, "all_steps"), RATE
        )
        out["own_slips"][n] = {
            k: _interval_or_none(
                _per_seed(m, lambda r, k=k, n=n: by_length(r, n)["own_slips"][k]),
                None if k == "corrections_per_problem" else RATE,
            )
            for k in ("p_wrong_after_wrong", "p_wrong_after_right", "corrections_per_problem")
        }
    out["overall"] = stats.interval(per_problem(m, None), RATE)
    for k in FORCED:
        out["forced"][k] = stats.interval([run["forced"][k] for run in m["runs"]], RATE)
    for k in ("from_corrupted_sampled", "from_corrupted_greedy"):
        out[k] = stats.interval([run[k] for run in m["runs"]], RATE)
    gaps = [run["exposure"]["tvd"]["gap"] for run in m["runs"] if "exposure" in run]
    if gaps:
        width = min(len(g) for g in gaps)
        out["exposure_gap_tvd"] = {
            "mean": [sum(g[j] for g in gaps) / len(gaps) for j in range(width)],
            "min": [min(g[j] for g in gaps) for j in range(width)],
            "max": [max(g[j] for g in gaps) for j in range(width)],
        }
    return out


def pairs(results: dict) -> list[tuple[str, str]]:
    """Every (on-policy, offline) pair of the methods that ran, in run order."""
    methods = results["methods"]
    live = [n for n, m in methods.items() if not m["offline"]]
    stored = [n for n, m in methods.items() if m["offline"]]
    return [(a, b) for a in live for b in stored]


def _diff(table_a, table_b, single_seed_effect: bool = True) -> dict:
    d = stats.difference(table_a, table_b)
    d["verdict"] = stats.verdict(d)
    if single_seed_effect:
        # what a one-seed demo would have reported, and the seeds it takes to see it
        d["first_seed"] = d["per_seed"][0]
        d["seeds_needed"] = stats.seeds_needed(d["first_seed"], d)
    return d


def compare(results: dict, a: str, b: str) -> dict:
    """`a` (on-policy) minus `b` (offline): accuracy per length and overall, with verdicts,
    and the mechanisms: slipping less (per-step error on clean prefixes), recovering
    (P(wrong | own previous step wrong), p(correction) after a forced slip) and the
    corrections written in its own samples, each across seeds."""
    lengths = results["settings"]["lengths"]
    ma, mb = results["methods"][a], results["methods"][b]
    out: dict = {"on_policy": a, "offline": b, "by_length": {}}
    for n in lengths:
        out["by_length"][n] = _diff(per_problem(ma, n), per_problem(mb, n))
    out["overall"] = _diff(per_problem(ma, None), per_problem(mb, None))
    longest = max(lengths)
    mech: dict = {}
    for k in ("clean_error", "fix_after_slip"):
        mech[k] = _diff(
            [r["forced"][k] for r in ma["runs"]], [r["forced"][k] for r in mb["runs"]], False
        )
    for k in ("p_wrong_after_wrong", "corrections_per_problem"):
        va = [by_length(r, longest)["own_slips"][k] for r in ma["runs"]]
        vb = [by_length(r, longest)["own_slips"][k] for r in mb["runs"]]
        both = [([x], [y]) for x, y in zip(va, vb, strict=True) if _finite(x) and _finite(y)]
        mech[k] = _diff([x for x, _ in both], [y for _, y in both], False) if len(both) else None
    out["mechanisms"] = mech
    out["carried_by"] = carried_by(out["overall"], mech)
    return out


def _finite(x) -> bool:
    return x is not None and math.isfinite(x)


# Per mechanism: the sign of (on-policy - offline) that favours on-policy.
FAVOURS_ON_POLICY = {
    "clean_error": -1,  # slips less
    "p_wrong_after_wrong": -1,  # stays wrong less often after its own slip
    "fix_after_slip": +1,  # writes the correction after a forced slip
    "corrections_per_problem": +1,
}
MECHANISM_NAMES = {
    "clean_error": "per-step error on clean prefixes (slipping less)",
    "p_wrong_after_wrong": "P(wrong after its own wrong step) (recovering)",
    "fix_after_slip": "p(correction) after a forced slip",
    "corrections_per_problem": "corrections written per problem",
}


def carried_by(overall: dict, mech: dict) -> list[str]:
    """The mechanisms whose across-seed interval excludes zero on the side of the method
    that is more accurate overall (empty when accuracy has no verdict)."""
    if overall["verdict"] == stats.VERDICTS[2]:
        return []
    sign = 1 if overall["verdict"] == stats.VERDICTS[0] else -1
    out = []
    for k, d in mech.items():
        if d is None:
            continue
        lo, hi = d["ci95"]
        favoured = FAVOURS_ON_POLICY[k] * sign
        if "seed" in d["parts"] and ((favoured > 0 and lo > 0) or (favoured < 0 and hi < 0)):
            out.append(k)
    return out


def costs(results: dict) -> dict:
    """Per method, across seeds: teacher tokens, teacher / sampling / update / wall
    seconds (offline: the one-time store, amortized over 1, 3, 10 students)."""
    offline = results["offline_data"]
    one_time = offline["teacher_tokens_generated"] + offline["teacher_tokens_scored"]
    out = {}
    for name, m in results["methods"].items():
        rows = []
        for run in m["runs"]:
            sec, tot = run["totals"]["seconds"], run["totals"]
            rows.append(
                {
                    "teacher_tokens": tot["teacher_tokens_generated"]
                    + tot["teacher_tokens_scored"],
                    "teacher_s": sec.get("time_teacher_generate", 0.0)
                    + sec.get("time_teacher_score", 0.0),
                    "sampling_s": sec.get("time_generate", 0.0),
                    "update_s": sec.get("time_update", 0.0),
                    "wall_s": run["train_seconds"],
                }
            )
        mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
        spread = {k: (min(r[k] for r in rows), max(r[k] for r in rows)) for k in rows[0]}
        if m["offline"]:
            mean["teacher_tokens"], mean["teacher_s"] = one_time, offline["seconds"]
            spread["teacher_tokens"] = (one_time, one_time)
        amortized = {
            k: (mean["teacher_tokens"] / k if m["offline"] else mean["teacher_tokens"])
            for k in AMORTIZE_OVER
        }
        out[name] = {"mean": mean, "range": spread, "per_student": amortized}
    return out


def equal_cost(results: dict) -> list[dict]:
    """Accuracy (mixed lengths, sampled, the training curve's probe) of each method having
    spent the same teacher tokens, and the same wall seconds, across seeds. The budget is
    the offline store's cost shared by k students: offline methods have then finished;
    an on-policy run is read at its last evaluation within the budget. Per seed, then an
    interval over seeds."""
    offline = results["offline_data"]
    one_time = offline["teacher_tokens_generated"] + offline["teacher_tokens_scored"]
    rows = []
    for k in AMORTIZE_OVER:
        tok_budget = one_time / k
        row: dict = {"students": k, "teacher_tokens": tok_budget, "methods": {}}
        for name, m in results["methods"].items():
            row["methods"][name] = _at_budget(m, "teacher_tokens", tok_budget)
        rows.append(row)
    # Equal wall seconds: the offline store's time shared by k students plus the slowest
    # offline method's training (the curve's clock, evaluations left out), so every offline
    # method has finished; on-policy runs are read within that time on the same clock.
    for k in AMORTIZE_OVER:
        store_s = offline["seconds"] / k
        spent = [
            store_s + sum(r["curve"][-1]["wall_seconds"] for r in m["runs"]) / len(m["runs"])
            for m in results["methods"].values()
            if m["offline"]
        ]
        if not spent:
            break
        row = {"students": k, "wall_seconds": max(spent), "methods": {}}
        for name, m in results["methods"].items():
            offset = store_s if m["offline"] else 0.0
            row["methods"][name] = _at_budget(m, "wall_seconds", max(spent), offset)
        rows.append(row)
    return rows


def _at_budget(m: dict, key: str, budget: float, offset: float = 0.0) -> dict | None:
    """Per seed, the last curve point within `budget` (offline methods always finish
    within a token budget: they spend the store, not tokens, during training)."""
    values, steps = [], []
    for run in m["runs"]:
        if m["offline"] and key == "teacher_tokens":
            within = run["curve"]
        else:
            within = [p for p in run["curve"] if offset + p[key] <= budget]
        if not within:
            return None
        values.append([within[-1]["sampled_accuracy"]])
        steps.append(within[-1]["step"])
    return {"accuracy": stats.interval(values, RATE), "steps": steps}


def summarize_all(results: dict) -> dict:
    """Everything the report prints, computed from the per-seed runs."""
    lengths = results["settings"]["lengths"]
    entries = {**{f"*{k}*": v for k, v in results["references"].items()}, **results["methods"]}
    return {
        "method": stats.METHOD_TEXT,
        "entries": {name: method_summary(m, lengths) for name, m in entries.items()},
        "comparisons": [compare(results, a, b) for a, b in pairs(results)],
        "costs": costs(results),
        "equal_cost": equal_cost(results),
    }
