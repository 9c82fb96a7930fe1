"""The demo's three plots, each showing the spread over seeds: accuracy vs length (the
mean with its interval band and every seed as a point), the exposure gap per position
(mean and min..max band), accuracy vs teacher cost (one thin line per seed, the mean
bold). matplotlib is the optional `demo` extra; without it the demo writes no plots."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from opd.cli.demo.summary import per_problem


def available() -> bool:
    """Whether matplotlib can be imported (the `opd[demo]` extra)."""
    try:
        return importlib.util.find_spec("matplotlib") is not None
    except ValueError:  # a module object without a spec (e.g. set to None in sys.modules)
        return False


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _by(table: dict, n):
    return table[n] if n in table else table[str(n)]


def plot_accuracy_vs_length(results: dict, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    lengths = list(results["settings"]["lengths"])
    for name, s in results["summary"]["entries"].items():
        acc = [_by(s["by_length"], n)["sampled_accuracy"] for n in lengths]
        style = "--" if name.startswith("*") else "-"
        (line,) = ax.plot(lengths, [a["mean"] for a in acc], style, marker="o", label=name)
        ax.fill_between(
            lengths,
            [a["ci95"][0] for a in acc],
            [a["ci95"][1] for a in acc],
            color=line.get_color(),
            alpha=0.15,
        )
        m = results["methods"].get(name)
        if m is not None:  # every seed as a point
            for n in lengths:
                seeds = [sum(row) / len(row) for row in per_problem(m, n)]
                ax.scatter([n] * len(seeds), seeds, s=10, color=line.get_color(), alpha=0.6)
    ax.set(
        xlabel="problem length (steps)",
        ylabel="answer accuracy, sampled at T=1",
        title=f"Accuracy vs length ({len(results['seeds'])} seeds: points; 95% CI band)",
        ylim=(0, 1.02),
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_exposure_gap(results: dict, path: Path, kind: str = "tvd") -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, s in results["summary"]["entries"].items():
        g = s.get(f"exposure_gap_{kind}")
        if not g:
            continue
        steps = list(range(1, len(g["mean"]) + 1))
        style = "--" if name.startswith("*") else "-"
        (line,) = ax.plot(steps, g["mean"], style, marker="o", markersize=3, label=name)
        ax.fill_between(steps, g["min"], g["max"], color=line.get_color(), alpha=0.15)
    ax.axhline(0.0, color="gray", linewidth=0.8)
    ax.set(
        xlabel="step of the longest problems",
        ylabel=f"{kind} on own prefixes - on teacher prefixes",
        title="Exposure gap per position (mean; band: min..max over seeds)",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy_vs_cost(results: dict, path: Path, students: int) -> None:
    """Sampled accuracy during training against the teacher tokens spent so far; offline
    methods pay their share of the one-time data generation, amortized over `students`."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    offline = results["offline_data"]
    one_time = offline["teacher_tokens_generated"] + offline["teacher_tokens_scored"]
    steps = results["settings"]["steps"]
    for name, m in results["methods"].items():
        color = None
        curves = []
        for run in m["runs"]:
            if m["offline"]:
                xs = [one_time * p["step"] / steps / students for p in run["curve"]]
            else:
                xs = [p["teacher_tokens"] for p in run["curve"]]
            ys = [p["sampled_accuracy"] for p in run["curve"]]
            curves.append((xs, ys))
            (line,) = ax.plot(xs, ys, color=color, linewidth=0.7, alpha=0.5)
            color = line.get_color()
        width = min(len(ys) for _, ys in curves)
        mean_x = [sum(xs[j] for xs, _ in curves) / len(curves) for j in range(width)]
        mean_y = [sum(ys[j] for _, ys in curves) / len(curves) for j in range(width)]
        ax.plot(mean_x, mean_y, color=color, linewidth=2, marker="o", markersize=3, label=name)
    ax.set(
        xlabel=f"teacher tokens (offline: one-time cost / {students} students)",
        ylabel="sampled accuracy, mixed lengths",
        title="Accuracy vs teacher cost (thin: each seed; bold: mean)",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
