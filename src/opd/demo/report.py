"""The demo's outputs: a markdown table, the raw results as JSON, and the learning curves."""

from __future__ import annotations

import json
from pathlib import Path

COLUMNS = (
    ("method", "{}"),
    ("greedy acc", "{:.3f}"),
    ("sampled acc", "{:.3f}"),
    ("div on own prefixes", "{:.4f}"),
    ("div on teacher prefixes", "{:.4f}"),
    ("exposure gap", "{:+.4f}"),
    ("student tok gen", "{:,}"),
    ("teacher tok gen", "{:,}"),
    ("teacher tok scored", "{:,}"),
    ("t gen s", "{:.1f}"),
    ("t teacher s", "{:.1f}"),
    ("t update s", "{:.1f}"),
    ("t eval+other s", "{:.1f}"),
)


def _row(name: str, m: dict) -> list[str]:
    sec = m["seconds"]
    values = [
        name,
        m["greedy_accuracy"],
        m["sampled_accuracy"],
        m["div_on_student"],
        m["div_on_teacher"],
        m["exposure_gap"],
        m["student_tokens_generated"],
        m["teacher_tokens_generated"],
        m["teacher_tokens_scored"],
        sec.get("generate", 0.0),
        sec.get("teacher_generate", 0.0) + sec.get("teacher_score", 0.0),
        sec.get("update", 0.0),
        m["wall_seconds"] - sum(sec.values()),
    ]
    return [fmt.format(v) for (_, fmt), v in zip(COLUMNS, values, strict=True)]


def markdown_table(results: dict) -> str:
    lines = ["| " + " | ".join(c for c, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for name, m in results["methods"].items():
        lines.append("| " + " | ".join(_row(name, m)) + " |")
    refs = results.get("references", {})
    for name, r in refs.items():
        cells = [
            f"*{name}* (reference)",
            f"{r['greedy_accuracy']:.3f}",
            f"{r['sampled_accuracy']:.3f}",
        ]
        lines.append("| " + " | ".join(cells + [""] * (len(COLUMNS) - 3)) + " |")
    return "\n".join(lines)


def plot_curves(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_smp, ax_gap) = plt.subplots(1, 3, figsize=(16, 4))
    for name, m in results["methods"].items():
        steps = [p["step"] for p in m["curve"]]
        ax_acc.plot(steps, [p["eval_accuracy"] for p in m["curve"]], marker="o", label=name)
        ax_smp.plot(steps, [p["eval_sampled_accuracy"] for p in m["curve"]], marker="o", label=name)
        ax_gap.plot(steps, [p["exposure_gap"] for p in m["curve"]], marker="o", label=name)
    teacher = results.get("references", {}).get("teacher")
    if teacher:
        ax_acc.axhline(teacher["greedy_accuracy"], color="gray", linestyle="--", label="teacher")
        ax_smp.axhline(teacher["sampled_accuracy"], color="gray", linestyle="--", label="teacher")
    ax_acc.set(
        xlabel="student updates", ylabel="greedy accuracy (held out)", title="Greedy accuracy"
    )
    ax_smp.set(
        xlabel="student updates", ylabel="accuracy at temperature 1", title="Sampled accuracy"
    )
    ax_gap.set(
        xlabel="student updates",
        ylabel="TVD on own prefixes - on teacher prefixes",
        title="Exposure-bias gap",
    )
    ax_gap.axhline(0.0, color="gray", linewidth=0.8)
    ax_acc.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(out: Path, results: dict) -> str:
    table = markdown_table(results)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot_curves(results, out / "curves.png")
    s = results["settings"]
    build = results["build"]
    report = [
        "# opd demo report",
        "",
        f"Seed {results['seed']}; quick={results['quick']}; {s['steps']} student updates of "
        f"{s['batch_size']} prompts per method, AdamW lr {s['lr']} after {s['warmup_steps']} "
        f"warm-up steps, max {s['max_new_tokens']} new tokens; "
        f"held-out eval on {s['eval_size']} prompts.",
        f"Teacher {build['teacher']['params']:,} params, student {build['student']['params']:,} params; "
        f"model build {build['seconds']:.0f}s (about 0 when cached); total {results['total_seconds']:.0f}s.",
        "",
        "div = mean per-token total variation distance between student and teacher next-token "
        "distributions; exposure gap = div on the student's own sampled prefixes minus div on "
        "teacher-sampled prefixes (results.json also has the gap in KL(T||S) and KL(S||T)). "
        "Times are wall seconds per phase summed over the run.",
        "",
        table,
        "",
        "![curves](curves.png)",
        "",
    ]
    (out / "report.md").write_text("\n".join(report))
    return table
