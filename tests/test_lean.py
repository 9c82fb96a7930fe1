"""The lean forward (opd.modeling.lean) equals the Hugging Face forward, values and gradients."""

import pytest
import torch

from opd.batch import assemble
from opd.demo.tiny import build_char_tokenizer, tiny_causal_lm
from opd.modeling.hf import completion_hidden
from opd.modeling.lean import LeanDecoder, lean_supported, packed_supervised_hidden
from opd.objectives.fused import supervised_hidden
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
    got = supervised_hidden(model, batch)
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
