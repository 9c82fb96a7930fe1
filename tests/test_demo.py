"""`opd demo --quick` end to end: every method ran, outputs exist, numbers are finite."""

import json
import math

import pytest

from opd.cli import main
from opd.demo.run import METHODS


def test_demo_quick(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    for name in ("report.md", "results.json", "curves.png"):
        assert (out / name).exists() and (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == set(METHODS)
    for name, m in results["methods"].items():
        keys = ("greedy_accuracy", "sampled_accuracy", "div_on_student", "div_on_teacher")
        for key in (*keys, "exposure_gap", "exposure_gap_forward_kl", "exposure_gap_reverse_kl"):
            assert math.isfinite(m[key]), (name, key)
        assert m["student_updates"] == results["settings"]["steps"]
        assert m["teacher_tokens_scored"] + m["teacher_tokens_generated"] > 0, name
        assert len(m["curve"]) >= 2  # step 0 and at least one later evaluation
    on_policy = results["methods"]["on_policy"]
    assert on_policy["student_tokens_generated"] > 0
    assert results["methods"]["seqkd"]["student_tokens_generated"] == 0
    refs = results["references"]
    assert refs["teacher"]["greedy_accuracy"] > refs["student_untrained"]["greedy_accuracy"]
    report = (out / "report.md").read_text()
    assert all(name in report for name in METHODS)


def test_demo_unknown_method_is_named(tmp_path):
    with pytest.raises(SystemExit, match="nope"):
        main(["demo", "--quick", "--methods", "seqkd,nope", "--out", str(tmp_path)])
