"""opd's remote teacher against a real vLLM server (OpenAI API), not its source's word.

The server is vLLM's own (tests/vllm_util.py: `vllm_server`), shared by the test session,
on 127.0.0.1 only. Scores must equal the local HF teacher's at 2e-4
(float32 both; see test_vllm_sampling for the tolerance).
"""

import random

import pytest
import torch

from opd.config.parse import config_from_dict
from opd.data.batch import assemble
from opd.modeling.hf import load_causal_lm, load_tokenizer
from opd.run.loop import train
from opd.run.metrics import read_metrics
from opd.teachers.local import LocalTeacher
from opd.teachers.remote import RemoteTeacher
from serve_util import Forwarder
from test_vllm_train import config
from vllm_util import vllm_or_skip

vllm_or_skip()


@pytest.fixture(scope="module")
def server(vllm_server):
    return vllm_server  # one server per test session (tests/conftest.py)


def test_scores_from_vllm_server_equal_local_teacher(server, vllm_pair):
    model = load_causal_lm(str(vllm_pair[0])).eval()
    local = LocalTeacher(model, model.config.vocab_size)
    rng = random.Random(1)
    V = model.config.vocab_size
    prompts = [[rng.randrange(3, V) for _ in range(rng.randint(2, 9))] for _ in range(6)]
    completions = [[rng.randrange(3, V) for _ in range(rng.randint(1, 12))] for _ in range(6)]
    batch = assemble(prompts, completions, pad_id=0)
    mask = batch.loss_mask()
    with RemoteTeacher(server) as remote:
        assert remote.protocol == "vllm"
        got = remote.score(batch, "topk", 6)
    want = local.score(batch, "topk", 6)
    assert float((got.token_logprobs - want.token_logprobs)[mask].abs().max()) < 2e-4
    assert torch.equal(got.topk_ids[mask], want.topk_ids[mask])
    assert float((got.topk_logprobs - want.topk_logprobs)[mask].abs().max()) < 2e-4


def test_two_urls_of_one_vllm_server_score_as_one(server, vllm_pair):
    """Replicas over vLLM's OpenAI API (identity by /v1/models, a probe scored alike,
    /tokenize of each): the same server behind a second address, each micro-batch split
    over both, scores equal to one URL's."""
    tokenizer = load_tokenizer(str(vllm_pair[0]))
    rng = random.Random(2)
    V = len(tokenizer)
    prompts = [[rng.randrange(3, V) for _ in range(rng.randint(2, 9))] for _ in range(8)]
    completions = [[rng.randrange(3, V) for _ in range(rng.randint(1, 12))] for _ in range(8)]
    batch = assemble(prompts, completions, pad_id=0)
    mask = batch.loss_mask()
    with RemoteTeacher(server, tokenizer=tokenizer) as one:
        want = one.score(batch, "topk", 6)
    with Forwarder(server) as fwd, RemoteTeacher([server, fwd.url], tokenizer=tokenizer) as two:
        assert two.protocol == "vllm" and len(two.pool.healthy) == 2
        got = two.score(batch, "topk", 6)
        assert [r.served for r in two.pool.replicas] == [1, 1]  # a share each
        assert fwd.posts >= 2  # the probe at connect and its share
    assert float((got.token_logprobs - want.token_logprobs)[mask].abs().max()) < 2e-4
    assert torch.equal(got.topk_ids[mask], want.topk_ids[mask])
    assert float((got.topk_logprobs - want.topk_logprobs)[mask].abs().max()) < 2e-4


def test_training_against_vllm_server(server, vllm_pair, addition_data, tmp_path):
    cfg = config(
        vllm_pair,
        addition_data,
        tmp_path / "run",
        preset="on_policy",
        steps=3,
        teacher={"kind": "remote", "url": server, "max_retries": 1},
    )
    cfg["sampling"]["engine"] = "lean"  # the server is the subject here
    train(config_from_dict(cfg))
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["teacher_tokens_scored"] > 0 for r in records)
