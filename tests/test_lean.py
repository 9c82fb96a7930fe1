"""The lean forward (opd.modeling.lean) equals the Hugging Face forward, values and gradients."""

import copy
import logging
import math

import pytest
import torch

import opd.modeling.forward as forward_module
import opd.modeling.hf as lean_check_hf
import opd.modeling.lean as lean_module
from opd.cli.demo.tiny import build_char_tokenizer, tiny_causal_lm
from opd.config.parse import LossConfig, SamplingConfig
from opd.data.batch import assemble
from opd.modeling.forward import supervised_hidden
from opd.modeling.hf import completion_hidden
from opd.modeling.lean import lean_supported, packed_supervised_hidden
from opd.modeling.lean_check import LeanMismatch, lean_applies, relative_error
from opd.modeling.lean_decoder import LeanDecoder
from opd.sampling import sample
from opd.sampling.fast import sample_fast
from opd.sampling.reference import left_pad

TOK = build_char_tokenizer("0123456789+=")
FAMILIES = {"llama": {}, "qwen2": {}, "qwen3": {"heads": 4, "kv_heads": 1}}


def _close(a, b, tol=1e-5):
    """Equal up to float32 rounding, relative to the tensor's largest entry."""
    assert (a - b).abs().max() <= tol * max(1.0, b.abs().max().item())


def _model(family: str):
    return tiny_causal_lm(len(TOK), family=family, hidden=32, layers=3, seed=7, **FAMILIES[family])


def _batch():
    # Prompts of 1..6 tokens, completions of 0..5 tokens (one row supervises nothing).
    prompts = [TOK(t).input_ids for t in ("12+3=", "7", "99+99=", "4+4")]
    completions = [[5, 6, 1], [7, 8, 9, 10, 1], [], [11]]
    return assemble(prompts, completions, pad_id=0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_packed_hidden_equals_hf_values_and_gradients(family):
    model = _model(family)
    assert lean_supported(model)
    batch = _batch()
    probe = torch.randn(
        int(batch.loss_mask().sum()), 32, generator=torch.Generator().manual_seed(0)
    )
    ref = completion_hidden(model, batch)[batch.loss_mask()]
    ref_grads = torch.autograd.grad(
        (ref * probe).sum(), list(model.parameters()), allow_unused=True
    )
    got = packed_supervised_hidden(model, batch)
    grads = torch.autograd.grad((got * probe).sum(), list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    for (name, _), a, b in zip(model.named_parameters(), grads, ref_grads, strict=True):
        if b is None:  # e.g. an embedding row no token used
            continue
        assert a is not None, name
        _close(a, b)


def test_packed_hidden_with_lora_adapters():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        _model("llama"),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    )
    with torch.no_grad():  # non-zero adapters, so that they change the result
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    batch = _batch()
    ref = completion_hidden(model, batch)[batch.loss_mask()]
    got = supervised_hidden(model, batch, "lean")
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    trainable = [p for p in model.parameters() if p.requires_grad]
    g_ref = torch.autograd.grad(ref.square().sum(), trainable)
    g_got = torch.autograd.grad(got.square().sum(), trainable)
    for a, b in zip(g_got, g_ref, strict=True):
        _close(a, b)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@torch.no_grad()
def test_decoder_prefill_and_steps_equal_hf_logits(family):
    model = _model(family).eval()
    prompts = [TOK(t).input_ids for t in ("12+3=", "7", "99+99=")]
    ids, mask = left_pad(prompts, 0, "cpu")
    P = ids.shape[1]
    dec = LeanDecoder(model, len(TOK), len(prompts), P + 3)
    static = LeanDecoder(model, len(TOK), len(prompts), P + 3)
    logits = dec.prefill(ids, mask)
    torch.testing.assert_close(static.prefill(ids, mask), logits)
    follow = torch.tensor([[4, 5, 6], [7, 8, 9], [3, 3, 3]])
    for t in range(3):
        full_ids = torch.cat([ids, follow[:, :t]], 1)
        full_mask = torch.cat([mask, torch.ones_like(follow[:, :t])], 1)
        ref = model(
            input_ids=full_ids,
            attention_mask=full_mask,
            position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0),
        ).logits[:, -1]
        torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
        logits = dec.step(follow[:, t], mask.sum(-1) + t, P + t)
        column = torch.tensor([P + t])
        torch.testing.assert_close(
            static.step_static(follow[:, t], mask.sum(-1) + t, column), logits
        )


# ------------------------------------------------ bfloat16: as close as the HF forward itself


def _flat_grads(model, hidden):
    grads = torch.autograd.grad(
        hidden.float().square().sum(), list(model.parameters()), allow_unused=True
    )
    return torch.cat(
        [
            (torch.zeros(p.numel()) if g is None else g.float().flatten())
            for g, p in zip(grads, model.parameters())
        ]
    )


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bf16_packed_hidden_and_decoder_as_close_to_float32_as_hf_bf16(family):
    """In bfloat16 neither forward equals float32; the lean one must be no further from the
    float32 reference than Hugging Face's own bfloat16 forward (values and gradients)."""
    m32 = _model(family)
    m16 = copy.deepcopy(m32).to(torch.bfloat16)
    batch = _batch()
    mask = batch.loss_mask()
    ref = completion_hidden(m32, batch)[mask]
    g_ref = _flat_grads(m32, ref)
    hf = completion_hidden(m16, batch)[mask]
    lean = packed_supervised_hidden(m16, batch)
    assert lean.dtype == torch.bfloat16
    e_hf, e_lean = relative_error(hf, ref), relative_error(lean, ref)
    assert 0 < e_lean <= 1.5 * e_hf + 1e-3, (e_lean, e_hf)
    eg_hf = relative_error(_flat_grads(m16, hf), g_ref)
    eg_lean = relative_error(_flat_grads(m16, lean), g_ref)
    assert eg_lean <= 1.5 * eg_hf + 1e-3, (eg_lean, eg_hf)
    # decoding: prefill logits
    prompts = [TOK(t).input_ids for t in ("12+3=", "7", "99+99=")]
    ids, real = left_pad(prompts, 0, "cpu")
    pos = (real.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = m32(input_ids=ids, attention_mask=real, position_ids=pos).logits[:, -1]
        hf = m16(input_ids=ids, attention_mask=real, position_ids=pos).logits[:, -1]
        got = LeanDecoder(m16.eval(), len(TOK), 3, ids.shape[1] + 1).prefill(ids, real)
    assert relative_error(got, want) <= 1.5 * relative_error(hf, want) + 1e-3


# ------------------------------------ the default where it applies, checked against HF at start


def _no_rope(x, cos, sin):  # a slip a transformers change could cause: RoPE not applied
    return x


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_perturbed_lean_forward_is_refused_at_start(family, monkeypatch):
    batch = _batch()
    model = _model(family)
    monkeypatch.setattr(lean_module, "_rope", _no_rope)
    with pytest.raises(LeanMismatch, match=r"loss\.fused_forward=hf"):
        supervised_hidden(model, batch, "lean")
    prompts = [TOK(t).input_ids for t in ("12+3=", "7", "99+99=")]
    with pytest.raises(LeanMismatch, match=r"sampling\.engine=hf"):
        sample_fast(
            model.eval(), prompts, max_new_tokens=3, eos_id=1, pad_id=0, vocab_size=len(TOK)
        )


def _count_packed_calls(monkeypatch) -> list:
    """A list that grows by one per call of the packed forward from `supervised_hidden`."""
    packed = []
    real_packed = lean_module.packed_supervised_hidden
    monkeypatch.setattr(
        forward_module,
        "packed_supervised_hidden",
        lambda m, b: packed.append(1) or real_packed(m, b),
    )
    return packed


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_under_auto_a_failed_check_falls_back_to_hf_and_says_so(family, monkeypatch, caplog):
    batch, prompts = _batch(), [TOK(t).input_ids for t in ("12+3=", "7", "99+99=")]
    model = _model(family)
    want = completion_hidden(model, batch)[batch.loss_mask()]
    monkeypatch.setattr(lean_module, "_rope", _no_rope)
    packed = _count_packed_calls(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="opd"):
        for _ in range(2):
            got = supervised_hidden(model, batch, "auto")
            assert torch.equal(got, want)  # the Hugging Face forward's own numbers
    warned = [r.getMessage() for r in caplog.records if "lean packed forward" in r.getMessage()]
    assert len(warned) == 1 and "from now on (auto)" in warned[0]  # said once, then hf only
    assert not packed
    kw = dict(max_new_tokens=6, eos_id=1, pad_id=0, vocab_size=len(TOK))
    fresh = _model(family).eval()
    ref = sample(fresh, prompts, engine="hf", generator=torch.Generator().manual_seed(3), **kw)
    got = sample(fresh, prompts, engine="auto", generator=torch.Generator().manual_seed(3), **kw)
    assert (got.completions, got.logprobs) == (ref.completions, ref.logprobs)
    assert any("lean decoder" in r.getMessage() for r in caplog.records)


def test_lean_is_the_default_where_it_applies_and_is_checked_once(monkeypatch):
    assert SamplingConfig().engine == "auto" and not SamplingConfig().cuda_graphs
    assert LossConfig().fused_forward == "auto"
    model, batch = _model("qwen3"), _batch()
    packed = _count_packed_calls(monkeypatch)
    supervised_hidden(model, batch, "hf")
    assert not packed
    checks = []
    real_hidden = lean_check_hf.completion_hidden
    monkeypatch.setattr(
        lean_check_hf, "completion_hidden", lambda m, b: checks.append(1) or real_hidden(m, b)
    )
    for mode in ("auto", "lean", "auto"):
        supervised_hidden(model, batch, mode)
    assert len(packed) == 3 and len(checks) == 1  # checked against HF once, then lean only
    other = _model("qwen3")
    assert lean_applies(other, "auto")
    # FSDP1 units gather their weights in their own forwards, which the lean path skips
    unit = type("FullyShardedDataParallel", (torch.nn.Module,), {})
    sharded = _model("qwen3")
    sharded.model.layers[0].add_module("unit", unit())
    assert not lean_applies(sharded, "auto") and not lean_applies(sharded, "lean")
    other.gradient_checkpointing_enable()  # checkpointing does not reach the lean layer loop
    assert not lean_applies(other, "auto") and not lean_applies(other, "hf")
    with torch.no_grad():  # ... where no graph is built (sampling, scoring) it does not matter
        assert lean_applies(other, "auto")
    prompts = [TOK(t).input_ids for t in ("12+3=", "7")]

    def built(*a):
        raise RuntimeError("lean decoder built")

    monkeypatch.setattr(LeanDecoder, "prefill", built)
    kw = dict(max_new_tokens=3, eos_id=1, pad_id=0, vocab_size=len(TOK))
    sample(model.eval(), prompts, engine="hf", **kw)  # hf asked for by name: no lean decoder
    with pytest.raises(RuntimeError, match="lean decoder built"):
        sample(model, prompts, engine="auto", **kw)


@pytest.mark.parametrize(("need", "temperature"), [("token", 1.0), ("topk", 1.0), ("topk", 0.7)])
def test_a_local_teachers_packed_scores_equal_its_hf_scores(need, temperature):
    """Under `auto` a local teacher scores from the packed forward, its head on supervised
    cells only; the scores there equal the Hugging Face forward's, every other cell holds
    a valid distribution (never a made-up value a loss could trip on)."""
    from opd.teachers.local import LocalTeacher

    model, batch = _model("qwen3"), _batch()
    mask = batch.loss_mask()
    ref = LocalTeacher(model, len(TOK), "hf").score(batch, need, 3, temperature)
    rows = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda m, args, out: rows.append(args[0].shape[0])
    )
    got = LocalTeacher(model, len(TOK), "auto").score(batch, need, 3, temperature)
    hook.remove()
    assert sum(rows) == int(mask.sum())  # the head ran on the 9 supervised cells, not 4 x 5
    _close(got.token_logprobs[mask], ref.token_logprobs[mask])
    assert got.tokens_scored == ref.tokens_scored
    if need == "topk":
        assert torch.equal(got.topk_ids[mask], ref.topk_ids[mask])
        _close(got.topk_logprobs[mask], ref.topk_logprobs[mask])
        _close(got.topk_tail_logmass[mask], ref.topk_tail_logmass[mask])
        total = torch.logsumexp(
            torch.cat([got.topk_logprobs, got.topk_tail_logmass[..., None]], -1), -1
        )
        assert total.abs().max() < 1e-5  # every cell, supervised or not, sums to one
    assert all(math.isfinite(v) for v in got.token_logprobs.flatten().tolist())


def test_rope_without_autograd_rounds_as_huggingface():
    """The no-graph RoPE (halves updated in place, no rolled copy) gives HF's rotate_half
    formula bit for bit on a large query, and so does the four-kernel one below its size."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    gen = torch.Generator().manual_seed(0)
    for rows in (4096, 8):  # above and below lean._ROPE_HALVES_FROM elements
        q = torch.randn(rows, 8, 64, generator=gen) * 3
        angles = torch.rand(rows, 64, generator=gen) * 50
        cos, sin = angles.cos(), angles.sin()
        want, _ = apply_rotary_pos_emb(q, q, cos, sin, unsqueeze_dim=1)  # over the heads
        with torch.no_grad():
            got = lean_module._rope(q, *lean_module.rope_tables(cos[:, None], sin[:, None]))
        assert torch.equal(got, want)


def test_packed_grid_holes_are_zeroed_whatever_the_allocator_returns(monkeypatch):
    """The attention grid is allocated uninitialised and only its holes (cells no packed row
    fills: padding, each row's last token) are zeroed: with memory that starts as NaN the
    values and gradients are the ones of a zero-filled grid."""
    model, batch = _model("llama"), _batch()
    probe = torch.randn(
        int(batch.loss_mask().sum()), 32, generator=torch.Generator().manual_seed(1)
    )

    def run():
        got = packed_supervised_hidden(model, batch)
        params = [p for p in model.parameters() if p is not model.lm_head.weight]  # unused
        return got, torch.autograd.grad((got * probe).sum(), params)

    want, want_grads = run()
    real_new_empty = torch.Tensor.new_empty

    def nan_new_empty(self, *size, **kw):
        return real_new_empty(self, *size, **kw).fill_(float("nan"))

    monkeypatch.setattr(torch.Tensor, "new_empty", nan_new_empty)
    got, grads = run()
    assert torch.equal(got, want)
    for a, b in zip(grads, want_grads, strict=True):
        assert torch.equal(a, b)
