"""Settings that would run but compute nothing the config names are refused up front."""

import pytest

from opd.config.parse import config_from_dict

BASE = {"student": {"path": "s"}, "teacher": {"path": "t"}, "data": {"train": "d.jsonl"}}


def build(**sections):
    data = {**BASE}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return config_from_dict(data)


@pytest.mark.parametrize(
    "sections,message",
    [
        ({"loss": {"objective": "pg"}, "source": {"lmbda": 0.5}}, r"Set source\.lmbda=1"),
        (
            {"loss": {"objective": "pg"}, "source": {"lmbda": 0.0, "off_policy": "teacher"}},
            r"unclipped p_S/p_T",
        ),
        ({"loss": {"objective": "ce"}, "source": {"lmbda": 0.5}}, r"involves no teacher"),
        (
            {"loss": {"objective": "pg", "kd_temperature": 2.0}, "source": {"lmbda": 1.0}},
            r"kd_temperature=2\.0 has no effect under loss\.objective=pg",
        ),
        (
            {"loss": {"objective": "pg", "divergence": "jsd"}, "source": {"lmbda": 1.0}},
            r"use loss\.objective=kd with loss\.divergence=jsd",
        ),
        (
            {"preset": "sdft", "teacher": {"kind": "local"}},
            r"preset=sdft sets teacher\.kind=self, but the config sets teacher\.kind=local",
        ),
        ({"preset": "opsd", "source": {"lmbda": 0.5}}, r"preset=opsd sets source\.lmbda=1\.0"),
        ({"preset": "on_policy", "loss": {"objective": "kd"}}, r"preset=on_policy sets loss"),
        (
            {
                "teacher": {"kind": "cached", "cache_dir": "c"},
                "source": {"lmbda": 0.5},
                "loss": {"estimator": "topk"},
            },
            r"cached scores only the completions it stored",
        ),
        (
            {"preset": "seqkd", "teacher": {"kind": "cached", "cache_dir": "c"}},
            r"not 'cached': set source\.off_policy=dataset to train on the completions the cache",
        ),
        (
            {"preset": "seqkd", "teacher": {"kind": "remote", "url": "http://127.0.0.1:1"}},
            r"not 'remote': use teacher\.kind=local, or source\.off_policy=dataset",
        ),
        ({"eval_metric": "regex"}, r"eval_metric='regex' needs eval_pattern"),
        (
            {"eval_metric": "bleu"},
            r"eval_metric='bleu': use one of exact_match, last_number, boxed, regex",
        ),
    ],
)
def test_meaningless_combinations_say_what_to_set(sections, message):
    with pytest.raises(ValueError, match=message):
        build(**sections)


@pytest.mark.parametrize(
    "sections",
    [
        {"preset": "on_policy"},
        {"preset": "sdft"},
        {"preset": "sdft", "teacher": {"kind": "self"}},  # agreeing with the preset is fine
        {"preset": "on_policy", "loss": {"divergence": "reverse_kl"}},  # what pg estimates
        {"preset": "gkd", "sampling": {"n": 4}},
        # pure RL on student samples with SFT on dataset batches: ce with lambda > 0 is meant
        {
            "loss": {"objective": "ce"},
            "source": {"lmbda": 0.5},
            "reward": {"function": "boxed", "distill_weight": 0.0},
            "sampling": {"n": 2},
        },
        {"loss": {"estimator": "topk", "kd_temperature": 2.0}},  # local teacher tempers top-k
    ],
)
def test_meaningful_combinations_pass(sections):
    build(**sections)
