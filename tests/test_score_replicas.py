"""`opd score --endpoint A --endpoint B`: given completions scored by replicas of one
teacher (in-process `opd serve` apps on 127.0.0.1; the CLI in its own process) into the offline
cache `opd score --teacher` writes. Rows spread over the servers, scores equal the local
model's, a replica stopped mid-run has its rows scored by the other, and a SIGKILLed CLI
run resumes exactly once."""

import json
import random
import sys

import numpy as np
import pytest

from kill_util import kill_after_shards
from opd.data.cache_format import CacheReader, read_manifest
from opd.modeling.hf import load_causal_lm
from opd.teachers.cache.generate import CacheSpec, build_cache
from serve_util import TOKEN, Forwarder, start_server

TOL = 1e-5  # float32 both; the server pads rows into its own batches


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    path = tmp_path_factory.mktemp("score_replicas") / "pairs.jsonl"
    rng = random.Random(4)
    with path.open("w") as fh:
        for _ in range(10):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            fh.write(json.dumps({"prompt": f"{a}+{b}=", "completion": f"{a + b}"}) + "\n")
    return path


@pytest.fixture(scope="module")
def local_cache(tiny_pair, pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("score_local") / "cache"
    build_cache(str(tiny_pair[0]), pairs, out, spec())
    return out


@pytest.fixture
def token(monkeypatch):
    monkeypatch.setenv("OPD_TEACHER_TOKEN", TOKEN)


def spec(**kw):
    return CacheSpec(
        **{"mode": "score", "topk": 4, "shard_size": 3, "logprob_dtype": "float32", **kw}
    )


def assert_same_rows(got, want):
    a, b = CacheReader(got), CacheReader(want)
    assert a.manifest["complete"] and a.row_ids() == b.row_ids() == list(range(10))
    assert a.rows() == b.rows()  # the rows with their stored prompt and completion ids
    for rid in a.row_ids():
        x, y = a.token_arrays(rid), b.token_arrays(rid)
        for key in ("completion_ids", "topk_ids"):
            assert np.array_equal(x[key], y[key]), (rid, key)
        for key in ("token_logprobs", "topk_logprobs"):
            assert np.abs(x[key] - y[key]).max(initial=0) < TOL, (rid, key)
        tails = np.exp(x["tail_logmass"]) - np.exp(y["tail_logmass"])
        assert np.abs(tails).max(initial=0) < 1e-5, rid


def test_scores_over_replicas_equal_the_local_teachers(
    tiny_pair, pairs, local_cache, tmp_path, token
):
    model = load_causal_lm(str(tiny_pair[0]))
    servers = [start_server(tiny_pair[0], model=model)[0] for _ in range(2)]
    try:
        with Forwarder(servers[1].url) as fwd:
            urls = [servers[0].url, fwd.url]
            m = build_cache(str(tiny_pair[0]), pairs, tmp_path / "two", spec(), urls=urls)
            shares = fwd.paths.count("/opd/v1/score")
        build_cache(str(tiny_pair[0]), pairs, tmp_path / "one", spec(), urls=urls[:1])
    finally:
        for s in servers:
            s.stop()
    assert_same_rows(tmp_path / "two", local_cache)
    assert_same_rows(tmp_path / "one", local_cache)
    assert 4 <= shares <= 5  # the probe at connect, then about half of each of 4 shards
    assert m["spec"]["engine"] == "remote" and m["teacher"]["model"] == "tiny-teacher"
    assert m["teacher"]["path"] == ", ".join(urls)
    assert m["tokenizer"] == read_manifest(local_cache)["tokenizer"]


def test_a_replica_stopped_mid_run_has_its_rows_scored_by_the_other(
    tiny_pair, pairs, local_cache, tmp_path, token
):
    """In-process replicas (a SIGKILLed replica process is `test_teacher_replicas`'s): one
    stops after shard 0 and its share moves to the other; then the CLI over two, SIGKILLed
    mid-run, resumed over a third: every row once, equal to the local model's cache."""
    model = load_causal_lm(str(tiny_pair[0]))
    started = [start_server(tiny_pair[0], model=model)[0] for _ in range(3)]
    try:
        a, b, c = (s.url for s in started)

        def stop_b(index):
            if index == 0:
                started[1].stop()

        out = tmp_path / "stopped"
        build_cache(str(tiny_pair[0]), pairs, out, spec(), urls=[a, b], on_shard=stop_b)
        assert_same_rows(out, local_cache)

        out = tmp_path / "cli"
        cmd = [sys.executable, "-m", "opd.cli", "score", "--endpoint", f"{a},{c}"]
        cmd += ["--tokenizer", str(tiny_pair[0]), "--prompts", str(pairs), "--out", str(out)]
        cmd += ["--topk", "4", "--shard-size", "1", "--logprob-dtype", "float32"]
        done_before, _, stderr = kill_after_shards(cmd, out, 3)
        assert 3 <= done_before < 10, stderr.decode()[-2000:]
        build_cache(str(tiny_pair[0]), pairs, out, spec(shard_size=1), urls=[c])
        assert not list(out.glob(".*.tmp-*"))
        assert_same_rows(out, local_cache)
    finally:
        for server in started:
            server.stop()


def test_score_endpoint_mistakes_are_one_line_errors(tiny_pair, pairs, tmp_path, capsys):
    from opd.cli import main as cli_main

    base = ["score", "--prompts", str(pairs), "--out", str(tmp_path / "c")]
    assert cli_main([*base, "--endpoint", "http://127.0.0.1:9"]) == 2
    assert "needs --tokenizer" in capsys.readouterr().err
    both = [*base, "--endpoint", "http://127.0.0.1:9", "--teacher", str(tiny_pair[0])]
    assert cli_main(both) == 2
    assert "not both" in capsys.readouterr().err
    assert cli_main(base) == 2
    assert "--teacher (a model) or --endpoint" in capsys.readouterr().err
