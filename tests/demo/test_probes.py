"""The demo's measurements: intervals, slip chains, forced slips, divergence by position."""

import math

import pytest
import torch

from opd.cli.demo import probes
from opd.cli.demo.task import make_examples, render
from opd.cli.demo.tiny import build_char_tokenizer, tiny_causal_lm
from opd.config.parse import DataConfig
from opd.data.batch import assemble
from opd.data.rows import Encoder
from opd.evaluation.divergence import divergence_by_position, mean_divergences
from opd.evaluation.generation import sample_completions
from opd.teachers.local import LocalTeacher


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models():
    tok = build_char_tokenizer()
    kw = {"pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id, "layers": 1}
    student = tiny_causal_lm(len(tok), hidden=16, heads=2, seed=1, **kw).eval()
    teacher = tiny_causal_lm(len(tok), hidden=24, heads=2, seed=2, **kw).eval()
    return tok, student, teacher


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_more_problems():
    few = [1.0, 0.0] * 10
    many = [1.0, 0.0] * 500
    lo, hi = probes.bootstrap_ci(few)
    assert lo < 0.5 < hi
    lo2, hi2 = probes.bootstrap_ci(many)
    assert lo < lo2 < 0.5 < hi2 < hi
    assert probes.bootstrap_ci([1.0] * 5) == [1.0, 1.0]
    assert all(math.isnan(x) for x in probes.bootstrap_ci([]))


def test_slip_chain_separates_carrying_a_slip_from_correcting_it():
    ex = render([3, 7, 4, 9])  # a1 b2 c2 d3
    carried = probes.slip_chain(["a1b2c7d8#8"], [ex])
    assert carried["p_wrong_after_wrong"] == 1.0 and carried["p_wrong_after_right"] == 1 / 2
    fixed = probes.slip_chain(["a1b2c7c2d3#3"], [ex])
    assert fixed["p_wrong_after_wrong"] == 0.0 and fixed["corrections_per_problem"] == 1.0
    clean = probes.slip_chain([ex["completion"]], [ex])
    assert math.isnan(clean["p_wrong_after_wrong"]) and clean["p_wrong_after_right"] == 0.0


def test_score_texts_averages_samples_per_problem():
    a, b = render([1, 2]), render([3, 3])  # a1b1#1, a1b2#2
    texts = ["a1b1#1", "a1b2#2", "a1b2#2", "a1b2#2"]
    scores = probes.score_texts(texts, [a, b], samples=2)
    assert scores["answer"] == [0.5, 1.0] and scores["all_steps"] == [0.5, 1.0]


def test_forced_slips_are_probabilities_and_react_to_the_model(models):
    tok, student, teacher = models
    rows = make_examples(12, 0, "eval", steps=5)
    a = probes.forced_slips(student, tok, rows, seed=0)
    assert a == probes.forced_slips(student, tok, rows, seed=0)
    assert set(a) == {"clean_error", "fix_after_slip", "carry_on"}
    for values in a.values():
        assert len(values) == len(rows) and all(0.0 <= v <= 1.0 for v in values)
    b = probes.forced_slips(teacher, tok, rows, seed=0)
    assert a["clean_error"] != b["clean_error"]


def test_from_corrupted_prefix_scores_the_whole_text(models):
    tok, student, _ = models
    encoder = Encoder(tok, DataConfig())
    rows = make_examples(6, 0, "eval", steps=4)
    scores = probes.from_corrupted_prefix(
        student, encoder, rows, seed=0, temperature=1.0, max_new_tokens=12
    )
    assert len(scores) == len(rows) and set(scores) <= {0.0, 1.0}


def test_divergence_by_position_weights_back_to_the_mean(models):
    tok, student, teacher_model = models
    teacher = LocalTeacher(teacher_model, len(tok))
    encoder = Encoder(tok, DataConfig())
    rows = make_examples(9, 0, "eval")
    kw = {"prompt_field": "prompt", "max_new_tokens": 14, "vocab_size": len(tok)}
    prompts, completions = sample_completions(student, encoder, rows, **kw, seed=3)
    common = {"pad_id": tok.pad_token_id, "vocab_size": len(tok), "kinds": ("tvd", "reverse_kl")}
    by_pos = divergence_by_position(student, teacher, prompts, completions, **common, batch_size=4)
    mean = mean_divergences(student, teacher, prompts, completions, **common, batch_size=4)
    counts = by_pos["count"]
    assert counts[0] == len(rows) and counts == sorted(counts, reverse=True)
    for kind in ("tvd", "reverse_kl"):
        weighted = sum(v * c for v, c in zip(by_pos[kind], counts)) / sum(counts)
        assert weighted == pytest.approx(mean[kind], rel=1e-5)
    # Position 0 by hand: the first completion token of every row.
    batch = assemble(prompts, completions, pad_id=tok.pad_token_id)
    with torch.no_grad():
        s = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        t = teacher_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    p = batch.prompt_width - 1
    tvd = 0.5 * (s[:, p].softmax(-1) - t[:, p].softmax(-1)).abs().sum(-1).mean()
    assert by_pos["tvd"][0] == pytest.approx(float(tvd), rel=1e-4)
