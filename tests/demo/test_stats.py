"""The demo's statistics: t quantiles, intervals over seeds and problems, verdicts, budgets."""

import itertools
import math

import numpy as np
import pytest

from opd.cli.demo import stats
from opd.cli.demo.probes import bootstrap_ci

# Tabulated two-sided 95% (and one 80%) quantiles of Student's t.
T_TABLE = [
    (0.975, 1, 12.7062047),
    (0.975, 2, 4.3026527),
    (0.975, 4, 2.7764451),
    (0.975, 10, 2.2281389),
    (0.975, 30, 2.0422725),
    (0.8, 5, 0.9195438),
    (0.025, 3, -3.1824463),
    (0.975, 1e9, 1.9599640),
]


@pytest.mark.parametrize(("p", "df", "ref"), T_TABLE)
def test_t_quantile_matches_the_table(p, df, ref):
    assert stats.t_quantile(p, df) == pytest.approx(ref, abs=2e-7)


def _table(seed_offsets, problems=60, rest=0.0, rng_seed=0):
    """values[s][p] = 0.5 + seed offset + problem effect (+ noise of sd `rest`)."""
    rng = np.random.default_rng(rng_seed)
    problem = rng.normal(0.0, 0.2, problems)
    noise = rng.normal(0.0, 1.0, (len(seed_offsets), problems)) * rest
    return 0.5 + np.asarray(seed_offsets)[:, None] + problem[None, :] + noise


def test_interval_is_the_variance_components_formula():
    """No residual: Var(mean) = var(seed offsets)/S + var(problem effects)/P exactly."""
    offsets = np.array([-0.1, 0.0, 0.04, 0.06])
    y = _table(offsets)
    got = stats.interval(y)
    s, p = y.shape
    var = offsets.var(ddof=1) / s + y[0].var(ddof=1) / p
    # Satterthwaite with the two terms: df = (a + b)^2 / (a^2/(S-1) + b^2/(P-1))
    a, b = p * offsets.var(ddof=1), s * y[0].var(ddof=1)
    df = (a + b) ** 2 / (a * a / (s - 1) + b * b / (p - 1))
    half = stats.t_quantile(0.975, df) * math.sqrt(var)
    assert got["df"] == pytest.approx(df)
    assert got["ci95"] == pytest.approx([y.mean() - half, y.mean() + half])
    assert got["sd_seed"] == pytest.approx(offsets.std(ddof=1))
    assert got["per_seed"] == pytest.approx(list(y.mean(axis=1)))
    assert got["parts"] == ["seed", "problem"]


def test_intervals_widen_as_seed_variance_is_injected():
    base = np.array([-1.0, -0.3, 0.4, 0.9])  # fixed pattern, scaled to a known spread
    widths = []
    for spread in (0.0, 0.02, 0.05, 0.1, 0.2):
        offsets = base / base.std(ddof=1) * spread
        got = stats.interval(_table(offsets, rest=0.3))
        assert got["sd_seed"] == pytest.approx(
            np.std(_table(offsets, rest=0.3).mean(axis=1), ddof=1)
        )
        widths.append(got["ci95"][1] - got["ci95"][0])
    assert all(a < b for a, b in itertools.pairwise(widths[1:])), widths
    assert widths[-1] > 3 * widths[0]
    # a bootstrap over problems alone (the demo's old intervals) does not see the seeds
    boot = bootstrap_ci(_table(base / base.std(ddof=1) * 0.2, rest=0.3).mean(axis=0))
    assert boot[1] - boot[0] < widths[-1] / 3


def test_interval_covers_the_true_mean():
    """Across simulated experiments with seed, problem and residual variance, the 95%
    interval holds the true mean about 95% of the time (a problem-only one would not)."""
    rng = np.random.default_rng(7)
    hits, naive = 0, 0
    n = 400
    for _ in range(n):
        y = rng.normal(0, 0.08, (4, 1)) + rng.normal(0, 0.2, (1, 40)) + rng.normal(0, 0.3, (4, 40))
        lo, hi = stats.interval(y)["ci95"]
        hits += lo <= 0 <= hi
        m, se = y.mean(axis=0).mean(), y.mean(axis=0).std(ddof=1) / math.sqrt(40)
        naive += abs(m) <= 1.96 * se
    assert 0.91 <= hits / n <= 0.99, hits / n
    assert naive / n < 0.85, naive / n


def test_degenerate_tables():
    one_seed = stats.interval([[1.0, 0.0, 1.0, 1.0]])
    assert one_seed["parts"] == ["problem"] and math.isnan(one_seed["sd_seed"])
    per_seed = stats.interval([[0.2], [0.4], [0.3]])
    assert per_seed["parts"] == ["seed"]
    half = stats.t_quantile(0.975, 2) * 0.1 / math.sqrt(3)
    assert per_seed["ci95"] == pytest.approx([0.3 - half, 0.3 + half])
    assert math.isnan(stats.interval([[0.5]])["ci95"][0])
    with pytest.raises(ValueError, match="NaN"):
        stats.interval([[0.5, float("nan")], [0.1, 0.2]])
    with pytest.raises(ValueError, match="do not pair"):
        stats.difference([[0.1, 0.2]], [[0.1], [0.2]])


def _runs(center, seed_sd, seeds=5, problems=64, rng_seed=0):
    """Per-seed, per-problem accuracies (0/1 answers averaged over 4 samples)."""
    rng = np.random.default_rng(rng_seed)
    p = np.clip(center + rng.normal(0, seed_sd, (seeds, 1)), 0, 1)
    return rng.binomial(4, np.broadcast_to(p, (seeds, problems))) / 4


def test_three_verdicts():
    offline = _runs(0.5, 0.03, rng_seed=1)
    better = stats.difference(_runs(0.7, 0.03, rng_seed=2), offline)
    worse = stats.difference(_runs(0.3, 0.03, rng_seed=3), offline)
    same = stats.difference(_runs(0.5, 0.03, rng_seed=4), offline)
    assert stats.verdict(better) == "on-policy better"
    assert stats.verdict(worse) == "offline better"
    assert stats.verdict(same) == "no difference detectable at this budget"
    # A clear difference in one seed is not a verdict: one seed says nothing about seeds.
    one = stats.difference(_runs(0.9, 0.0, seeds=1, rng_seed=5), offline[:1])
    assert one["ci95"][0] > 0 and stats.verdict(one) == "no difference detectable at this budget"


def test_seed_to_seed_noise_is_not_a_verdict():
    """Single seeds that disagree in sign, as the issue's runs did, leave no verdict."""
    on = _table(np.array([0.06, -0.05, 0.04, -0.03]), rest=0.3, rng_seed=1)
    off = _table(np.zeros(4), rest=0.3, rng_seed=1)
    diff = stats.difference(on, off)
    per_seed = [stats.difference(on[i : i + 1], off[i : i + 1]) for i in range(4)]
    assert any(d["ci95"][0] > 0 for d in per_seed) or any(d["ci95"][1] < 0 for d in per_seed)
    assert stats.verdict(diff) == "no difference detectable at this budget"


def test_seeds_needed():
    diff = stats.difference(
        _table(np.array([0.05, -0.05, 0.02, -0.02]), rest=0.3), _table(np.zeros(4), rest=0.3)
    )
    small, large = stats.seeds_needed(0.02, diff), stats.seeds_needed(0.06, diff)
    assert small is not None and large is not None and small > large >= 2
    # the rule it follows: (t_.975 + t_.8) * sqrt(sd^2 / n + problem term) <= effect at n
    sd = diff["sd_seed"]
    n = large
    z = stats.t_quantile(0.975, n - 1) + stats.t_quantile(0.8, n - 1)
    assert z * sd / math.sqrt(n) <= 0.06
    z1 = stats.t_quantile(0.975, n - 2) + stats.t_quantile(0.8, n - 2) if n > 2 else math.inf
    assert n == 2 or z1 * sd / math.sqrt(n - 1) > 0.06 * 0.98
    # the same problems for every seed: their spread alone can hide a tiny effect
    assert stats.seeds_needed(1e-4, diff) is None
    assert stats.seeds_needed(0.0, diff) is None


def test_a_component_estimated_below_zero_counts_as_zero():
    """No problem effect at all (every problem's mean over seeds equal): the variance is
    then the seed term alone, i.e. a t interval over the per-seed means with S-1 df."""
    rng = np.random.default_rng(3)
    noise = rng.normal(0, 0.3, (4, 30))
    noise -= noise.mean(axis=0)  # problem means all zero
    y = np.array([0.1, -0.05, 0.0, 0.08])[:, None] + noise + 0.5
    got = stats.interval(y)
    seed_means = y.mean(axis=1)
    half = stats.t_quantile(0.975, 3) * seed_means.std(ddof=1) / 2
    assert got["df"] == pytest.approx(3)
    assert got["ci95"] == pytest.approx([y.mean() - half, y.mean() + half])
    assert got["var_problem"] == 0.0
