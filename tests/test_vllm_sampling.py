"""Student rollouts on vLLM (opd.sampling.vllm): log q, EOS/stop handling, weight pushes.

Tolerance for log-probs: 2e-4. Engine and trainer both run float32; they differ only in
kernels (vLLM's CPU paged attention and fused qkv/gate-up matmuls vs Hugging Face's eager
attention and separate matmuls), i.e. in summation order: ~1e-6 relative on the logits,
~1e-5 on a log-prob over ~90 tokens. A weight push of lr 1e-2 moves log-probs by > 1e-2.
"""

import logging

import pytest
import torch

from opd.config.parse import VllmConfig
from opd.data.batch import assemble
from opd.modeling.hf import completion_logits, load_causal_lm, load_tokenizer
from opd.modeling.quiet import VLLM_RELOAD_LOGGER
from opd.sampling.reference import process_logits
from vllm_util import SETTINGS, vllm_or_skip

vllm_or_skip()

from opd.sampling.vllm import VllmSampler  # noqa: E402

TOL = 2e-4


@pytest.fixture(scope="module")
def engine(vllm_pair):
    _, student = vllm_pair
    return VllmSampler(
        str(student), dtype="float32", settings=VllmConfig(**SETTINGS), max_model_len=128, seed=0
    )


@pytest.fixture
def student(vllm_pair):
    return load_causal_lm(str(vllm_pair[1])).eval()


def prompts_of(tok, n=6):
    texts = ["12+34=", "7+8=", "99+1=", "a", "hello there", "5*5="][:n]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def hf_logq(model, prompts, rollout, pad_id, temperature=1.0, top_k=0, top_p=1.0):
    """Teacher-forced log q of the rollout's tokens under the same sampling transform."""
    batch = assemble(prompts, rollout.completions, pad_id=pad_id)
    with torch.no_grad():
        logits = completion_logits(model, batch, model.config.vocab_size)
    logq = process_logits(logits.flatten(0, 1), temperature, top_k, top_p).view_as(logits)
    out = logq.gather(-1, batch.completion_ids().unsqueeze(-1)).squeeze(-1)
    return [out[i, : len(c)] for i, c in enumerate(rollout.completions)]


def max_gap(rollout, reference):
    return max(
        float((torch.tensor(q) - ref).abs().max())
        for q, ref in zip(rollout.logprobs, reference)
        if q
    )


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 20, 1.0), (1.3, 0, 0.8)])
def test_logq_equals_student_teacher_forced_logprobs(
    engine, student, vllm_pair, temperature, top_k, top_p
):
    tok = load_tokenizer(str(vllm_pair[1]))
    engine.push_weights(student)
    prompts = prompts_of(tok)
    out = engine.sample(
        prompts,
        max_new_tokens=10,
        eos_ids=[tok.eos_token_id],
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=3,
    )
    assert sum(map(len, out.completions)) > 30
    ref = hf_logq(student, prompts, out, tok.pad_token_id, temperature, top_k, top_p)
    assert max_gap(out, ref) < TOL
    # the transform matters: at temperature 1 without filters these tokens score otherwise
    if (temperature, top_k, top_p) != (1.0, 0, 1.0):
        assert max_gap(out, hf_logq(student, prompts, out, tok.pad_token_id)) > 1e-2


def test_same_seed_same_samples_and_rows_differ(engine, student, vllm_pair):
    tok = load_tokenizer(str(vllm_pair[1]))
    engine.push_weights(student)
    prompts = [prompts_of(tok, 1)[0]] * 4  # n = 4 samples of one prompt
    a = engine.sample(prompts, max_new_tokens=8, eos_ids=[tok.eos_token_id], seed=5)
    b = engine.sample(prompts, max_new_tokens=8, eos_ids=[tok.eos_token_id], seed=5)
    c = engine.sample(prompts, max_new_tokens=8, eos_ids=[tok.eos_token_id], seed=6)
    assert a.completions == b.completions
    assert len({tuple(x) for x in a.completions}) > 1  # each sample its own stream
    assert a.completions != c.completions


def test_every_eos_id_ends_a_row_and_is_kept(engine, student, vllm_pair):
    tok = load_tokenizer(str(vllm_pair[1]))
    engine.push_weights(student)
    prompts = prompts_of(tok) * 8
    # Besides the tokenizer's EOS, three ordinary tokens end a row (a model's generation
    # config may list several ids; the near-uniform student emits each now and then).
    eos = [tok.eos_token_id, *tok.convert_tokens_to_ids(["1", "e", "+"])]
    out = engine.sample(prompts, max_new_tokens=12, eos_ids=eos, seed=1)
    ends = [c[-1] for c, f in zip(out.completions, out.finished) if f]
    assert len(ends) >= 5 and len(set(ends)) >= 2
    for c, f in zip(out.completions, out.finished):
        assert all(t not in eos for t in c[:-1])
        assert f == (c[-1] in eos)
        assert f or len(c) == 12
    greedy = engine.sample(prompts, max_new_tokens=12, eos_ids=eos, temperature=0.0)
    assert all(q == 0.0 for row in greedy.logprobs for q in row)
    with torch.no_grad():
        logits = completion_logits(
            student, assemble(prompts, greedy.completions, pad_id=0), student.config.vocab_size
        )
    for i, c in enumerate(greedy.completions):
        assert c == logits[i, : len(c)].argmax(-1).tolist()


def test_stop_strings_end_rows_as_generated(engine, student, vllm_pair):
    tok = load_tokenizer(str(vllm_pair[1]))
    engine.push_weights(student)
    stop = ("a", "7")
    out = engine.sample(
        prompts_of(tok) * 4, max_new_tokens=40, eos_ids=[tok.eos_token_id], stop=stop, seed=2
    )
    stopped = 0
    for c, f in zip(out.completions, out.finished):
        text = tok.decode(c)
        if f and c[-1] != tok.eos_token_id:
            stopped += 1
            assert any(s in text for s in stop)
            assert not any(s in tok.decode(c[:-1]) for s in stop)  # ended at the first one
        elif not f:
            assert not any(s in text for s in stop)
    assert stopped >= 3


def test_push_follows_the_optimizer_step(engine, student, vllm_pair, caplog):
    tok = load_tokenizer(str(vllm_pair[1]))
    seen = _Records()
    reload_log = logging.getLogger(VLLM_RELOAD_LOGGER)
    reload_log.addHandler(seen)
    try:
        with caplog.at_level("DEBUG", logger="opd"):
            engine.push_weights(student)
    finally:
        reload_log.removeHandler(seen)
    # vLLM warns once per rotary layer on every push; none reaches its handlers
    assert "rotary-layer reload warnings dropped" in caplog.text
    assert not [r for r in seen.records if "Failed to load weights" in r.getMessage()]
    old = load_causal_lm(str(vllm_pair[1])).eval()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    ids = torch.tensor([prompts_of(tok, 1)[0] * 3])
    student.train()
    student(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    student.eval()
    engine.push_weights(student)
    prompts = prompts_of(tok)
    out = engine.sample(prompts, max_new_tokens=10, eos_ids=[tok.eos_token_id], seed=4)
    assert max_gap(out, hf_logq(student, prompts, out, tok.pad_token_id)) < TOL
    assert max_gap(out, hf_logq(old, prompts, out, tok.pad_token_id)) > 1e-2


def test_lora_push_adds_the_adapter_and_leaves_the_base(engine, student, vllm_pair):
    peft = pytest.importorskip("peft")
    tok = load_tokenizer(str(vllm_pair[1]))
    model = peft.get_peft_model(
        student,
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # B starts at zero: give the adapter an effect
    before = {n: p.clone() for n, p in model.named_parameters() if "lora_" not in n}
    engine.push_weights(model)
    after = dict(model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)  # base never rounded
    prompts = prompts_of(tok)
    out = engine.sample(prompts, max_new_tokens=10, eos_ids=[tok.eos_token_id], seed=4)
    assert max_gap(out, hf_logq(model, prompts, out, tok.pad_token_id)) < TOL
    base = load_causal_lm(str(vllm_pair[1])).eval()
    assert max_gap(out, hf_logq(base, prompts, out, tok.pad_token_id)) > 1e-2


def test_head_dim_without_cpu_kernel_is_refused_before_loading(tiny_pair):
    from opd.sampling.vllm import _check_cpu_head_dim, _on_cpu

    if not _on_cpu():
        pytest.skip("CPU kernels only")
    with pytest.raises(ValueError, match="head dimension 16 has no vLLM CPU attention kernel"):
        _check_cpu_head_dim(str(tiny_pair[1]))


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)
