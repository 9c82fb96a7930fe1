"""The demo task (generator, corrections, parsing), its pre-training and the cached build."""

import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd.cli.demo import build
from opd.cli.demo.build import BuildConfig, ModelSpec, build_models
from opd.cli.demo.pretrain import (
    collate_right_padded,
    encode_example,
    greedy_generate,
    pretrain_causal_lm,
)
from opd.cli.demo.task import (
    TaskSpec,
    accuracy,
    attempts,
    corrupt,
    exact_match,
    extract_answer,
    make_examples,
    max_completion_chars,
    render,
    running_sums,
    slipped_prefix,
    split_of,
    step_correct,
)
from opd.cli.demo.tiny import DEFAULT_CHARS, build_char_tokenizer, tiny_causal_lm


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models gain nothing from a second thread, and on a busy shared machine two
    # OpenMP threads waiting for each other make a test 10-20x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_generator_is_deterministic_and_seeded():
    a = make_examples(50, seed=3, split="train")
    assert a == make_examples(50, seed=3, split="train")
    assert a != make_examples(50, seed=4, split="train")
    assert make_examples(20, seed=3, split="train") == a[:20]


def test_splits_are_disjoint_even_across_seeds():
    train = {e["prompt"] for s in (0, 1) for e in make_examples(2000, seed=s, split="train")}
    dev = {e["prompt"] for s in (0, 1) for e in make_examples(300, seed=s, split="dev")}
    evals = {e["prompt"] for s in (0, 1) for e in make_examples(300, seed=s, split="eval")}
    assert not train & evals and not train & dev and not dev & evals
    assert all(split_of(p) == "eval" for p in evals)
    with pytest.raises(ValueError, match="split"):
        make_examples(1, seed=0, split="test")


def test_fixed_length_sets_never_repeat_and_stop_when_the_split_runs_out():
    long = make_examples(96, 0, "eval", steps=12)
    assert len(long) == 96 and len({e["prompt"] for e in long}) == 96
    assert all(len(e["values"]) == 12 for e in long)
    short = make_examples(96, 0, "eval", steps=2)  # 100 problems, 1 in 16 held out
    assert 2 < len(short) < 20 and len({e["prompt"] for e in short}) == len(short)
    small = make_examples(96, 0, "eval", TaskSpec(max_term=3), steps=12)
    assert max(v for e in small for v in e["values"]) == 3


def test_solution_is_the_running_count_of_odd_terms_mod_10():
    ex = render([3, 8, 4, 9])
    assert ex["prompt"] == "ODD:a3b8c4d9\n"
    assert ex["completion"] == "a1b1c1d2#2" and ex["answer"] == "2"
    assert running_sums([9] * 11) == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    for ex in make_examples(200, seed=0, split="train"):
        assert 2 <= len(ex["values"]) <= 16
        assert all(step_correct(ex["completion"], ex))
        assert len(ex["completion"]) <= max_completion_chars()
        assert set(ex["prompt"] + ex["completion"]) <= set(DEFAULT_CHARS)


def test_corruption_writes_a_wrong_step_then_its_correction():
    rng = random.Random(0)
    for ex in make_examples(100, seed=1, split="train"):
        text, wrong_at = corrupt(ex, rng)
        truth = running_sums(ex["values"])
        assert 1 <= len(wrong_at) <= 2
        steps = attempts(text)
        for offset in wrong_at:
            label, digit = text[offset - 1], int(text[offset])
            step = ord(label) - ord("a")
            assert digit != truth[step]
            # the very next step is the same label with the right value
            assert text[offset + 1] == label and int(text[offset + 2]) == truth[step]
        assert all(step_correct(text, ex)) and exact_match(text, ex) == 1.0
        assert len(steps) == len(ex["values"]) + len(wrong_at)


def test_step_correct_counts_a_correction_and_carries_a_slip_forward():
    ex = render([3, 7, 4, 9])  # a1 b2 c2 d3
    assert step_correct("a1b2c7c2d3#3", ex) == [True] * 4
    carried = "a1b2c7d8#8"  # slip at c, carried forward
    assert step_correct(carried, ex) == [True, True, False, False]
    assert exact_match(carried, ex) == 0.0
    assert step_correct("a1b2", ex) == [True, True, False, False]
    assert step_correct("a1x2", ex) == [True, False, False, False]
    assert attempts("a1b2c7c2d3#3") == [(0, 1), (1, 2), (2, 7), (2, 2), (3, 3)]
    assert slipped_prefix(ex, 2, 7) == "a1b2c7"
    with pytest.raises(ValueError, match="right value"):
        slipped_prefix(ex, 2, 2)


def test_extract_answer_and_rewards():
    ex = render([3, 7, 4])
    assert extract_answer(ex["completion"]) == "2"
    assert extract_answer(ex["completion"] + "<eos><pad>") == "2"
    assert extract_answer("a1b2c2") is None and extract_answer("a1#x") is None
    assert exact_match("", ex) == 0.0
    assert accuracy([ex["completion"], "a1b1c1#1"], [ex, ex]) == 0.5
    with pytest.raises(ValueError):
        accuracy(["a"], [ex, ex])


def test_task_spec_validates():
    with pytest.raises(ValueError, match="min_steps"):
        TaskSpec(min_steps=5, max_steps=4)
    with pytest.raises(ValueError, match="max_term"):
        TaskSpec(max_term=10)


def test_corrupted_digits_are_context_not_targets():
    tok = build_char_tokenizer()
    ex = render([3, 7, 4, 9])
    prompt, comp, mask = encode_example(tok, ex, random.Random(2))
    text = tok.decode(comp[:-1])
    wrong = [i for i, keep in enumerate(mask) if not keep]
    assert wrong and all(text[i + 1] == text[i - 1] for i in wrong)  # label repeated next
    _, clean_comp, clean_mask = encode_example(tok, ex)
    assert all(clean_mask) and tok.decode(clean_comp[:-1]) == ex["completion"]
    _, _, loss = collate_right_padded([(prompt, comp, mask)], pad_id=0)
    assert loss[0, len(prompt) + wrong[0]].item() is False
    assert int(loss.sum()) == len(comp) - len(wrong)


def test_collate_masks_exactly_completion_and_eos():
    pairs = [([5, 6], [7, 1], [True, True]), ([5], [8, 9, 1], [True, False, True])]
    ids, attn, loss = collate_right_padded(pairs, pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 1], [5, 8, 9, 1]]
    assert attn.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]
    assert loss.tolist() == [[False, False, True, True], [False, True, False, True]]


def _tiny_model(tok, seed=0):
    return tiny_causal_lm(
        len(tok), hidden=32, layers=1, pad_token_id=tok.pad_token_id, eos_token_id=1, seed=seed
    )


def test_pretrain_lowers_completion_loss():
    torch.manual_seed(0)
    tok = build_char_tokenizer()
    model = _tiny_model(tok)
    losses = pretrain_causal_lm(
        model,
        tok,
        make_examples(64, 0, "train"),
        steps=20,
        batch_size=8,
        lr=1e-2,
        seed=0,
        corrupt_prob=0.5,
    )
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_pretrain_stops_when_asked():
    tok = build_char_tokenizer()
    model = _tiny_model(tok)
    seen = []

    def stop(step):
        seen.append((step, model.training))
        return step >= 6

    losses = pretrain_causal_lm(
        model, tok, make_examples(16, 0, "train"), steps=50, batch_size=2, stop=stop, check_every=3
    )
    assert len(losses) == 6 and seen == [(3, False), (6, False)]
    assert not model.training


def test_left_padded_batch_generation_matches_one_by_one():
    tok = build_char_tokenizer()
    model = _tiny_model(tok, seed=1)
    prompts = ["ODD:a1b2\n", "ODD:a1b2c3d4e5\n", "ODD:a9b9c9\n"]
    batched = greedy_generate(model, tok, prompts, max_new_tokens=12)
    single = [greedy_generate(model, tok, [p], max_new_tokens=12)[0] for p in prompts]
    assert batched == single
    assert tok.padding_side == "right"  # restored


def _tiny_config(**kw) -> BuildConfig:
    spec = ModelSpec(hidden=16, layers=1, heads=2, steps=2, lr=1e-3, batch_size=4)
    # The student stops at its first check: any accuracy reaches a target of 0.
    student = ModelSpec(
        hidden=16,
        layers=1,
        heads=2,
        steps=5,
        lr=1e-3,
        batch_size=4,
        target_accuracy=0.0,
        check_every=1,
    )
    base = {"num_train": 32, "num_dev": 2, "num_eval": 4, "task": TaskSpec(max_steps=3)}
    return BuildConfig(teacher=spec, student=student, **{**base, **kw})


def test_build_writes_loadable_models_and_reuses_the_cache(tmp_path, monkeypatch):
    config = _tiny_config()
    paths = build_models(tmp_path, seed=0, config=config)
    meta = paths["meta"]
    assert meta["teacher"]["params"] > 0 and 0.0 <= meta["student"]["eval_accuracy"] <= 1.0
    for key in ("teacher_dir", "student_dir"):
        model = AutoModelForCausalLM.from_pretrained(paths[key])
        assert model.config.model_type == "llama"
        AutoTokenizer.from_pretrained(paths[key])
    tok = AutoTokenizer.from_pretrained(paths["tokenizer_dir"])
    ex = make_examples(1, 0, "train")[0]
    ids = tok(ex["prompt"] + ex["completion"], add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == ex["prompt"] + ex["completion"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".build-")]

    def no_rebuild(*args, **kwargs):
        raise AssertionError("cached build was not reused")

    monkeypatch.setattr(build, "_build_into", no_rebuild)
    again = build_models(tmp_path, seed=0, config=config)
    assert again["teacher_dir"] == paths["teacher_dir"] and again["meta"] == meta
    assert meta["teacher"]["steps"] == 2 and meta["student"]["steps"] == 1  # early stop
    # Another seed or config is another cache entry, never the stale one.
    with pytest.raises(AssertionError, match="not reused"):
        build_models(tmp_path, seed=1, config=config)
    with pytest.raises(AssertionError, match="not reused"):
        build_models(tmp_path, seed=0, config=_tiny_config(num_train=33))


def test_corrupt_cache_is_rebuilt(tmp_path):
    config = _tiny_config()
    paths = build_models(tmp_path, seed=0, config=config)
    meta_file = paths["teacher_dir"].parent / "meta.json"
    meta_file.write_text("{not json")
    again = build_models(tmp_path, seed=0, config=config)
    assert json.loads(meta_file.read_text())["config_hash"] == again["meta"]["config_hash"]
    AutoModelForCausalLM.from_pretrained(again["student_dir"])


def test_presets_share_one_build_and_student_is_much_smaller():
    quick, full = BuildConfig.preset(True), BuildConfig.preset(False)
    assert build.config_hash(quick, 0) == build.config_hash(full, 0)  # one cache entry
    assert build.config_hash(full, 0) != build.config_hash(full, 1)
    tok = build_char_tokenizer()
    t = build._new_model(tok, full.teacher, 0)
    s = build._new_model(tok, full.student, 0)
    assert build.count_params(t) >= 3.5 * build.count_params(s)
    assert full.teacher.corrupt_prob > 0 and full.student.corrupt_prob == 0
