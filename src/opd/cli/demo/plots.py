"""The demo's three plots: accuracy vs length, exposure gap vs position, accuracy vs cost."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_vs_length(results: dict, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    entries = {**results["methods"]}
    for ref in ("teacher", "student_before"):
        entries[f"({ref})"] = results["references"][ref]
    for name, m in entries.items():
        lengths = sorted(int(n) for n in m["by_length"])
        acc = [m["by_length"][n]["sampled_accuracy"] for n in _keys(m, lengths)]
        style = "--" if name.startswith("(") else "-"
        ax.errorbar(
            lengths,
            [a["mean"] for a in acc],
            yerr=[
                [a["mean"] - a["ci95"][0] for a in acc],
                [a["ci95"][1] - a["mean"] for a in acc],
            ],
            linestyle=style,
            marker="o",
            capsize=3,
            label=name,
        )
    ax.set(
        xlabel="problem length (steps)",
        ylabel="answer accuracy, sampled at T=1",
        title="Accuracy vs length (95% bootstrap CI)",
        ylim=(0, 1.02),
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_exposure_gap(results: dict, path: Path, kind: str = "tvd") -> None:
    plt = _pyplot()
    fig, (ax_gap, ax_div) = plt.subplots(1, 2, figsize=(12, 4.2))
    entries = {**results["methods"], "(student_before)": results["references"]["student_before"]}
    for name, m in entries.items():
        exp = m.get("exposure", {}).get(kind)
        if not exp:
            continue
        steps = list(range(1, len(exp["gap"]) + 1))
        style = "--" if name.startswith("(") else "-"
        ax_gap.plot(steps, exp["gap"], style, marker="o", label=name)
        ax_div.plot(steps, exp["on_own"], style, marker="o", label=f"{name} own")
    ax_gap.axhline(0.0, color="gray", linewidth=0.8)
    ax_gap.set(
        xlabel="step of the longest problems",
        ylabel=f"{kind} on own prefixes - on teacher prefixes",
        title="Exposure gap per position",
    )
    ax_div.set(
        xlabel="step of the longest problems",
        ylabel=f"{kind} to the teacher on own prefixes",
        title="Divergence on the student's own prefixes",
    )
    ax_gap.legend(fontsize=8)
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
        if m["offline"]:
            xs = [one_time * p["step"] / steps / students for p in m["curve"]]
        else:
            xs = [p["teacher_tokens"] for p in m["curve"]]
        ax.plot(xs, [p["sampled_accuracy"] for p in m["curve"]], marker="o", label=name)
    ax.set(
        xlabel=f"teacher tokens (offline: one-time cost / {students} students)",
        ylabel="sampled accuracy, mixed lengths",
        title="Accuracy vs teacher cost",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _keys(m: dict, lengths: list[int]) -> list:
    """`by_length` keys are ints in memory and strings after a JSON round trip."""
    return [n if n in m["by_length"] else str(n) for n in lengths]
