"""The demo's outputs: report.md (verdicts, tables, readings), results.json, and plots.

Every figure is across the training seeds, with the intervals of `opd.cli.demo.stats` (over
seeds and problems); `opd.cli.demo.summary` computes them from the per-seed runs."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

from opd.cli.demo import plots
from opd.cli.demo.summary import AMORTIZE_OVER, FORCED, MECHANISM_NAMES, summarize_all


def _ci(s: dict | None, digits: int = 3) -> str:
    if s is None:
        return "n/a"
    lo, hi = s["ci95"]
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} [{lo:.{digits - 1}f}, {hi:.{digits - 1}f}]"


def _signed(s: dict) -> str:
    lo, hi = s["ci95"]
    return f"{s['mean']:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def _by(table: dict, n):
    return table[n] if n in table else table[str(n)]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def verdict_section(results: dict, summary: dict) -> list[str]:
    lengths = results["settings"]["lengths"]
    lines: list[str] = []
    for c in summary["comparisons"]:
        a, b = c["on_policy"], c["offline"]
        lines += [f"### {a} minus {b}", ""]
        rows = []
        for label, d in [(f"{n} steps", _by(c["by_length"], n)) for n in lengths] + [
            ("all lengths", c["overall"])
        ]:
            need = d.get("seeds_needed")
            rows.append(
                [
                    label,
                    _signed(d),
                    f"**{d['verdict']}**",
                    " / ".join(f"{v:+.3f}" for v in d["per_seed"]),
                    f"{d['sd_seed']:.3f}" if math.isfinite(d["sd_seed"]) else "n/a",
                    f"{d['first_seed']:+.3f}: "
                    + (f"{need} seeds" if need else "more problems needed (their spread hides it)"),
                ]
            )
        lines += _table(
            [
                "length",
                "difference in sampled answer accuracy [95% CI]",
                "verdict",
                "per seed",
                "seed sd",
                "first seed's difference: seeds to see it (80% power)",
            ],
            rows,
        )
        lines += ["", "Mechanisms (on-policy minus offline, across seeds):", ""]
        mech_rows = []
        for k, d in c["mechanisms"].items():
            if d is None:
                mech_rows.append([MECHANISM_NAMES[k], "n/a", "", ""])
                continue
            mech_rows.append(
                [
                    MECHANISM_NAMES[k],
                    _signed(d),
                    " / ".join(f"{v:+.3f}" for v in d["per_seed"]),
                    d["verdict"]
                    .replace("on-policy better", "on-policy higher")
                    .replace("offline better", "offline higher"),
                ]
            )
        lines += _table(["mechanism", "difference [95% CI]", "per seed", "interval"], mech_rows)
        carried = c["carried_by"]
        if c["overall"]["verdict"].startswith("no difference"):
            lines += ["", "No overall verdict, so no mechanism carries one."]
        elif carried:
            lines += ["", "Carried by: " + "; ".join(MECHANISM_NAMES[k] for k in carried) + "."]
        else:
            lines += ["", "No mechanism's difference is detectable on its own at this budget."]
        lines.append("")
    return lines


def accuracy_table(summary: dict, lengths, key: str = "sampled_accuracy") -> list[str]:
    rows = [
        [name] + [_ci(_by(s["by_length"], n)[key]) for n in lengths]
        for name, s in summary["entries"].items()
    ]
    return _table(["method"] + [f"{n} steps" for n in lengths], rows)


def situation_table(summary: dict) -> list[str]:
    rows = [
        [name, _ci(s["from_corrupted_sampled"]), _ci(s["from_corrupted_greedy"])]
        + [_ci(s["forced"][k]) for k in FORCED]
        for name, s in summary["entries"].items()
    ]
    header = [
        "model",
        "answer acc. from a slipped prefix (T=1)",
        "same, greedy",
        "per-step error, clean prefix",
        "p(correction) after a forced slip",
        "p(no correction written) after a forced slip",
    ]
    return _table(header, rows)


def chain_table(summary: dict, lengths) -> list[str]:
    longest = max(lengths)
    rows = []
    for name, s in summary["entries"].items():
        own = _by(s["own_slips"], longest)
        per_len = " / ".join(
            _ci(_by(s["own_slips"], n)["p_wrong_after_wrong"], 2).split(" ")[0] for n in lengths
        )
        rows.append(
            [
                name,
                _ci(own["p_wrong_after_right"]),
                _ci(own["p_wrong_after_wrong"]),
                per_len,
                _ci(own["corrections_per_problem"]),
            ]
        )
    header = [
        "model",
        f"P(wrong) after a right step, {longest} steps",
        f"P(wrong) after a wrong step, {longest} steps",
        "P(wrong) after a wrong step, by length " + "/".join(map(str, lengths)),
        "corrections written per problem",
    ]
    return _table(header, rows)


def exposure_table(summary: dict) -> list[str]:
    entries = {k: s for k, s in summary["entries"].items() if "exposure_gap_tvd" in s}
    width = min(len(s["exposure_gap_tvd"]["mean"]) for s in entries.values())
    picks = sorted({0, 1, width // 4, width // 2, (3 * width) // 4, width - 1})
    rows = []
    for name, s in entries.items():
        g = s["exposure_gap_tvd"]
        rows.append(
            [name]
            + [f"{g['mean'][j]:+.3f} ({g['min'][j]:+.3f}..{g['max'][j]:+.3f})" for j in picks]
        )
    return _table(["method"] + [f"step {j + 1}" for j in picks], rows)


def cost_table(results: dict, summary: dict) -> list[str]:
    rows = []
    for name, c in summary["costs"].items():
        m, r = c["mean"], c["range"]
        offline = results["methods"][name]["offline"]
        rows.append(
            [
                name,
                "stored teacher data" if offline else "student samples, live teacher",
                f"{m['teacher_tokens']:,.0f}"
                + (
                    ""
                    if offline
                    else f" ({r['teacher_tokens'][0]:,.0f}..{r['teacher_tokens'][1]:,.0f})"
                ),
                " / ".join(f"{c['per_student'][k]:,.0f}" for k in AMORTIZE_OVER),
                f"{m['teacher_s']:.1f}",
                f"{m['sampling_s']:.1f}",
                f"{m['update_s']:.1f}",
                f"{m['wall_s']:.0f} ({r['wall_s'][0]:.0f}..{r['wall_s'][1]:.0f})",
            ]
        )
    header = [
        "method",
        "training sequences",
        "teacher tokens (range over seeds)",
        "per student if shared by " + "/".join(map(str, AMORTIZE_OVER)),
        "teacher s",
        "student sampling s",
        "update s",
        "training wall s (range)",
    ]
    return _table(header, rows)


def equal_cost_table(results: dict, summary: dict) -> list[str]:
    names = list(results["methods"])
    rows = []
    for row in summary["equal_cost"]:
        if "teacher_tokens" in row:
            label = (
                f"{row['teacher_tokens']:,.0f} teacher tokens (store shared by {row['students']})"
            )
        else:
            label = f"{row['wall_seconds']:.0f} wall s (store time shared by {row['students']})"
        cells = [label]
        for name in names:
            point = row["methods"][name]
            cells.append(
                "n/a"
                if point is None
                else f"{_ci(point['accuracy'])} (step {min(point['steps'])}..{max(point['steps'])})"
            )
        rows.append(cells)
    return _table(["budget", *names], rows)


def per_seed_table(results: dict, summary: dict) -> list[str]:
    rows = [
        [name, *(f"{v:.3f}" for v in summary["entries"][name]["overall"]["per_seed"])]
        for name in results["methods"]
    ]
    return _table(["method", *(f"seed {s}" for s in results["seeds"])], rows)


def write_outputs(out: Path, results: dict) -> bool:
    """report.md, results.json and, when matplotlib is installed, the plots; True if plotted."""
    summary = summarize_all(results)
    results["summary"] = summary
    _atomic_write(out / "results.json", json.dumps(_clean(results), indent=2))
    plotted = plots.available()
    if plotted:
        plots.plot_accuracy_vs_length(results, out / "accuracy_vs_length.png")
        plots.plot_exposure_gap(results, out / "exposure_gap.png")
        plots.plot_accuracy_vs_cost(results, out / "accuracy_vs_cost.png", students=3)

    def fig(name: str, title: str) -> list[str]:
        return [f"![{title}]({name})", ""] if plotted else []

    s, build, lengths = results["settings"], results["build"], results["settings"]["lengths"]
    seeds = results["seeds"]
    wide = (
        f" With {len(seeds)} seeds the intervals are wide (a t quantile with few degrees "
        "of freedom): read them, not the means; `--seeds N` narrows them."
        if len(seeds) < 4
        else ""
    )
    cut = "".join(f" `{k}` was not run: {v}." for k, v in results.get("cut", {}).items())
    lines = [
        "# opd demo report",
        "",
        f"Seeds {', '.join(map(str, seeds))} (models, offline data and held-out problems "
        f"from seed {results['seed']}, shared); quick={results['quick']}; task "
        f"{results['task']}; {s['steps']} updates of {s['batch_size']} prompts per method "
        f"and seed (AdamW lr {s['lr']}); held-out problems: {s['per_length']} per length, "
        f"{s['samples']} samples each. Teacher {build['teacher']['params']:,} parameters, "
        f"student {build['student']['params']:,}; model build {build['seconds']:.0f}s "
        f"(0 when cached); total {results['total_seconds']:.0f}s wall, "
        f"{results.get('cpu_seconds', float('nan')):.0f}s CPU.",
        "",
        f"**Statistics.** {summary['method']}{wide}",
        "",
        f"**What was cut.** Methods before seeds.{cut or ' Nothing: every method ran.'}",
        "",
        "## Verdict: on-policy minus offline, per length and overall",
        "",
        *verdict_section(results, summary),
        "## The situation, and what each method changed",
        "",
        "A slip is a step written with a wrong value. The teacher was trained to correct "
        "slips; the student never saw one. (Teacher and student before: one measurement, "
        "intervals over problems only.)",
        "",
        *situation_table(summary),
        "",
        "## Equal updates: answer accuracy by length (sampled, T=1)",
        "",
        *accuracy_table(summary, lengths),
        "",
        "Greedy decoding:",
        "",
        *accuracy_table(summary, lengths, "greedy_accuracy"),
        "",
        "Per seed (sampled, all lengths):",
        "",
        *per_seed_table(results, summary),
        "",
        *fig("accuracy_vs_length.png", "accuracy vs length"),
        "## Two mechanisms: slipping less vs correcting slips",
        "",
        "In the model's own samples, across seeds:",
        "",
        *chain_table(summary, lengths),
        "",
        "## Exposure gap per position (TVD to the teacher, own prefixes - teacher prefixes)",
        "",
        "Longest problems; per step, the sum over its label and value tokens; the mean over "
        "seeds (min..max). results.json also has it in KL(T||S) and KL(S||T), per seed.",
        "",
        *exposure_table(summary),
        "",
        *fig("exposure_gap.png", "exposure gap"),
        "## Cost (means over seeds)",
        "",
        f"Offline data: the teacher wrote and scored {results['offline_data']['rows']:,} "
        f"completions once in {results['offline_data']['seconds']:.1f}s; every offline "
        "method and seed trained from that one store.",
        "",
        *cost_table(results, summary),
        "",
        "## Equal cost",
        "",
        "Accuracy on the training curve's probe (mixed lengths, sampled) having spent the "
        "same teacher tokens, or the same wall seconds, with the store's one-time cost "
        "shared by 1, 3 or 10 students; an on-policy run is read at its last evaluation "
        "within the budget. Intervals over seeds.",
        "",
        *equal_cost_table(results, summary),
        "",
        *fig("accuracy_vs_cost.png", "accuracy vs teacher cost"),
    ]
    if not plotted:
        lines += ["No plots: matplotlib is not installed (`pip install 'opd[demo]'`).", ""]
    _atomic_write(out / "report.md", "\n".join(lines))
    return plotted


def _clean(value):
    """JSON-safe copy: NaN becomes null (json.dumps would write a bare NaN)."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)
