"""The demo's outputs: report.md (tables and readings), results.json, and three plots."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

from opd.cli.demo.plots import plot_accuracy_vs_cost, plot_accuracy_vs_length, plot_exposure_gap
from opd.cli.demo.probes import summarize

AMORTIZE_OVER = (1, 3, 10)  # students trained from one stored teacher dataset


def _ci(s: dict) -> str:
    return f"{s['mean']:.3f} [{s['ci95'][0]:.2f}, {s['ci95'][1]:.2f}]"


def _num(x, digits: int = 2) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _by(m: dict, n) -> dict:
    return m["by_length"][n] if n in m["by_length"] else m["by_length"][str(n)]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def _entries(results: dict) -> dict:
    refs = {f"*{k}*": v for k, v in results["references"].items()}
    return {**refs, **results["methods"]}


def accuracy_table(results: dict, key: str = "sampled_accuracy") -> list[str]:
    lengths = results["settings"]["lengths"]
    rows = [
        [name] + [_ci(_by(m, n)[key]) for n in lengths] for name, m in _entries(results).items()
    ]
    return _table(["method"] + [f"{n} steps" for n in lengths], rows)


def situation_table(results: dict) -> list[str]:
    rows = []
    for name, m in _entries(results).items():
        f = m["forced"]
        rows.append(
            [
                name,
                _ci(m["from_corrupted_sampled"]),
                _ci(m["from_corrupted_greedy"]),
                _ci(f["clean_error"]),
                _ci(f["fix_after_slip"]),
                _ci(f["carry_on"]),
            ]
        )
    header = [
        "model",
        "answer acc. from a slipped prefix (T=1)",
        "same, greedy",
        "per-step error, clean prefix",
        "p(correction) after a forced slip",
        "p(no correction written) after a forced slip",
    ]
    return _table(header, rows)


def chain_table(results: dict) -> list[str]:
    lengths = results["settings"]["lengths"]
    longest = max(lengths)
    rows = []
    for name, m in _entries(results).items():
        own = _by(m, longest)["own_slips"]
        per_len = " / ".join(_num(_by(m, n)["own_slips"]["p_wrong_after_wrong"]) for n in lengths)
        rows.append(
            [
                name,
                _num(own["p_wrong_after_right"], 3),
                _num(own["p_wrong_after_wrong"], 3),
                per_len,
                f"{own['corrections_per_problem']:.2f}",
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


def exposure_table(results: dict, kind: str = "tvd") -> list[str]:
    entries = {"*student_before*": results["references"]["student_before"], **results["methods"]}
    width = min(len(m["exposure"][kind]["gap"]) for m in entries.values())
    picks = sorted({0, 1, width // 4, width // 2, (3 * width) // 4, width - 1})
    rows = [
        [name] + [f"{m['exposure'][kind]['gap'][j]:+.4f}" for j in picks]
        for name, m in entries.items()
    ]
    return _table(["method"] + [f"step {j + 1}" for j in picks], rows)


def cost_rows(results: dict) -> tuple[list[str], dict]:
    offline = results["offline_data"]
    one_time_tok = offline["teacher_tokens_generated"] + offline["teacher_tokens_scored"]
    rows, teacher_cost = [], {}
    for name, m in results["methods"].items():
        sec, tot = m["totals"]["seconds"], m["totals"]
        teacher_s = sec.get("time_teacher_generate", 0.0) + sec.get("time_teacher_score", 0.0)
        tok = tot["teacher_tokens_generated"] + tot["teacher_tokens_scored"]
        if m["offline"]:
            tok, teacher_s = one_time_tok, offline["seconds"]
            amort = " / ".join(f"{tok / k:,.0f}" for k in AMORTIZE_OVER)
        else:
            amort = " / ".join(f"{tok:,.0f}" for _ in AMORTIZE_OVER)
        teacher_cost[name] = tok
        rows.append(
            [
                name,
                "stored teacher data" if m["offline"] else "student samples, live teacher",
                f"{tok:,}",
                amort,
                f"{teacher_s:.1f}",
                f"{sec.get('time_generate', 0.0):.1f}",
                f"{sec.get('time_update', 0.0):.1f}",
                f"{m['train_seconds']:.0f}",
            ]
        )
    header = [
        "method",
        "training sequences",
        "teacher tokens",
        "per student if shared by " + "/".join(map(str, AMORTIZE_OVER)),
        "teacher s",
        "student sampling s",
        "update s",
        "training wall s",
    ]
    return _table(header, rows), teacher_cost


def equal_cost_table(results: dict) -> list[str]:
    """Each method's accuracy (mixed lengths, sampled) having spent the same teacher tokens:
    what an offline student costs when the stored data serves 1 or 3 students. Offline
    methods have then finished training; on-policy ones are read at their last evaluation
    within that budget."""
    offline = results["offline_data"]
    one_time = offline["teacher_tokens_generated"] + offline["teacher_tokens_scored"]
    names = list(results["methods"])
    header = ["teacher-token budget", *names]
    rows = []
    for students in (1, 3):
        budget = one_time / students
        cells = [f"{budget:,.0f} (stored data shared by {students})"]
        for m in results["methods"].values():
            if m["offline"]:
                point = m["curve"][-1]
            else:
                within = [p for p in m["curve"] if p["teacher_tokens"] <= budget]
                point = within[-1] if within else None
            cells.append(
                f"{point['sampled_accuracy']:.3f} (step {point['step']})" if point else "n/a"
            )
        rows.append(cells)
    return _table(header, rows)


def reading(results: dict) -> list[str]:
    """The comparisons the demo exists for, as numbers with paired bootstrap intervals
    (the same problems under both methods): best on-policy minus best offline method."""
    lengths = results["settings"]["lengths"]
    methods = results["methods"]
    live = [n for n, m in methods.items() if not m["offline"]]
    stored = [n for n, m in methods.items() if m["offline"]]
    if not live or not stored:
        return []
    longest = max(lengths)

    def best(names, n):
        return max(names, key=lambda k: _by(methods[k], n)["sampled_accuracy"]["mean"])

    lines = []
    for n in lengths:
        a, b = best(live, n), best(stored, n)
        diff = paired_diff(_by(methods[a], n)["per_problem"], _by(methods[b], n)["per_problem"])
        lines.append(
            f"- {n} steps: best on-policy ({a}) minus best offline ({b}), sampled answer "
            f"accuracy: {diff['mean']:+.3f} [{diff['ci95'][0]:+.3f}, {diff['ci95'][1]:+.3f}]"
        )
    before = results["references"]["student_before"]["forced"]["fix_after_slip"]["mean"]
    for name, m in methods.items():
        f = m["forced"]
        own = _by(m, longest)["own_slips"]
        lines.append(
            f"- {name}: per-step error on clean prefixes {f['clean_error']['mean']:.3f}, "
            f"p(correction) after a forced slip {f['fix_after_slip']['mean']:.3f} "
            f"(student before: {before:.3f}), P(wrong) after its own wrong step at "
            f"{longest} steps {_num(own['p_wrong_after_wrong'], 3)}"
        )
    return lines


def paired_diff(a: list[float], b: list[float], seed: int = 0) -> dict:
    """Mean and 95% bootstrap interval of a - b over the same problems."""
    return summarize([x - y for x, y in zip(a, b, strict=True)], seed)


def write_outputs(out: Path, results: dict) -> None:
    _atomic_write(out / "results.json", json.dumps(_clean(results), indent=2))
    plot_accuracy_vs_length(results, out / "accuracy_vs_length.png")
    plot_exposure_gap(results, out / "exposure_gap.png")
    plot_accuracy_vs_cost(results, out / "accuracy_vs_cost.png", students=3)
    s, build = results["settings"], results["build"]
    cost, _ = cost_rows(results)
    lines = [
        "# opd demo report",
        "",
        f"Seed {results['seed']}; quick={results['quick']}; task {results['task']}; "
        f"{s['steps']} updates of {s['batch_size']} prompts per method (AdamW lr {s['lr']}); "
        f"held-out problems: {s['per_length']} per length, {s['samples']} samples each. "
        f"Teacher {build['teacher']['params']:,} parameters, student "
        f"{build['student']['params']:,}; model build {build['seconds']:.0f}s (0 when cached); "
        f"total {results['total_seconds']:.0f}s. Intervals: 95% bootstrap over problems.",
        "",
        "## The situation, before any distillation",
        "",
        "A slip is a step written with a wrong value. The teacher was trained to correct "
        "slips; the student never saw one.",
        "",
        *situation_table(results),
        "",
        "## Reading (computed from the tables below)",
        "",
        *reading(results),
        "",
        "## Equal updates: answer accuracy by length (sampled, T=1)",
        "",
        *accuracy_table(results),
        "",
        "Greedy decoding:",
        "",
        *accuracy_table(results, "greedy_accuracy"),
        "",
        "![accuracy vs length](accuracy_vs_length.png)",
        "",
        "## Two mechanisms: slipping less vs correcting slips",
        "",
        "Per-step error on clean prefixes (slipping less, what mode-seeking buys) and what "
        "happens right after a slip: forced (table above) and in the model's own samples:",
        "",
        *chain_table(results),
        "",
        "## Exposure gap per position (TVD to the teacher, own prefixes - teacher prefixes)",
        "",
        "Longest problems; per step, the sum over its label and value tokens. "
        "results.json also has it in KL(T||S) and KL(S||T).",
        "",
        *exposure_table(results),
        "",
        "![exposure gap](exposure_gap.png)",
        "",
        "## Cost",
        "",
        f"Offline data: the teacher wrote and scored {results['offline_data']['rows']:,} "
        f"completions once in {results['offline_data']['seconds']:.1f}s; all three offline "
        "methods trained from that one store.",
        "",
        *cost,
        "",
        "## Equal teacher cost",
        "",
        *equal_cost_table(results),
        "",
        "![accuracy vs teacher cost](accuracy_vs_cost.png)",
        "",
    ]
    _atomic_write(out / "report.md", "\n".join(lines))


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
