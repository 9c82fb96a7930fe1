"""`opd generate --endpoint A --endpoint B`: replicas of one teacher behind the stdlib fake
API (tests/endpoint_fake.py, on 127.0.0.1). Rows are spread over the servers, the cache
equals one server's, a dead or hanging server's rows are answered by another, a replica
serving another model is refused, and a SIGKILLed run resumes exactly once."""

import sys
import time

import pytest

from endpoint_fake import KEY, FakeAPI
from kill_util import kill_after_shards
from opd.data.cache_format import CacheReader, read_manifest
from opd.teachers.cache.endpoint import EndpointSettings, build_endpoint_cache
from opd.teachers.cache.spec import CacheSpec
from test_endpoint_cache import ENV, write_prompts

SPEC = CacheSpec(topk=2, n=2, shard_size=2, seed=7, max_new_tokens=16)


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv(ENV, KEY)


def rows_of(out):
    reader = CacheReader(out)
    assert reader.manifest["complete"]
    return {r["cache_row"]: r for r in reader.rows()}


def served(api: FakeAPI) -> int:
    return sum(1 for e in api.log if e.get("status") == 200)


def test_rows_are_spread_and_the_cache_equals_one_servers(tmp_path, key):
    prompts = write_prompts(tmp_path / "p.jsonl", [f"{i}*{i}=" for i in range(10)])
    settings = EndpointSettings(ENV, concurrency=4)
    with FakeAPI(delay_s=0.05) as one, FakeAPI(delay_s=0.05) as a, FakeAPI(delay_s=0.05) as b:
        build_endpoint_cache(one.url, "m", prompts, tmp_path / "one", SPEC, settings)
        build_endpoint_cache([a.url, b.url + "/v1"], "m", prompts, tmp_path / "two", SPEC, settings)
    assert rows_of(tmp_path / "two") == rows_of(tmp_path / "one")
    assert served(a) + served(b) == served(one) == 10  # one request (n=2) per prompt
    assert served(a) >= 2 and served(b) >= 2  # least in flight: both take rows
    manifest = read_manifest(tmp_path / "two")
    assert manifest["teacher"]["path"] == f"{a.url}, {b.url}"


def test_a_dead_or_hanging_server_has_its_rows_answered_by_another(tmp_path, key):
    prompts = write_prompts(tmp_path / "p.jsonl", [f"{i}+{i}=" for i in range(8)])
    settings = EndpointSettings(ENV, concurrency=2, timeout_s=1.0, backoff_s=0.05, max_retries=3)
    with FakeAPI() as one:
        build_endpoint_cache(one.url, "m", prompts, tmp_path / "one", SPEC, settings)
    want = rows_of(tmp_path / "one")
    # killed between shards: its port refuses connections from then on
    with FakeAPI() as a, FakeAPI() as b:

        def kill_b(index):
            if index == 0:
                b.server.shutdown()
                b.server.server_close()

        out = tmp_path / "killed"
        build_endpoint_cache([a.url, b.url], "m", prompts, out, SPEC, settings, on_shard=kill_b)
        assert rows_of(out) == want
        assert served(b) >= 1 and served(a) + served(b) == 8
    # hanging: every answer outlives the client's timeout; its rows time out and move on
    with FakeAPI() as a, FakeAPI(delay_s=3.0) as slow:
        start = time.monotonic()
        out = tmp_path / "hung"
        build_endpoint_cache([slow.url, a.url], "m", prompts, out, SPEC, settings)
        assert rows_of(out) == want and served(a) == 8
        assert time.monotonic() - start < 20  # timeouts, not a wait for the slow server


def test_a_server_down_at_connect_is_left_out_and_another_model_refused(tmp_path, key):
    prompts = write_prompts(tmp_path / "p.jsonl", ["1+1=", "2+2="])
    settings = EndpointSettings(ENV, timeout_s=1.0, backoff_s=0.01, max_retries=1)
    with FakeAPI() as dead:
        gone = dead.url
    with FakeAPI() as a:
        build_endpoint_cache([gone, a.url], "m", prompts, tmp_path / "a", SPEC, settings)
        assert served(a) == 2
    with FakeAPI() as a, FakeAPI(model_id="another-model") as other:
        with pytest.raises(ValueError, match=f"endpoint {other.url} serves models.*another"):
            build_endpoint_cache([a.url, other.url], "m", prompts, tmp_path / "b", SPEC, settings)
        assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())


def test_sigkill_mid_run_with_replicas_then_resume_is_exactly_once(tmp_path, key):
    """A CLI run over two servers killed at an arbitrary moment, resumed over the servers in
    the other order: every row once, equal to one server's unkilled cache."""
    prompts = write_prompts(tmp_path / "p.jsonl", [f"{i}-{i}=" for i in range(12)])
    spec = CacheSpec(topk=2, n=2, shard_size=1, seed=7)
    settings = EndpointSettings(api_key_env=ENV, concurrency=2)
    with FakeAPI(delay_s=0.05) as a, FakeAPI(delay_s=0.05) as b:
        whole, out = tmp_path / "whole", tmp_path / "killed"
        build_endpoint_cache(a.url, "m", prompts, whole, spec, settings)
        cmd = [sys.executable, "-m", "opd.cli", "generate", "--endpoint", a.url]
        cmd += ["--endpoint", b.url, "--model", "m", "--prompts", str(prompts), "--out", str(out)]
        cmd += ["--api-key-env", ENV, "--n", "2", "--topk", "2", "--shard-size", "1"]
        cmd += ["--concurrency", "2", "--seed", "7"]
        done_before, _, _ = kill_after_shards(cmd, out, 3)
        build_endpoint_cache(f"{b.url},{a.url}".split(","), "m", prompts, out, spec, settings)
    assert 3 <= done_before < 12  # killed mid-run
    reader = CacheReader(out)
    assert reader.row_ids() == list(range(24))
    assert not list(out.glob(".*.tmp-*"))
    assert rows_of(out) == rows_of(whole)
