"""`teacher.kind: remote`: equal to the local teacher, retries, refusals, training, faults."""

from __future__ import annotations

import asyncio
import random
import socket
from concurrent.futures import Future

import pytest
import torch
import yaml
from safetensors.torch import load_file

from opd.cli import main as cli_main
from opd.cli.demo.tiny import DEFAULT_CHARS, build_char_tokenizer
from opd.config.parse import config_from_dict
from opd.data.batch import assemble
from opd.modeling.hf import load_causal_lm, load_tokenizer, tokenizer_fingerprint
from opd.run.checkpoint import latest_checkpoint, load_trainer_state
from opd.run.loop import train
from opd.run.metrics import read_metrics
from opd.run.setup import build_run
from opd.teachers.errors import TeacherRequestError, TeacherUnavailable
from opd.teachers.local import LocalTeacher
from opd.teachers.remote import RemoteTeacher
from opd.teachers.server.protocol import RequestError
from serve_util import LIMITS, TOKEN, random_seqs, start_server


@pytest.fixture(scope="module")
def served(tiny_pair):
    server, service = start_server(tiny_pair[0])
    yield server, service
    server.stop()


def remote(url, **kw) -> RemoteTeacher:
    return RemoteTeacher(url, token=TOKEN, max_retries=kw.pop("max_retries", 0), **kw)


def a_batch(vocab: int, seed: int = 0):
    rng = random.Random(seed)
    prompts = random_seqs(rng, 6, vocab, 1, 9)
    completions = random_seqs(rng, 6, vocab, 0, 12)
    completions[2] = []  # a row with nothing to score
    return assemble(prompts, completions, pad_id=0)


@pytest.mark.parametrize("protocol", ["opd", "vllm"])
def test_scores_equal_local_teacher(served, tiny_pair, protocol, caplog):
    server, service = served
    local = LocalTeacher(load_causal_lm(str(tiny_pair[0])), service.vocab_size)
    batch = a_batch(service.vocab_size)
    mask = batch.loss_mask()
    with caplog.at_level("INFO", logger="opd"):
        teacher = remote(server.url, protocol=protocol, max_seqs_per_request=4)
    # opd serve says the dtype it scores in (/opd/v1/info); vLLM's protocol has no field for it
    if protocol == "opd":
        assert f"at {server.url} scores in float32 (the server's --dtype)" in caplog.text
    else:
        assert f"teacher {server.url} does not report the dtype it runs in" in caplog.text
        assert "start it with --dtype float32" in caplog.text
    with teacher:
        assert teacher.protocol == protocol
        for need, k in (("token", 0), ("topk", 7)):
            want, got = local.score(batch, need, k), teacher.score(batch, need, k)
            assert got.tokens_scored == want.tokens_scored == batch.num_target_tokens()
            assert got.token_logprobs.shape == want.token_logprobs.shape
            torch.testing.assert_close(
                got.token_logprobs[mask], want.token_logprobs[mask], rtol=1e-5, atol=1e-5
            )
            if k:
                assert torch.equal(got.topk_ids[mask], want.topk_ids[mask])
                torch.testing.assert_close(
                    got.topk_logprobs[mask], want.topk_logprobs[mask], rtol=1e-5, atol=1e-5
                )
                assert torch.isfinite(got.topk_logprobs).all()  # padding stays finite
        with pytest.raises(ValueError, match="not full logits"):
            teacher.score(batch, "logits")


def test_submit_and_score_async_overlap(served):
    server, service = served
    batches = [a_batch(service.vocab_size, seed) for seed in range(3)]
    with remote(server.url) as teacher:
        futures = [teacher.submit(b, "topk", 4) for b in batches]  # returns at once
        assert all(isinstance(f, Future) for f in futures)
        direct = [teacher.score(b, "topk", 4) for b in batches]
        for fut, ref in zip(futures, direct):
            torch.testing.assert_close(fut.result(10).topk_logprobs, ref.topk_logprobs)

        async def both():
            return await asyncio.gather(*(teacher.score_async(b, "token") for b in batches))

        for got, ref in zip(asyncio.run(both()), direct):
            torch.testing.assert_close(got.token_logprobs, ref.token_logprobs)


def test_refuses_other_tokenizer_wrong_token_and_big_topk(served, tiny_pair):
    server, _ = served
    with pytest.raises(ValueError, match="different tokenizer"):
        remote(server.url, expected_fingerprint="0" * 16, expected_vocab_size=5)
    with pytest.raises(ValueError, match="--max-topk"):
        remote(server.url, required_topk=LIMITS.max_topk + 1)
    with pytest.raises(TeacherRequestError, match="MY_TOKEN_VAR"):
        RemoteTeacher(server.url, token="wrong", token_env="MY_TOKEN_VAR", max_retries=0)
    tok = build_char_tokenizer(DEFAULT_CHARS[::-1])  # same size, ids mean other characters
    other, _ = start_server(tiny_pair[0], tokenizer=tok, token=None)
    try:
        student_tok = load_tokenizer(str(tiny_pair[1]))
        with pytest.raises(ValueError, match="different tokenizer"):
            RemoteTeacher(other.url, expected_fingerprint=tokenizer_fingerprint(student_tok))
    finally:
        other.stop()


def test_retries_then_unavailable_names_the_url(served, monkeypatch):
    server, service = served
    calls = {"n": 0}
    real_submit = service.batcher.submit

    async def flaky(work):
        calls["n"] += 1
        if calls["n"] <= 2:
            raise RequestError(503, "server busy")
        return await real_submit(work)

    monkeypatch.setattr(service.batcher, "submit", flaky)
    batch = a_batch(service.vocab_size)
    with remote(server.url, max_retries=3, backoff_s=0.01) as teacher:
        assert teacher.score(batch, "token").token_logprobs.shape == batch.completion_ids().shape
    assert calls["n"] == 3
    url = unused_url()
    with pytest.raises(TeacherUnavailable, match=url) as err:
        RemoteTeacher(url, max_retries=2, backoff_s=0.01)
    assert err.value.attempts == 3 and "ConnectError" in err.value.last_error


def unused_url() -> str:
    """A loopback URL on which nothing listens (the port is reserved, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def remote_config(base_config, url, **kw):
    return config_from_dict(
        base_config(
            teacher={"kind": "remote", "url": url, "max_retries": 1, "timeout_s": 5.0},
            data__max_prompt_tokens=32,  # within the test server's max_seq_len (64)
            data__max_completion_tokens=16,
            **kw,
        )
    )


@pytest.mark.parametrize(
    "overrides",
    [
        {"preset": "on_policy"},
        {"preset": "supervised_kd", "loss__estimator": "topk", "loss__topk": 8},
    ],
)
def test_training_with_remote_teacher(served, base_config, monkeypatch, tmp_path, overrides):
    """The run equals the same run with the served model as a local teacher: the server
    returns the local teacher's scores (to 1e-5), so losses and weights match."""
    server, _ = served
    monkeypatch.setenv("OPD_TEACHER_TOKEN", TOKEN)
    config = remote_config(base_config, server.url, **overrides)
    result = train(config)
    records = read_metrics(config.output_dir)
    assert len(records) == config.steps and all(not r["skipped"] for r in records)
    assert all(r["teacher_tokens_scored"] > 0 for r in records)
    assert result["step"] == config.steps
    local = config_from_dict(
        base_config(  # base_config's teacher is the model the server serves
            data__max_prompt_tokens=32,
            data__max_completion_tokens=16,
            output_dir=str(tmp_path / "local"),
            **overrides,
        )
    )
    train(local)
    for a, b in zip(records, read_metrics(local.output_dir), strict=True):
        assert a["tokens"] == b["tokens"] and a["teacher_tokens_scored"] == b["teacher_tokens_scored"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
    got = load_file(str(latest_checkpoint(config.output_dir) / "model.safetensors"))
    want = load_file(str(latest_checkpoint(local.output_dir) / "model.safetensors"))
    assert max((got[k] - want[k]).abs().max().item() for k in want) < 1e-5


def test_full_logits_objective_is_refused_at_start(served, base_config, monkeypatch):
    monkeypatch.setenv("OPD_TEACHER_TOKEN", TOKEN)
    config = remote_config(base_config, served[0].url, preset="supervised_kd")
    with pytest.raises(ValueError, match=r"loss\.estimator=topk"):
        build_run(config)


def test_server_killed_mid_run_then_resume(tiny_pair, base_config, monkeypatch):
    server, service = start_server(tiny_pair[0])
    port = int(server.url.rsplit(":", 1)[1])
    monkeypatch.setenv("OPD_TEACHER_TOKEN", TOKEN)
    config = remote_config(base_config, server.url, preset="on_policy", steps=4, save_every=1)
    run = build_run(config)
    calls = {"n": 0}
    real_score = run.teacher.score

    def score_then_die(batch, need, topk=0):
        calls["n"] += 1
        if calls["n"] == 2 * config.accumulation + 1:  # the first teacher call of step 3
            server.stop()
        return real_score(batch, need, topk)

    monkeypatch.setattr(run.teacher, "score", score_then_die)
    with pytest.raises(TeacherUnavailable, match=server.url):
        train(config, run)
    run.teacher.close()
    ckpt = latest_checkpoint(config.output_dir)
    assert ckpt.name == "step-0000002" and load_trainer_state(ckpt)["step"] == 2
    assert [r["step"] for r in read_metrics(config.output_dir)] == [1, 2]

    back, _ = start_server(tiny_pair[0], port=port, model=service.model)  # the server returns
    try:
        resumed = remote_config(
            base_config, back.url, preset="on_policy", steps=4, save_every=1, resume=True
        )
        result = train(resumed)
    finally:
        back.stop()
    assert result["step"] == 4
    assert latest_checkpoint(config.output_dir).name == "step-0000004"
    assert [r["step"] for r in read_metrics(config.output_dir)] == [1, 2, 3, 4]


def test_cli_train_stops_with_clear_error_when_server_is_down(base_config, tmp_path, capsys):
    url = unused_url()
    data = base_config(preset="on_policy", teacher={"kind": "remote", "url": url, "max_retries": 0})
    path = tmp_path / "remote.yaml"
    path.write_text(yaml.safe_dump(data))
    assert cli_main(["train", str(path)]) == 3
    err = capsys.readouterr().err
    assert url in err and "resume=true" in err
