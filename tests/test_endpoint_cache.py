"""`opd generate --endpoint` against a stdlib fake of a hosted API (tests/endpoint_fake.py):
faults retried or recorded, exact resume after SIGKILL, the key never on disk, validated
answers, rate limits, and SeqKD from the text cache it makes."""

import asyncio
import json
import math
import sys
import time

import pytest
import torch

from endpoint_fake import KEY, SLOW_S, FakeAPI, answer_text
from kill_util import kill_after_shards
from opd.cli import main as cli_main
from opd.cli.demo.tiny import save_tiny_pair
from opd.config.parse import DataConfig, config_from_dict
from opd.data.batch import assemble
from opd.data.cache_format import CacheReader, read_manifest
from opd.data.rows import Encoder
from opd.modeling.hf import completion_logits, load_tokenizer
from opd.run.loop import train
from opd.run.setup import build_run
from opd.teachers.cache.endpoint import EndpointSettings, build_endpoint_cache
from opd.teachers.cache.endpoint_answers import parse_answers
from opd.teachers.cache.endpoint_http import EndpointUnavailable, RateLimiter
from opd.teachers.cache.spec import CacheSpec

torch.set_num_threads(2)
ENV = "OPD_TEST_ENDPOINT_KEY"
FAULTS = ["1+1=", "RATE 2+2=", "BUSY 3+3=", "SLOW 4+4=", "TRUNC 5+5=", "FILTER 6+6=",
          "NOLP 7+7=", "BAD 8+8=", "9+9="]  # fmt: skip


def write_prompts(path, prompts):
    with path.open("w") as fh:
        for i, p in enumerate(prompts):
            fh.write(json.dumps({"prompt": p, "answer": str(i)}) + "\n")
    return path


def assert_key_not_under(root, *texts):
    for path in root.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), f"the API key is in {path}"
    for text in texts:
        assert KEY not in text


def test_faults_are_retried_or_recorded_and_the_key_stays_off_disk(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(ENV, KEY)
    prompts = write_prompts(tmp_path / "prompts.jsonl", FAULTS)
    out = tmp_path / "cache"
    args = ["generate", "--endpoint", None, "--model", "fake-model", "--prompts", str(prompts)]
    args += ["--out", str(out), "--api-key-env", ENV, "--n", "2", "--topk", "3"]
    args += ["--shard-size", "4", "--max-new-tokens", "16", "--timeout-s", "1", "--seed", "5"]
    with FakeAPI() as api:
        args[2] = api.url
        assert cli_main(args) == 0
        log = list(api.log)
    printed = capsys.readouterr()
    m = read_manifest(out)
    assert m["complete"] and m["counts"]["rows"] == 2 * len(FAULTS)
    assert m["tokenizer"]["token_level"] is False and "no --tokenizer" in m["tokenizer"]["check"]
    # every request carried the key; none of it reached the cache, stdout or stderr
    assert all(e["auth"] == f"Bearer {KEY}" for e in log)
    assert_key_not_under(tmp_path, printed.out, printed.err)
    assert "| total | 18 | 9 | 4 |" in printed.out  # the cost table, then the JSON summary
    assert json.loads(printed.out.splitlines()[-1])["errors"] == m["errors"]
    attempts = {p: [e for e in log if e["prompt"] == p] for p in FAULTS}
    rate = attempts["RATE 2+2="]
    assert [e["status"] for e in rate] == [429, 200]
    assert rate[1]["t"] - rate[0]["t"] >= 0.95  # Retry-After: 1 honoured (backoff is 0.5)
    assert [e["status"] for e in attempts["BUSY 3+3="]] == [500, 500, 200]
    slow = attempts["SLOW 4+4="]
    assert len(slow) == 2 and slow[1]["t"] - slow[0]["t"] < SLOW_S  # timed out, retried
    assert m["errors"] == {"content_filter": 2, "refused": 2} and m["truncated"] == 2
    # usage: what the server reported for the answers it served, once each
    assert m["cost"]["prompt_tokens"] == api.served["prompt_tokens"]
    assert m["cost"]["completion_tokens"] == api.served["completion_tokens"]
    assert m["cost"]["requests"] == len(FAULTS) and m["cost"]["attempts"] == len(log)
    assert sum(s["usage"]["completion_tokens"] for s in m["shards"]) == api.served[
        "completion_tokens"
    ]
    reader = CacheReader(out)
    meta = {t["cache_row"]: t for _, _, rows in reader.iter_shards() for t in rows}
    assert sorted(meta) == list(range(2 * len(FAULTS)))
    by_prompt = {(t["row"]["prompt"], t["sample"]): t for t in meta.values()}
    ok = by_prompt[("1+1=", 1)]
    seed = attempts["1+1="][0]["body"]["seed"]
    assert ok["row"]["completion"] == answer_text("1+1=", seed, 1) and ok["finished"]
    assert ok["teacher_tokens"]["logprobs"][0] == -0.25
    assert len(ok["teacher_tokens"]["top"][0]) == 3
    assert "teacher_tokens" not in by_prompt[("NOLP 7+7=", 0)]  # text kept, no log-probs
    assert by_prompt[("FILTER 6+6=", 0)]["error"]["kind"] == "content_filter"
    assert "refused" in by_prompt[("BAD 8+8=", 1)]["error"]["message"]
    assert by_prompt[("TRUNC 5+5=", 0)]["finish_reason"] == "length"
    # training rows: no errors, no truncated text (encoding would give it an end)
    trained = {r["prompt"] for r in reader.rows()}
    assert trained == set(FAULTS) - {"FILTER 6+6=", "BAD 8+8=", "TRUNC 5+5="}
    assert all("completion_ids" not in r for r in reader.rows())
    assert cli_main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "TEXT cache" in text and "4 row errors" in text and "| total | 18 | 9 | 4 |" in text


def test_chat_api_sends_messages_and_records_a_refusal(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, KEY)
    rows = [{"prompt": "hi there"}, {"prompt": [{"role": "user", "content": "REFUSE this"}]}]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = CacheSpec(topk=2, n=1, shard_size=8, max_new_tokens=8, system_prompt="Be brief.",
                     temperature=0.7, top_p=0.9)  # fmt: skip
    with FakeAPI() as api:
        m = build_endpoint_cache(  # the OpenAI SDK's base_url form, .../v1, works too
            api.url + "/v1/", "fake-model", path, tmp_path / "c", spec,
            EndpointSettings(api_key_env=ENV), api="chat", stop=["###"],
        )  # fmt: skip
        bodies = [e["body"] for e in api.log]
    assert {e["path"] for e in api.log} == {"/v1/chat/completions"}
    first = next(b for b in bodies if b["messages"][-1]["content"] == "hi there")
    assert first["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi there"},
    ]
    assert first["logprobs"] is True and first["top_logprobs"] == 2  # text cache: k as asked
    assert (first["temperature"], first["top_p"], first["max_tokens"]) == (0.7, 0.9, 8)
    assert first["stop"] == ["###"] and m["teacher"]["stop"] == ["###"] and first["n"] == 1
    assert m["errors"] == {"refusal": 1} and m["tokenizer"]["chat_template_used"] == "server"
    rows = CacheReader(tmp_path / "c").rows()
    assert [r["completion"] for r in rows] == [answer_text("hi there", first["seed"], 0)]


def test_a_trickling_answer_is_cut_by_the_timeout_a_huge_or_html_one_refused(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", ["TRICKLE 1+1=", "HUGE 2+2=", "3+3=", "HTML"])
    spec = CacheSpec(topk=0, n=1, shard_size=8, max_new_tokens=4)
    settings = EndpointSettings(api_key_env="", timeout_s=1.0, backoff_s=0.05)
    with FakeAPI(key=None) as api:
        start = time.monotonic()
        m = build_endpoint_cache(api.url, "m", prompts, tmp_path / "c", spec, settings)
        took = time.monotonic() - start
        tries = [e for e in api.log if e["prompt"] == "TRICKLE 1+1="]
    assert len(tries) == 2 and took < 5  # the first attempt was given up after ~1 s
    assert m["errors"] == {"invalid": 2}  # the 3 MB answer (bound ~1 MB), the HTML page
    meta = [t for _, _, rows in CacheReader(tmp_path / "c").iter_shards() for t in rows]
    assert "larger than" in meta[1]["error"]["message"] and meta[0]["row"]["completion"]
    assert "is not JSON" in meta[3]["error"]["message"] and "502 Bad Gateway" in meta[3][
        "error"
    ]["message"]


def test_answers_are_validated():
    def body(tokens, lps, top, finish="stop", n_choices=1):
        lp = {"tokens": tokens, "token_logprobs": lps, "top_logprobs": top}
        choice = {"index": 0, "text": "x", "finish_reason": finish, "logprobs": lp}
        return {"choices": [choice] * n_choices, "usage": {"prompt_tokens": 3}}

    kw = dict(api="completions", n=1, k=2, token_level=True, max_tokens=4, vocab_size=10)
    good = body(["token_id:3"], [-0.1], [{"token_id:3": -0.1, "token_id:4": -3.0}])
    answers, usage, _ = parse_answers(good, **kw)
    assert answers[0].error is None and answers[0].token_ids == [3]
    assert answers[0].top_ids.tolist() == [[3, 4]] and usage == {"prompt_tokens": 3}
    assert answers[0].top_logprobs.tolist() == [[-0.1, -3.0]]
    # vLLM's order: the sampled token first, then the top-k; stored sorted, k of k + 1
    unsorted = body(["token_id:5"], [-4.0], [{"token_id:5": -4.0, "token_id:3": -0.1,
                                              "token_id:4": -3.0}])  # fmt: skip
    answers, _, _ = parse_answers(unsorted, **kw)
    assert answers[0].top_ids.tolist() == [[3, 4]] and answers[0].token_logprobs == [-4.0]
    bad = {
        "NaN log-prob": body(["token_id:3"], [math.nan], [{"token_id:3": -0.1, "token_id:4": -3}]),
        "positive": body(["token_id:3"], [0.5], [{"token_id:3": -0.1, "token_id:4": -3}]),
        "over max_tokens": body(["token_id:3"] * 5, [-0.1] * 5, [{"token_id:3": -0.1}] * 5),
        "id outside vocab": body(["token_id:12"], [-0.1], [{"token_id:3": -0.1, "token_id:4": -3}]),
        "not an id": body(["hello"], [-0.1], [{"token_id:3": -0.1, "token_id:4": -3}]),
        "mass > 1": body(["token_id:3"], [-0.1], [{"token_id:3": -0.1, "token_id:4": -0.2}]),
        "short top-k": body(["token_id:3"], [-0.1], [{"token_id:3": -0.1}]),
        "length mismatch": body(["token_id:3"], [-0.1, -0.2], [{"token_id:3": -0.1}]),
        "string log-prob": body(["token_id:3"], ["-0.1"], [{"token_id:3": -0.1, "token_id:4": -3}]),
    }
    for why, b in bad.items():
        answers, _, _ = parse_answers(b, **kw)
        assert answers[0].error == "invalid", why
        assert answers[0].token_ids is None and answers[0].top_ids is None, why
    text = {**kw, "token_level": False}  # a text cache checks the numbers all the same
    for why in ("NaN log-prob", "positive", "over max_tokens", "mass > 1", "string log-prob"):
        answers, _, _ = parse_answers(bad[why], **text)
        assert answers[0].error == "invalid" and answers[0].tokens is None, why
    answers, _, _ = parse_answers(body([], [], [], finish="weird"), **kw)
    assert answers[0].error == "invalid" and "weird" in answers[0].message
    with pytest.raises(ValueError, match="2 choices, asked for n=1"):
        parse_answers(body(["token_id:3"], [-0.1], [{}], n_choices=2), **kw)


def test_rate_limit_spaces_requests(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", [f"{i}+{i}=" for i in range(30)])
    settings = EndpointSettings(api_key_env="", requests_per_minute=1200, concurrency=8)
    spec = CacheSpec(topk=0, n=1, shard_size=30, max_new_tokens=8)
    with FakeAPI(key=None) as api:
        start = time.monotonic()
        build_endpoint_cache(api.url, "fake-model", prompts, tmp_path / "c", spec, settings)
        took = time.monotonic() - start
        times = sorted(e["t"] for e in api.log)
    assert all(e["auth"] is None for e in api.log)  # no key configured: none is sent
    # 20 requests/s with a 1-second burst of 20: 30 requests take >= 0.5 s, and no
    # 1-second window holds more than 20 + 20
    assert took >= 0.45
    assert all(sum(1 for u in times if t <= u < t + 1.0) <= 40 for t in times)

    async def tokens_limited():
        limiter = RateLimiter(0, 120_000)  # 2,000 tokens/s, a 2,000-token burst
        t0 = time.monotonic()
        for _ in range(10):
            await limiter.acquire(500)
        return time.monotonic() - t0

    assert 1.3 <= asyncio.run(tokens_limited()) < 3.0  # (5,000 - 2,000) / 2,000 = 1.5 s


def test_bad_key_and_a_dead_server_stop_the_run_with_a_message(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, "wrong-key")
    prompts = write_prompts(tmp_path / "p.jsonl", ["1+1="])
    spec = CacheSpec(topk=0, n=1, shard_size=4, max_new_tokens=8)
    with FakeAPI() as api, pytest.raises(ValueError, match=f"refused the API key.*{ENV}"):
        build_endpoint_cache(api.url, "m", prompts, tmp_path / "a", spec, EndpointSettings(ENV))
    with FakeAPI() as api:
        url = api.url
    settings = EndpointSettings(ENV, max_retries=1, backoff_s=0.01, timeout_s=1)
    with pytest.raises(EndpointUnavailable, match="rerun the same command to resume"):
        build_endpoint_cache(url, "m", prompts, tmp_path / "b", spec, settings)
    monkeypatch.setenv(ENV, KEY)
    down = write_prompts(tmp_path / "down.jsonl", ["DOWN 1"])
    settings = EndpointSettings(ENV, deadline_s=1.0)
    with FakeAPI() as api, pytest.raises(EndpointUnavailable, match=r"1 attempt\(s\).*503"):
        start = time.monotonic()
        build_endpoint_cache(api.url, "m", down, tmp_path / "d", spec, settings)
    assert time.monotonic() - start < 1.0  # Retry-After: 10 is past the request's deadline
    bad = write_prompts(tmp_path / "bad.jsonl", ["BAD 1", "BAD 2"])
    no_row = r"answered no row of shard 0 usably.*refused"
    with FakeAPI() as api, pytest.raises(ValueError, match=no_row):
        build_endpoint_cache(api.url, "m", bad, tmp_path / "c", spec, EndpointSettings(ENV))


def test_sigkill_mid_run_then_resume_is_exactly_once(tmp_path, monkeypatch):
    """A real SIGKILL of a CLI run at an arbitrary moment; the same job run again (here in
    process) finishes it: every row once, equal to a run never killed."""
    prompts = write_prompts(tmp_path / "p.jsonl", [f"{i}*{i}=" for i in range(12)])
    monkeypatch.setenv(ENV, KEY)
    spec = CacheSpec(topk=2, n=2, shard_size=1, seed=7)
    settings = EndpointSettings(api_key_env=ENV, concurrency=2)
    with FakeAPI(delay_s=0.05) as api:
        whole, out = tmp_path / "whole", tmp_path / "killed"
        build_endpoint_cache(api.url, "m", prompts, whole, spec, settings)
        cmd = [sys.executable, "-m", "opd.cli", "generate", "--endpoint", api.url, "--model", "m"]
        cmd += ["--prompts", str(prompts), "--out", str(out), "--api-key-env", ENV, "--n", "2"]
        cmd += ["--topk", "2", "--shard-size", "1", "--concurrency", "2", "--seed", "7"]
        done_before, stdout, stderr = kill_after_shards(cmd, out, 3)
        build_endpoint_cache(api.url, "m", prompts, out, spec, settings)
    assert 3 <= done_before < 12  # killed mid-run
    reader = CacheReader(out)
    assert reader.manifest["complete"] and reader.row_ids() == list(range(24))
    assert not list(out.glob(".*.tmp-*"))
    rows = {r["cache_row"]: r for r in reader.rows()}
    assert rows == {r["cache_row"]: r for r in CacheReader(whole).rows()}
    assert_key_not_under(tmp_path, stdout.decode(), stderr.decode())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_pair(tmp_path_factory.mktemp("endpoint_models"))


@torch.no_grad()
def student_nll(model, tokenizer, rows) -> float:
    enc = Encoder(tokenizer, DataConfig())
    batch = assemble(
        [enc.prompt_ids(r["prompt"]) for r in rows],
        [enc.completion_ids(r["completion"]) for r in rows],
        pad_id=tokenizer.pad_token_id,
    )
    logp = torch.log_softmax(completion_logits(model, batch, len(tokenizer)).double(), -1)
    ids = batch.completion_ids()
    mask = batch.completion_mask[:, batch.prompt_width :].double()
    return float(-(logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1) * mask).sum() / mask.sum())


def test_seqkd_from_the_api_cache_lowers_the_students_loss_on_its_text(tiny, tmp_path):
    _, student = tiny
    prompts = write_prompts(tmp_path / "p.jsonl", [f"{i}+{i % 7}=" for i in range(16)])
    spec = CacheSpec(topk=0, n=1, shard_size=8, max_new_tokens=16)
    with FakeAPI(key=None) as api:
        cache = tmp_path / "cache"
        build_endpoint_cache(api.url, "m", prompts, cache, spec, EndpointSettings(api_key_env=""))
    base = {
        "student": {"path": str(student)},
        "teacher": {"path": "/nonexistent/teacher"},  # SeqKD asks no teacher
        "data": {"train": str(cache)},
        "loss": {"objective": "ce"},
        "steps": 16,
        "batch_size": 8,
        "micro_batch_size": 8,
        "optim": {"lr": 3e-3},
        "output_dir": str(tmp_path / "run"),
    }
    cfg = config_from_dict(base)
    run = build_run(cfg)
    rows = CacheReader(cache).rows()
    assert len(rows) == 16 and "seed" in rows[0]["completion"]
    tok = load_tokenizer(str(student))
    before = student_nll(run.student, tok, rows)
    train(cfg, run=run)
    after = student_nll(run.student, tok, rows)
    assert math.isfinite(before) and after < 0.8 * before, (before, after)
    kd = {**base, "teacher": {"kind": "cached"}, "loss": {"objective": "kd", "estimator": "topk"}}
    kd["output_dir"] = str(tmp_path / "kd")
    with pytest.raises(ValueError, match="holds text"):  # no token-level KD from text
        build_run(config_from_dict(kd))
