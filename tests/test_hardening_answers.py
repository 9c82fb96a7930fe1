"""A teacher server that answers badly: every answer is checked, bounded and never used.

The fake server (`tests/fake_teacher.py`, stdlib HTTP on 127.0.0.1) computes the true
answer with a real model and breaks it in one way per mode.
"""

from __future__ import annotations

import math
import random
import time

import pytest
import torch

from fake_teacher import MODES, FakeTeacher
from opd.cli import main as cli_main
from opd.data.batch import assemble
from opd.modeling.hf import load_causal_lm, load_tokenizer
from opd.run.metrics import read_metrics
from opd.teachers.answer_checks import (
    answer_bytes_bound,
    check_logprobs,
    check_topk,
    unpack_opd_score,
)
from opd.teachers.errors import BadAnswer, TeacherUnavailable
from opd.teachers.local import LocalTeacher
from opd.teachers.remote import RemoteTeacher
from serve_util import random_seqs


@pytest.fixture(scope="module")
def fakes(tiny_pair):
    model = load_causal_lm(str(tiny_pair[0])).eval()
    tokenizer = load_tokenizer(str(tiny_pair[0]))
    servers = {p: FakeTeacher(model, tokenizer, protocol=p) for p in ("opd", "vllm")}
    yield servers, model, tokenizer
    for server in servers.values():
        server.stop()


def a_batch(vocab: int, seed: int = 0):
    rng = random.Random(seed)
    prompts = random_seqs(rng, 4, vocab, 1, 6)
    completions = random_seqs(rng, 4, vocab, 2, 8)
    return assemble(prompts, completions, pad_id=0)


def connect(fake, tokenizer, **kw) -> RemoteTeacher:
    kw.setdefault("max_retries", 1)
    return RemoteTeacher(
        fake.url,
        protocol=fake.protocol,
        backoff_s=0.01,
        expected_vocab_size=len(tokenizer),
        **kw,
    )


def test_true_answers_equal_the_local_teacher(fakes):
    servers, model, tokenizer = fakes
    batch, vocab = a_batch(len(tokenizer)), len(tokenizer)
    want = LocalTeacher(model, vocab).score(batch, "topk", 5)
    mask = batch.loss_mask()
    for fake in servers.values():
        fake.mode = "ok"
        with connect(fake, tokenizer) as teacher:
            got = teacher.score(batch, "topk", 5)
        torch.testing.assert_close(got.token_logprobs[mask], want.token_logprobs[mask])
        assert torch.equal(got.topk_ids[mask], want.topk_ids[mask])


OPD_MODES = {  # mode -> words the error must hold
    "topk_all_neg_inf": "all 5 log-probs are -inf",
    "positive_logprobs": "is 5.0; a log-prob must be finite and <= 0",
    "nan_logprob": "is nan",
    "id_over_vocab": "outside the vocabulary",
    "id_negative": "token id -1",
    "duplicate_id": "lists a token id twice",
    "short_row": "sequence 0: the answer scores",
    "missing_sequence": "the answer holds 3 sequence(s), the request sent 4",
    "lengths_longer": "the answer scores",
    "lengths_contradict": "the answer scores",
    "huge_declared": "declares 500000000 bytes",
    "endless": "ran past",
    "trickle": "no complete answer to /opd/v1/score within 1.5 s",
    "html": "is not JSON (Expecting value at line 1 column 1): '<html><head><title>502 Bad",
    "invalid_json": "is not JSON",
}
VLLM_MODES = {
    "no_own_token": "has no entry for its own token",
    "choice_missing": "the answer holds 3 choice(s), the request sent 4",
    "positive_logprobs": "a log-prob must be finite",
    "topk_all_neg_inf": "are -inf",
    "id_over_vocab": "outside the vocabulary",
    "html": "is not JSON",
    "trickle": "within 1.5 s",
    "endless": "ran past",
}


@pytest.mark.parametrize(
    "protocol,mode,words",
    [("opd", m, w) for m, w in OPD_MODES.items()] + [("vllm", m, w) for m, w in VLLM_MODES.items()],
)
def test_bad_answer_is_retried_then_refused_naming_server_and_fault(fakes, protocol, mode, words):
    servers, _, tokenizer = fakes
    fake = servers[protocol]
    assert mode in MODES
    batch = a_batch(len(tokenizer))
    fake.mode = "ok"
    with connect(fake, tokenizer, timeout_s=1.5) as teacher:
        fake.mode, fake.requests = mode, 0
        t0 = time.monotonic()
        with pytest.raises(TeacherUnavailable) as err:
            teacher.score(batch, "topk", 5)
        seconds = time.monotonic() - t0
        fake.mode = "ok"
    message = str(err.value)
    assert fake.url in message and "unusable answer" in message
    assert words in message, message
    assert fake.requests == 2  # retried once (max_retries=1), then refused
    assert seconds < 2 * 1.5 + 2  # two deadlines at most, however the body trickles


def test_a_bad_answer_then_a_good_one_is_used(fakes, caplog):
    servers, model, tokenizer = fakes
    fake = servers["opd"]
    batch = a_batch(len(tokenizer))
    want = LocalTeacher(model, len(tokenizer)).score(batch, "token")
    fake.mode = "ok"
    with connect(fake, tokenizer) as teacher:
        fake.mode, fake.bad_left = "positive_logprobs", 1
        try:
            got = teacher.score(batch, "token")
        finally:
            fake.mode, fake.bad_left = "ok", None
    mask = batch.loss_mask()
    torch.testing.assert_close(got.token_logprobs[mask], want.token_logprobs[mask])
    assert "unusable answer" in caplog.text and "(attempt 1 of 2)" in caplog.text


def test_endless_answer_is_cut_at_the_bound(fakes):
    """The client reads no more than the bound (plus one network chunk) of a body that
    never ends; the bound follows the request (positions x (2k + 1) x 4 bytes, base64)."""
    servers, _, tokenizer = fakes
    fake = servers["opd"]
    batch = a_batch(len(tokenizer))
    positions = int(batch.loss_mask().sum())
    bound = answer_bytes_bound(positions, 4, 5, "opd")
    assert bound < 80_000  # tiny here: 64 KiB of slack plus the answer's own size, twice
    fake.mode = "ok"
    with connect(fake, tokenizer, max_retries=0, timeout_s=30) as teacher:
        fake.mode = "endless"
        with pytest.raises(TeacherUnavailable, match=rf"ran past \d+ bytes, more than the {bound}"):
            teacher.score(batch, "topk", 5)
        fake.mode = "ok"


@pytest.mark.parametrize("mode", ["positive_logprobs", "id_over_vocab", "html", "trickle"])
def test_training_never_uses_a_bad_answer(fakes, base_config, tmp_path, capsys, mode):
    servers, _, _ = fakes
    fake = servers["opd"]
    fake.mode = mode
    out = tmp_path / "run"
    argv = [
        "train",
        f"student.path={base_config()['student']['path']}",
        f"data.train={base_config()['data']['train']}",
        "preset=supervised_kd",
        "loss.estimator=topk",
        "loss.topk=4",
        "teacher.kind=remote",
        f"teacher.url={fake.url}",
        "teacher.max_retries=1",
        "teacher.timeout_s=1.5",
        "steps=2",
        "batch_size=2",
        "micro_batch_size=2",
        "data.max_prompt_tokens=24",
        "data.max_completion_tokens=16",
        f"output_dir={out}",
    ]
    try:
        assert cli_main(argv) == 3
    finally:
        fake.mode = "ok"
    err = capsys.readouterr().err
    assert fake.url in err and "unusable answer" in err and "Traceback" not in err
    assert not (out / "checkpoints").exists()
    assert not (out / "metrics.jsonl").exists() or read_metrics(out) == []


def test_checks_accept_rounding_and_padding_but_nothing_else():
    lp = torch.log_softmax(torch.randn(3, 7, dtype=torch.float64), -1)
    top, ids = lp.topk(7, -1)
    good_ids, good = ids.numpy(), top.numpy().astype("float32")
    good[:, -1] = -math.inf  # a top-k past the tokens with any probability: allowed
    check_topk("s", "top-k", good_ids, good, 7)
    assert check_logprobs("s", "x", [5e-4, -1.0]).dtype.name == "float32"  # rounding
    for bad, words in (([2e-3], "<= 0"), ([-math.inf], "finite and"), ([math.nan], "nan")):
        with pytest.raises(BadAnswer, match=words):
            check_logprobs("s", "x", bad)
    twice = torch.full((3, 7), -math.inf).numpy()
    twice[:, :2] = math.log(0.6)  # two entries of 0.6 sum past 1
    with pytest.raises(BadAnswer, match=r"sum to 1\.2 > 1"):
        check_topk("s", "top-k", good_ids, twice, 7)
    with pytest.raises(BadAnswer, match="not base64"):
        unpack_opd_score(
            "s", {"lengths": [1], "token_logprobs": "%%%", "topk": 0}, [1], 0, 7
        )
