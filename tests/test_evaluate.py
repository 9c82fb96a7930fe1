"""opd.evaluation: sampling helpers, mean divergences and the exposure-bias gap."""

import json
import math

import pytest
import torch

from opd.config.parse import DataConfig
from opd.data.batch import assemble
from opd.data.rows import Encoder
from opd.evaluation.divergence import (
    exposure_bias,
    heldout_loss,
    mean_divergences,
    teacher_states,
)
from opd.evaluation.generation import sample_completions, task_accuracy
from opd.modeling.hf import completion_logits, load_causal_lm, load_tokenizer
from opd.teachers.local import LocalTeacher


@pytest.fixture
def setup(tiny_pair, addition_data):
    teacher_dir, student_dir = tiny_pair
    tok = load_tokenizer(str(student_dir))
    encoder = Encoder(tok, DataConfig(chat_template="off"))
    rows = [json.loads(line) for line in addition_data.read_text().splitlines()][:10]
    student = load_causal_lm(str(student_dir)).eval()
    teacher = LocalTeacher(load_causal_lm(str(teacher_dir)), vocab_size=len(tok))
    sampling = {"prompt_field": "prompt", "max_new_tokens": 5, "vocab_size": len(tok)}
    return student, teacher, encoder, rows, sampling


def test_chunked_sampling_is_seeded_and_covers_every_row(setup):
    student, _, encoder, rows, sampling = setup
    a = sample_completions(student, encoder, rows, **sampling, batch_size=3, seed=1)
    b = sample_completions(student, encoder, rows, **sampling, batch_size=3, seed=1)
    assert a == b
    prompts, completions = a
    assert len(prompts) == len(completions) == len(rows)
    assert prompts[4] == encoder.prompt_ids(rows[4]["prompt"])
    assert all(1 <= len(c) <= 5 for c in completions)


def test_mean_divergences_equal_a_direct_computation(setup):
    student, teacher, encoder, rows, sampling = setup
    prompts, completions = sample_completions(student, encoder, rows, **sampling, seed=0)
    pad = encoder.tokenizer.pad_token_id
    got = mean_divergences(
        student,
        teacher,
        prompts,
        completions,
        pad_id=pad,
        vocab_size=sampling["vocab_size"],
        kinds=("forward_kl", "tvd"),
        batch_size=4,  # three chunks, summed over tokens, not averaged per chunk
    )
    batch = assemble(prompts, completions, pad_id=pad)
    with torch.no_grad():
        s = completion_logits(student, batch, sampling["vocab_size"]).double()
        t = completion_logits(teacher.model, batch, sampling["vocab_size"]).double()
    mask = batch.loss_mask()
    p_t, p_s = t.softmax(-1), s.softmax(-1)
    fkl = (p_t * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1)[mask].mean()
    tvd = 0.5 * (p_t - p_s).abs().sum(-1)[mask].mean()
    assert got["forward_kl"] == pytest.approx(float(fkl), rel=1e-4)
    assert got["tvd"] == pytest.approx(float(tvd), rel=1e-4)


def test_exposure_gap_is_zero_against_itself_and_signed_otherwise(setup):
    student, teacher, encoder, rows, sampling = setup
    own = sample_completions(student, encoder, rows, **sampling, seed=0)
    theirs = sample_completions(teacher.model, encoder, rows, **sampling, seed=0)
    common = {"pad_id": encoder.tokenizer.pad_token_id, "vocab_size": sampling["vocab_size"]}
    same = exposure_bias(teacher.model, teacher, own, theirs, kinds=("reverse_kl", "tvd"), **common)
    for kind in ("reverse_kl", "tvd"):
        assert same[kind]["div_on_student"] == pytest.approx(0.0, abs=1e-6)
        assert same[kind]["exposure_gap"] == pytest.approx(0.0, abs=1e-6)
    gap = exposure_bias(student, teacher, own, theirs, **common)["reverse_kl"]
    assert gap["div_on_student"] > 0 and gap["div_on_teacher"] > 0
    assert gap["exposure_gap"] == pytest.approx(gap["div_on_student"] - gap["div_on_teacher"])


def test_task_accuracy_counts_metric_hits_and_is_nan_without_rows(setup):
    student, _, encoder, rows, sampling = setup
    always = task_accuracy(student, encoder, rows, lambda text, row: True, **sampling)
    never = task_accuracy(student, encoder, rows, lambda text, row: False, **sampling)
    assert (always, never) == (1.0, 0.0)
    assert math.isnan(task_accuracy(student, encoder, [], lambda t, r: True, **sampling))


def test_precomputed_teacher_states_give_the_same_divergences(setup):
    student, teacher, encoder, rows, sampling = setup
    samples = sample_completions(teacher.model, encoder, rows, **sampling, seed=3)
    common = {
        "pad_id": encoder.tokenizer.pad_token_id,
        "vocab_size": sampling["vocab_size"],
        "kinds": ("jsd", "tvd"),
        "beta": 0.5,
        "batch_size": 4,
    }
    fresh = mean_divergences(student, teacher, *samples, **common)
    logits = teacher_states(teacher, *samples, pad_id=common["pad_id"], batch_size=4)
    assert len(logits) == 3
    assert mean_divergences(student, teacher, *samples, **common, precomputed=logits) == fresh


def test_row_chunks_equal_full_logits(setup, monkeypatch):
    """Divergences and the held-out loss come from hidden states, `ROWS` positions at a time
    (never `[B, L, V]` logits); with chunks of 7 positions they equal full-logit float64."""
    from opd.evaluation import divergence as module

    monkeypatch.setattr(module, "ROWS", 7)
    student, teacher, encoder, rows, sampling = setup
    prompts, completions = sample_completions(student, encoder, rows, **sampling, seed=0)
    pad, vocab = encoder.tokenizer.pad_token_id, sampling["vocab_size"]
    got = mean_divergences(
        student, teacher, prompts, completions, pad_id=pad, vocab_size=vocab,
        kinds=("reverse_kl", "jsd"), beta=0.3, batch_size=6,
    )  # fmt: skip
    batch = assemble(prompts, completions, pad_id=pad)
    with torch.no_grad():
        s = completion_logits(student, batch, vocab).double()
        t = completion_logits(teacher.model, batch, vocab).double()
    mask = batch.loss_mask()
    ls, lt = s.log_softmax(-1)[mask], t.log_softmax(-1)[mask]
    rkl = (ls.exp() * (ls - lt)).sum(-1).mean()
    m = torch.logsumexp(torch.stack([lt + math.log(0.3), ls + math.log(0.7)]), 0)
    jsd = (0.3 * (lt.exp() * (lt - m)).sum(-1) + 0.7 * (ls.exp() * (ls - m)).sum(-1)).mean()
    assert got["reverse_kl"] == pytest.approx(float(rkl), rel=1e-5)
    assert got["jsd"] == pytest.approx(float(jsd), rel=1e-5)

    loss = heldout_loss(
        student, encoder, rows, prompt_field="prompt", completion_field="completion",
        vocab_size=vocab, batch_size=4,
    )  # fmt: skip
    batch = assemble(
        [encoder.prompt_ids(r["prompt"]) for r in rows],
        [encoder.completion_ids(r["completion"]) for r in rows],
        pad_id=pad,
    )
    with torch.no_grad():
        lp = completion_logits(student, batch, vocab).double().log_softmax(-1)
    nll = -lp.gather(-1, batch.completion_ids().unsqueeze(-1)).squeeze(-1)[batch.loss_mask()]
    assert loss == pytest.approx(float(nll.mean()), rel=1e-5)
