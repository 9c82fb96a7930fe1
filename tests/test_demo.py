"""`opd demo --quick` end to end: every figure the report is built from exists and makes sense."""

import json
import math

import pytest

from opd.cli import main
from opd.cli.demo.run import METHODS, OFFLINE


def _finite_interval(stat: dict) -> bool:
    lo, hi = stat["ci95"]
    return all(math.isfinite(x) for x in (lo, stat["mean"], hi)) and lo <= stat["mean"] <= hi


def test_demo_quick(tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--quick", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    assert main(args) == 0
    names = ("report.md", "results.json", "accuracy_vs_length.png", "exposure_gap.png")
    for name in (*names, "accuracy_vs_cost.png"):
        assert (out / name).exists() and (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == set(METHODS)
    lengths = [str(n) for n in results["settings"]["lengths"]]
    assert len(lengths) >= 2
    entries = {**results["methods"], **results["references"]}
    for name, m in entries.items():
        assert set(m["by_length"]) == set(lengths), name
        for n in lengths:
            for key in ("sampled_accuracy", "greedy_accuracy", "sampled_all_steps"):
                assert _finite_interval(m["by_length"][n][key]), (name, n, key)
        for key in ("clean_error", "fix_after_slip", "carry_on"):
            assert _finite_interval(m["forced"][key]), (name, key)
        assert _finite_interval(m["from_corrupted_sampled"]), name
    longest = max(results["settings"]["lengths"])
    for name, m in {
        **results["methods"],
        "before": results["references"]["student_before"],
    }.items():
        gap = m["exposure"]["tvd"]["gap"]
        assert len(gap) >= longest and all(math.isfinite(g) for g in gap), name
        own, ref = m["exposure"]["tvd"]["on_own"], m["exposure"]["tvd"]["on_teacher"]
        assert all(a - b == pytest.approx(g) for a, b, g in zip(own, ref, gap))

    # The situation the demo exists to test: the teacher corrects a slip and finishes
    # right far above chance (a digit: 0.1), the student before distillation does not.
    teacher, before = results["references"]["teacher"], results["references"]["student_before"]
    assert teacher["from_corrupted_sampled"]["mean"] > 0.5
    assert teacher["forced"]["fix_after_slip"]["mean"] > 0.5
    assert before["forced"]["fix_after_slip"]["mean"] < 0.2
    short, long = lengths[0], lengths[-1]
    assert (
        before["by_length"][short]["sampled_accuracy"]["mean"]
        > (before["by_length"][long]["sampled_accuracy"]["mean"])
    )

    # Cost shape: offline methods train without a teacher call, from data written once.
    assert results["offline_data"]["teacher_tokens_generated"] > 0
    for name, m in results["methods"].items():
        totals = m["totals"]
        assert m["student_updates"] == results["settings"]["steps"]
        assert len(m["curve"]) >= 2  # step 0 and at least one later evaluation
        if name in OFFLINE:
            assert totals["teacher_tokens_scored"] + totals["teacher_tokens_generated"] == 0
            assert totals["student_tokens_generated"] == 0
        else:
            assert totals["teacher_tokens_scored"] > 0 and totals["student_tokens_generated"] > 0
    report = (out / "report.md").read_text()
    assert all(name in report for name in METHODS)


def test_demo_unknown_method_is_named(tmp_path, capsys):
    assert main(["demo", "--quick", "--methods", "seqkd,nope", "--out", str(tmp_path)]) == 2
    assert "unknown ['nope']" in capsys.readouterr().err
