"""The teacher on vLLM (opd.teachers.vllm): prompt_logprobs equal the local HF teacher's.

Tolerance 2e-4 on log-probs, as in test_vllm_sampling (float32 both, kernels differ only in
summation order). The teacher's head is scaled up, so its top-k has no near-ties that such
differences could reorder.
"""

import random

import pytest
import torch

from opd.config.parse import VllmConfig, config_from_dict
from opd.data.batch import assemble
from opd.modeling.hf import load_causal_lm
from opd.teachers.local import LocalTeacher
from vllm_util import SETTINGS, vllm_or_skip

vllm_or_skip()

from opd.sampling.vllm import start_engine  # noqa: E402
from opd.teachers.vllm import FULL_VOCAB_REFUSAL, VllmTeacher  # noqa: E402

TOL = 2e-4


@pytest.fixture(scope="module")
def teachers(vllm_pair):
    path = str(vllm_pair[0])
    model = load_causal_lm(path).eval()
    llm = start_engine(
        path,
        dtype="float32",
        settings=VllmConfig(**SETTINGS),
        max_model_len=128,
        seed=0,
        max_logprobs=8,
    )
    return VllmTeacher(llm, model.config.vocab_size, 8), LocalTeacher(
        model, model.config.vocab_size
    )


def random_batch(vocab: int, pad: int = 0):
    rng = random.Random(0)
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(2, 9))] for _ in range(5)]
    completions = [[rng.randrange(3, vocab) for _ in range(rng.randint(1, 12))] for _ in range(5)]
    completions[2] = []  # a row without completion is skipped, not sent
    return assemble(prompts, completions, pad_id=pad)


def test_token_and_topk_scores_equal_the_local_teacher(teachers):
    remote, local = teachers
    batch = random_batch(local.vocab_size)
    mask = batch.loss_mask()
    got, want = remote.score(batch, "topk", 5), local.score(batch, "topk", 5)
    assert got.tokens_scored == want.tokens_scored == int(mask.sum())
    gap = (got.token_logprobs - want.token_logprobs)[mask].abs().max()
    assert float(gap) < TOL
    assert torch.equal(got.topk_ids[mask], want.topk_ids[mask])
    assert float((got.topk_logprobs - want.topk_logprobs)[mask].abs().max()) < TOL
    assert torch.isfinite(got.topk_logprobs).all() and torch.isfinite(got.token_logprobs).all()
    token_only = remote.score(batch, "token")
    assert token_only.topk_ids is None
    assert torch.equal(token_only.token_logprobs, got.token_logprobs)


def test_full_vocabulary_and_oversized_topk_are_refused(teachers, vllm_pair, addition_data):
    remote, _ = teachers
    with pytest.raises(ValueError, match=r"loss\.objective=pg.*loss\.estimator=topk"):
        remote.score(random_batch(remote.vocab_size), "logits")
    with pytest.raises(ValueError, match="exceeds the vLLM teacher's max_logprobs=8"):
        remote.score(random_batch(remote.vocab_size), "topk", 9)
    data = {
        "student": {"path": str(vllm_pair[1])},
        "teacher": {"kind": "vllm", "path": str(vllm_pair[0])},
        "data": {"train": str(addition_data)},
        "loss": {"objective": "kd", "estimator": "full"},
    }
    with pytest.raises(ValueError) as err:  # at config time, before any model loads
        config_from_dict(data)
    assert str(err.value) == FULL_VOCAB_REFUSAL
    data["loss"] = {"objective": "kd", "estimator": "topk", "kd_temperature": 2.0}
    with pytest.raises(ValueError, match=r"teacher\.kind=vllm: that teacher's top-k"):
        config_from_dict(data)
