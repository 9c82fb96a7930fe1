"""`opd generate --endpoint` against a real vLLM OpenAI server on 127.0.0.1 (the session's
shared one, tests/conftest.py): the cache equals `opd generate --engine vllm` on the same
prompts and seeds, trains token-level KD, and a tokenizer the server does not share makes
a text cache that says why."""

import json

import numpy as np
import pytest

from opd.cli.demo.tiny import build_char_tokenizer
from opd.config.parse import VllmConfig, config_from_dict
from opd.data.cache_format import CacheReader
from opd.run.loop import train
from opd.run.metrics import read_metrics
from opd.teachers.cache.endpoint import EndpointSettings, build_endpoint_cache
from opd.teachers.cache.generate import CacheSpec, build_cache
from opd.teachers.cache.inspect import cache_report
from serve_util import Forwarder
from vllm_util import SETTINGS, vllm_or_skip

vllm_or_skip()

TOL = 2e-4  # float32 both; the server and the in-process engine batch rows differently
N_PROMPTS = 7


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("endpoint_vllm") / "prompts.jsonl"
    with path.open("w") as fh:
        for i in range(N_PROMPTS):
            fh.write(json.dumps({"prompt": f"{i}+{2 * i}=", "answer": str(3 * i)}) + "\n")
    return path


def spec(**kw):
    base = dict(topk=8, max_new_tokens=6, shard_size=3, n=2, seed=3, logprob_dtype="float32")
    return CacheSpec(**{**base, "max_prompt_tokens": 32, "max_completion_tokens": 16, **kw})


def test_endpoint_cache_equals_engine_vllm_and_trains_kd(vllm_server, vllm_pair, prompts, tmp_path):
    teacher, student = (str(p) for p in vllm_pair)
    api = tmp_path / "api"
    m = build_endpoint_cache(
        vllm_server, teacher, prompts, api, spec(), EndpointSettings(concurrency=4),
        tokenizer=teacher,
    )  # fmt: skip
    assert m["complete"] and m["tokenizer"]["token_level"], m["tokenizer"]
    assert "/tokenize agrees" in m["tokenizer"]["check"] and m["errors"] == {}
    assert m["cost"]["requests"] == N_PROMPTS  # one request of n=2 per prompt
    assert m["cost"]["completion_tokens"] == m["counts"]["completion_tokens"]
    assert m["cost"]["prompt_tokens"] == m["counts"]["prompt_tokens"] // 2  # charged once
    engine = tmp_path / "engine"
    build_cache(teacher, prompts, engine, spec(engine="vllm"), vllm_settings=VllmConfig(**SETTINGS))
    a, b = CacheReader(api), CacheReader(engine)
    rows_a = {r["cache_row"]: r for r in a.rows()}
    rows_b = {r["cache_row"]: r for r in b.rows()}
    assert sorted(rows_a) == sorted(rows_b) == list(range(2 * N_PROMPTS))
    for rid, row in rows_a.items():
        assert row["prompt_ids"] == rows_b[rid]["prompt_ids"]  # opd's encoding, sent as ids
        assert row["completion_ids"] == rows_b[rid]["completion_ids"], rid  # seeded alike
        assert row["completion"] == rows_b[rid]["completion"]
        x, y = a.token_arrays(rid), b.token_arrays(rid)
        assert np.abs(x["token_logprobs"] - y["token_logprobs"]).max(initial=0) < TOL
        assert np.array_equal(x["topk_ids"], y["topk_ids"])
        assert np.abs(x["topk_logprobs"] - y["topk_logprobs"]).max(initial=0) < TOL
        tails = np.exp(x["tail_logmass"]) - np.exp(y["tail_logmass"])
        assert np.abs(tails).max(initial=0) < 2e-6
    assert cache_report(str(api))["rows"] == 2 * N_PROMPTS
    # replicas: the same server behind a second address; the rows spread, the cache the same
    with Forwarder(vllm_server) as fwd:
        two = tmp_path / "two"
        m2 = build_endpoint_cache(
            [vllm_server, fwd.url], teacher, prompts, two, spec(), EndpointSettings(concurrency=4),
            tokenizer=teacher,
        )  # fmt: skip
        assert 2 <= fwd.posts <= N_PROMPTS - 2  # rows went to both addresses
    assert m2["tokenizer"]["token_level"] and m2["errors"] == {}
    rows_2 = {r["cache_row"]: r for r in CacheReader(two).rows()}
    assert sorted(rows_2) == sorted(rows_a)
    for rid, row in rows_2.items():
        assert row["completion_ids"] == rows_a[rid]["completion_ids"], rid
        x, y = CacheReader(two).token_arrays(rid), a.token_arrays(rid)
        assert np.abs(x["token_logprobs"] - y["token_logprobs"]).max(initial=0) < TOL

    cfg = {
        "student": {"path": student},
        "teacher": {"kind": "cached"},
        "data": {"train": str(api)},
        "loss": {"objective": "kd", "estimator": "topk", "topk": 8},
        "steps": 2,
        "batch_size": 4,
        "micro_batch_size": 2,
        "output_dir": str(tmp_path / "kd"),
    }
    result = train(config_from_dict(cfg))
    records = read_metrics(tmp_path / "kd")
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in records)
    assert result["totals"]["teacher_tokens_scored"] == 0  # the server is not asked again


def test_another_tokenizer_makes_a_text_cache_that_says_why(vllm_server, vllm_pair, tmp_path):
    other = tmp_path / "other_tokenizer"
    build_char_tokenizer("zyxwvutsrqponmlkjihgfedcba0123456789 +=").save_pretrained(other)
    path = tmp_path / "two.jsonl"
    path.write_text('{"prompt": "1+2="}\n{"prompt": "3+4="}\n')
    m = build_endpoint_cache(
        vllm_server, str(vllm_pair[0]), path, tmp_path / "c", spec(n=1), tokenizer=str(other)
    )
    assert m["tokenizer"]["token_level"] is False and m["tokenizer"]["fingerprint"] is None
    assert "tokenizes a probe text otherwise" in m["tokenizer"]["check"]
    meta = [t for _, _, rows in CacheReader(tmp_path / "c").iter_shards() for t in rows]
    assert len(meta) == 2 and all(1 <= len(t["teacher_tokens"]["top"][0]) <= 9 for t in meta)
