"""The demo's verdicts and report from synthetic per-seed results of known shape (no models):
the verdict per length and overall, the mechanism that carries it, equal cost, and the
report without matplotlib."""

import json
import sys

import numpy as np
import pytest

from opd.cli.demo import plots, summary
from opd.cli.demo.report import write_outputs

LENGTHS = (4, 8)
PROBLEMS = 40


def _run(rng, seed, acc, clean_error, p_wrong_after_wrong, tokens_per_step):
    """One seed of one method: accuracy `acc` per length (binomial over 4 samples)."""
    by_length = {}
    for n in LENGTHS:
        a = float(np.clip(acc[n] + rng.normal(0, 0.01), 0, 1))
        per = list(rng.binomial(4, a, PROBLEMS) / 4)
        by_length[n] = {
            "sampled_per_problem": per,
            "all_steps_per_problem": per,
            "greedy_per_problem": list(rng.binomial(1, a, PROBLEMS).astype(float)),
            "own_slips": {
                "p_wrong_after_wrong": p_wrong_after_wrong + rng.normal(0, 0.01),
                "p_wrong_after_right": 0.1,
                "corrections_per_problem": 0.3 + rng.normal(0, 0.01),
                "wrong_steps": 50,
            },
        }
    k = PROBLEMS * len(LENGTHS)
    gap = list(np.linspace(0, 0.3, 10) + rng.normal(0, 0.01, 10))
    curve = [
        {
            "step": s,
            "sampled_accuracy": 0.3 + 0.04 * s / 10,
            "teacher_tokens": tokens_per_step * s,
            "wall_seconds": 0.5 * s,
        }
        for s in range(0, 101, 25)
    ]
    return {
        "seed": seed,
        "by_length": by_length,
        "forced": {
            "clean_error": list(np.clip(clean_error + rng.normal(0, 0.05, k), 0, 1)),
            "fix_after_slip": list(rng.uniform(0, 0.05, k)),
            "carry_on": list(rng.uniform(0.8, 1, k)),
        },
        "from_corrupted_sampled": list(rng.binomial(1, 0.4, k).astype(float)),
        "from_corrupted_greedy": list(rng.binomial(1, 0.4, k).astype(float)),
        "exposure": {"tvd": {"gap": gap, "on_own": gap, "on_teacher": [0.0] * 10}},
        "totals": {
            "seconds": {"time_update": 5.0, "time_generate": 10.0 if tokens_per_step else 0.0},
            "teacher_tokens_generated": 0,
            "teacher_tokens_scored": tokens_per_step * 100,
        },
        "train_seconds": 60.0 if tokens_per_step else 20.0,
        "curve": curve,
    }


def _results(on_policy_acc, seeds=5, on_policy_clean_error=0.1):
    rng = np.random.default_rng(0)
    offline_acc = {4: 0.8, 8: 0.5}
    methods = {
        "offline_rkl": {
            "offline": True,
            "runs": [_run(rng, s, offline_acc, 0.1, 0.6, 0) for s in range(seeds)],
        },
        "on_policy_rkl": {
            "offline": False,
            "runs": [
                _run(rng, s, on_policy_acc, on_policy_clean_error, 0.6, 300) for s in range(seeds)
            ],
        },
    }
    ref = {"offline": None, "runs": [_run(rng, 0, offline_acc, 0.1, 0.6, 0)]}
    return {
        "settings": {
            "lengths": list(LENGTHS),
            "steps": 100,
            "batch_size": 8,
            "lr": 1e-3,
            "per_length": PROBLEMS,
            "samples": 4,
            "seeds": seeds,
        },
        "seed": 0,
        "seeds": list(range(seeds)),
        "quick": False,
        "task": {},
        "build": {"seconds": 1.0, "teacher": {"params": 10}, "student": {"params": 5}},
        "offline_data": {
            "rows": 800,
            "seconds": 12.0,
            "teacher_tokens_generated": 20000,
            "teacher_tokens_scored": 20000,
        },
        "cut": {"on_policy": "repeats on_policy_rkl's story"},
        "references": {"teacher": ref, "student_before": ref},
        "methods": methods,
        "total_seconds": 100.0,
        "cpu_seconds": 90.0,
    }


def test_verdicts_per_length_and_overall():
    better = summary.compare(_results({4: 0.8, 8: 0.7}), "on_policy_rkl", "offline_rkl")
    assert better["by_length"][4]["verdict"] == "no difference detectable at this budget"
    assert better["by_length"][8]["verdict"] == "on-policy better"
    assert better["overall"]["verdict"] == "on-policy better"
    assert better["by_length"][8]["mean"] == pytest.approx(0.2, abs=0.05)
    worse = summary.compare(_results({4: 0.6, 8: 0.3}), "on_policy_rkl", "offline_rkl")
    assert worse["overall"]["verdict"] == "offline better"
    same = summary.compare(_results({4: 0.8, 8: 0.5}), "on_policy_rkl", "offline_rkl")
    assert same["overall"]["verdict"] == "no difference detectable at this budget"
    assert same["carried_by"] == []


def test_the_mechanism_that_carries_it():
    """On-policy slips less (clean-prefix error 0.02 vs 0.1), recovers the same: the
    verdict is carried by slipping less, not by recovering."""
    c = summary.compare(
        _results({4: 0.9, 8: 0.7}, on_policy_clean_error=0.02), "on_policy_rkl", "offline_rkl"
    )
    assert c["mechanisms"]["clean_error"]["ci95"][1] < 0
    assert c["carried_by"] == ["clean_error"]


def test_equal_cost_reads_on_policy_within_the_budget():
    rows = summary.equal_cost(_results({4: 0.8, 8: 0.7}))
    by_tokens = {r["students"]: r for r in rows if "teacher_tokens" in r}
    # budget 40000 / 10 = 4000 tokens: on-policy (300 per step) is read at step 0
    assert by_tokens[10]["methods"]["on_policy_rkl"]["steps"] == [0] * 5
    assert by_tokens[1]["methods"]["on_policy_rkl"]["steps"] == [100] * 5
    assert by_tokens[10]["methods"]["offline_rkl"]["steps"] == [100] * 5
    by_wall = [r for r in rows if "wall_seconds" in r]
    assert by_wall[0]["wall_seconds"] == pytest.approx(12.0 + 50.0)
    assert by_wall[0]["methods"]["on_policy_rkl"]["steps"] == [100] * 5  # 50 s of curve
    costs = summary.costs(_results({4: 0.8, 8: 0.7}))
    assert costs["offline_rkl"]["per_student"][10] == pytest.approx(4000)
    assert costs["on_policy_rkl"]["per_student"][10] == pytest.approx(30000)


def test_report_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert not plots.available()
    results = _results({4: 0.8, 8: 0.7})
    assert write_outputs(tmp_path, results) is False
    report = (tmp_path / "report.md").read_text()
    assert "No plots: matplotlib is not installed" in report
    assert "**on-policy better**" in report and "on_policy_rkl minus offline_rkl" in report
    assert "`on_policy` was not run: repeats on_policy_rkl's story" in report
    assert not list(tmp_path.glob("*.png"))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["summary"]["comparisons"][0]["overall"]["verdict"] == "on-policy better"
    # the report can be rebuilt from results.json (keys are strings after the round trip)
    saved.pop("summary")
    out = tmp_path / "again"
    out.mkdir()
    write_outputs(out, saved)
    assert (out / "report.md").read_text() == report.replace(str(tmp_path), str(out))


def test_report_with_plots(tmp_path):
    pytest.importorskip("matplotlib")
    assert write_outputs(tmp_path, _results({4: 0.8, 8: 0.7})) is True
    for name in ("accuracy_vs_length.png", "exposure_gap.png", "accuracy_vs_cost.png"):
        assert (tmp_path / name).stat().st_size > 0
