"""`opd demo --quick` end to end: every figure the report is built from exists and makes sense."""

import json
import math

import pytest

from opd.cli import main
from opd.cli.demo.run import DEFAULT_METHODS, OFFLINE
from opd.cli.demo.stats import VERDICTS


def _interval(stat: dict) -> bool:
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
    assert set(results["methods"]) == set(DEFAULT_METHODS)
    assert results["seeds"] == [0, 1] and set(results["cut"]) == {"seqkd", "on_policy"}
    lengths = [str(n) for n in results["settings"]["lengths"]]
    assert len(lengths) >= 2
    summary = results["summary"]
    for name, s in summary["entries"].items():
        assert set(s["by_length"]) == set(lengths), name
        for n in lengths:
            for key in ("sampled_accuracy", "greedy_accuracy", "sampled_all_steps"):
                assert _interval(s["by_length"][n][key]), (name, n, key)
        for key in ("clean_error", "fix_after_slip", "carry_on"):
            assert _interval(s["forced"][key]), (name, key)
        assert _interval(s["from_corrupted_sampled"]), name
    for name, m in results["methods"].items():
        runs = m["runs"]
        assert [r["seed"] for r in runs] == [0, 1], name
        # methods' intervals hold the seed term
        assert summary["entries"][name]["overall"]["parts"] == ["seed", "problem"]
        assert (
            len(runs[0]["by_length"][lengths[0]]["sampled_per_problem"])
            == (results["settings"]["per_length"])
        )
    # a seed changes training: the two seeds' students differ somewhere
    assert any(
        m["runs"][0]["by_length"][n]["sampled_per_problem"]
        != m["runs"][1]["by_length"][n]["sampled_per_problem"]
        for m in results["methods"].values()
        for n in lengths
    )
    comparisons = summary["comparisons"]
    assert {(c["on_policy"], c["offline"]) for c in comparisons} == {
        ("on_policy_rkl", "supervised_kd"),
        ("on_policy_rkl", "offline_rkl"),
    }
    for c in comparisons:
        for d in [*c["by_length"].values(), c["overall"]]:
            assert d["verdict"] in VERDICTS and _interval(d) and len(d["per_seed"]) == 2

    longest = max(results["settings"]["lengths"])
    before = results["references"]["student_before"]["runs"][0]
    for name, run in [(n, r) for n, m in results["methods"].items() for r in m["runs"]] + [
        ("before", before)
    ]:
        gap = run["exposure"]["tvd"]["gap"]
        assert len(gap) >= longest and all(math.isfinite(g) for g in gap), name
        own, ref = run["exposure"]["tvd"]["on_own"], run["exposure"]["tvd"]["on_teacher"]
        assert all(a - b == pytest.approx(g) for a, b, g in zip(own, ref, gap))

    # The situation the demo exists to test: the teacher corrects a slip and finishes
    # right far above chance (a digit: 0.1), the student before distillation does not.
    teacher, before_s = summary["entries"]["*teacher*"], summary["entries"]["*student_before*"]
    assert teacher["from_corrupted_sampled"]["mean"] > 0.5
    assert teacher["forced"]["fix_after_slip"]["mean"] > 0.5
    assert before_s["forced"]["fix_after_slip"]["mean"] < 0.2
    short, long = lengths[0], lengths[-1]
    assert (
        before_s["by_length"][short]["sampled_accuracy"]["mean"]
        > before_s["by_length"][long]["sampled_accuracy"]["mean"]
    )

    # Cost shape: offline methods train without a teacher call, from data written once.
    assert results["offline_data"]["teacher_tokens_generated"] > 0
    for name, m in results["methods"].items():
        assert m["student_updates"] == results["settings"]["steps"]
        for run in m["runs"]:
            totals = run["totals"]
            assert len(run["curve"]) >= 2  # step 0 and at least one later evaluation
            assert all(p["wall_seconds"] >= 0 for p in run["curve"])
            if name in OFFLINE:
                assert totals["teacher_tokens_scored"] + totals["teacher_tokens_generated"] == 0
                assert totals["student_tokens_generated"] == 0
            else:
                assert totals["teacher_tokens_scored"] > 0
                assert totals["student_tokens_generated"] > 0
    report = (out / "report.md").read_text()
    assert all(name in report for name in DEFAULT_METHODS)
    assert "intervals are wide" in report and "two-way random-effects" in report


def test_demo_unknown_method_is_named(tmp_path, capsys):
    assert main(["demo", "--quick", "--methods", "seqkd,nope", "--out", str(tmp_path)]) == 2
    assert "unknown ['nope']" in capsys.readouterr().err


def test_demo_seeds_must_be_positive(tmp_path, capsys):
    assert main(["demo", "--quick", "--seeds", "0", "--out", str(tmp_path)]) == 2
    assert "--seeds" in capsys.readouterr().err
