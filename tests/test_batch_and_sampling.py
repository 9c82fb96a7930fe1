"""Sequence layout, masks token by token, and the KV-cached sampler."""

import warnings

import numpy as np
import pytest
import torch

from opd.data.batch import assemble
from opd.modeling.hf import completion_logits, load_causal_lm, load_tokenizer, token_logprobs
from opd.sampling.draw import draw_tokens
from opd.sampling.reference import process_logits, sample


def test_assemble_layout_token_by_token():
    b = assemble([[5, 6, 7], [8]], [[9, 1], [10, 11, 1]], pad_id=1)
    assert b.prompt_width == 3
    assert b.input_ids.tolist() == [[5, 6, 7, 9, 1, 1], [1, 1, 8, 10, 11, 1]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    # pad == eos == 1: the EOS that ends each completion is supervised, the padding is not.
    assert b.completion_mask.tolist() == [[0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1]]
    assert b.loss_mask().tolist() == [[True, True, False], [True, True, True]]
    assert b.position_ids().tolist() == [[0, 1, 2, 3, 4, 4], [0, 0, 0, 1, 2, 3]]


def test_sampler_stops_at_eos_and_keeps_it(tiny_pair):
    _, student = tiny_pair
    tok = load_tokenizer(str(student))
    model = load_causal_lm(str(student))
    prompts = [tok("12+3=").input_ids, tok("7+7=").input_ids]
    free = sample(
        model,
        prompts,
        max_new_tokens=8,
        eos_id=-1,
        pad_id=tok.pad_token_id,
        vocab_size=len(tok),
        temperature=0.0,
    )
    # Declare the third greedy token of row 0 to be "EOS": row 0 must stop right there.
    eos = free.completions[0][2]
    out = sample(
        model,
        prompts,
        max_new_tokens=8,
        eos_id=eos,
        pad_id=tok.pad_token_id,
        vocab_size=len(tok),
        temperature=0.0,
    )
    first = free.completions[0].index(eos)
    assert out.completions[0] == free.completions[0][: first + 1]
    assert out.finished[0]
    b = assemble(prompts, out.completions, pad_id=eos)
    assert b.loss_mask()[0].sum().item() == first + 1  # EOS supervised although pad == eos


def test_sampler_logprobs_match_teacher_forcing(tiny_pair):
    _, student = tiny_pair
    tok = load_tokenizer(str(student))
    model = load_causal_lm(str(student))
    prompts = [tok("1+2=").input_ids, tok("33+44=").input_ids, tok("5=").input_ids]
    gen = torch.Generator().manual_seed(0)
    out = sample(
        model,
        prompts,
        max_new_tokens=7,
        eos_id=tok.eos_token_id,
        pad_id=tok.pad_token_id,
        vocab_size=len(tok),
        generator=gen,
    )
    b = assemble(
        prompts, out.completions, pad_id=tok.pad_token_id, completion_logprobs=out.logprobs
    )
    with torch.no_grad():
        lp = token_logprobs(completion_logits(model, b, len(tok)), b.completion_ids())
    mask = b.loss_mask()
    torch.testing.assert_close(
        lp[mask], b.sampler_logprobs[:, b.prompt_width :][mask], atol=1e-5, rtol=0
    )


def test_greedy_matches_hf_generate(tiny_pair):
    _, student = tiny_pair
    tok = load_tokenizer(str(student))
    model = load_causal_lm(str(student))
    prompts = [tok("12+3=").input_ids, tok("1+1=").input_ids]
    with warnings.catch_warnings():  # our calls use the current API: no deprecation warning
        warnings.simplefilter("error", FutureWarning)
        out = sample(
            model,
            prompts,
            max_new_tokens=6,
            eos_id=tok.eos_token_id,
            pad_id=tok.pad_token_id,
            vocab_size=len(tok),
            temperature=0.0,
        )
    for p, c in zip(prompts, out.completions, strict=True):
        ref = model.generate(
            torch.tensor([p]),
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        assert ref[0, len(p) :].tolist()[: len(c)] == c


def test_stop_strings_end_rows(tiny_pair):
    _, student = tiny_pair
    tok = load_tokenizer(str(student))
    model = load_causal_lm(str(student))
    prompts = [tok("12+3=").input_ids]
    free = sample(
        model, prompts, max_new_tokens=8, eos_id=-1, pad_id=0, vocab_size=len(tok), temperature=0.0
    )
    text = tok.decode(free.completions[0])
    stop = text[2:4]
    out = sample(
        model,
        prompts,
        max_new_tokens=8,
        eos_id=-1,
        pad_id=0,
        vocab_size=len(tok),
        temperature=0.0,
        stop=(stop,),
        tokenizer=tok,
    )
    assert tok.decode(out.completions[0]).endswith(stop) and len(out.completions[0]) == 4
    assert out.finished[0]


def test_top_k_and_top_p_restrict_support():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(process_logits(logits, 1.0, 2, 1.0)[0, 2:]).all()
    lp = process_logits(logits, 1.0, 0, 0.7)  # p = .64, .24, ...: the first two reach .7
    assert torch.isfinite(lp[0, :2]).all() and torch.isinf(lp[0, 2:]).all()
    torch.testing.assert_close(lp.exp().sum(), torch.tensor(1.0))


def _reference_draw(probs: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Inverse CDF in float64, row by row: the first token whose cumulative mass exceeds u."""
    cdf = np.cumsum(probs.astype(np.float64), axis=-1)
    return np.array([np.searchsorted(c, x * c[-1], side="right") for c, x in zip(cdf, u)])


def test_draw_tokens_is_the_inverse_cdf_with_and_without_blocks():
    gen = torch.Generator().manual_seed(0)
    V = 1000  # 3 full blocks of 300 and a remainder of 100 when block=300
    probs = torch.softmax(3 * torch.randn(512, V, generator=gen), -1)
    probs[:, 7] = 0.0  # zero-probability tokens inside a block and at a block's end
    probs[:, 299] = 0.0
    u = torch.rand(512, generator=gen, dtype=torch.float64)
    ref = _reference_draw(probs.numpy(), u.numpy())
    for block in (300, 64, 1000, 4096):
        assert draw_tokens(probs, u, block=block).tolist() == ref.tolist(), block


def test_draw_tokens_never_draws_a_zero_probability_token_at_the_edges():
    probs = torch.tensor([[0.0, 0.5, 0.5, 0.0]] * 4 + [[0.0] * 3 + [1.0]])
    u = torch.tensor([0.0, 0.5, 1.0 - 2**-53, 0.25, 1.0 - 2**-53], dtype=torch.float64)
    for block in (2, 3, 4096):
        assert draw_tokens(probs, u, block=block).tolist() == [1, 2, 2, 1, 3]


def test_draw_tokens_follows_the_distribution():
    gen = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.tensor([2.0, 1.0, 0.0, -1.0, -3.0] * 100), -1)  # V = 500
    n = 200_000
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    counts = torch.bincount(draw_tokens(p.expand(n, -1), u, block=64), minlength=500).double()
    expected = n * p.double()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 600  # 499 degrees of freedom: mean 499, sd 32


def test_draw_tokens_refuses_a_row_without_finite_mass():
    probs = torch.tensor([[0.5, 0.5, 0.0], [float("nan"), 0.5, 0.5], [0.0, 0.0, 0.0]])
    u = torch.full((3,), 0.5, dtype=torch.float64)
    for block in (2, 4096):
        with pytest.raises(ValueError, match=r"rows \[1, 2\]"):
            draw_tokens(probs, u, block=block)
