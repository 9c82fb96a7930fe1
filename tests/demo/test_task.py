"""The demo task (generator, answer parsing, rewards) and the cached teacher/student build."""

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd.demo import build
from opd.demo.build import (
    BuildConfig,
    ModelSpec,
    build_models,
    collate_right_padded,
    greedy_generate,
    pretrain_causal_lm,
)
from opd.demo.task import (
    TaskSpec,
    accuracy,
    check_charset,
    exact_match,
    extract_answer,
    make_examples,
    max_completion_chars,
    render,
    split_of,
)
from opd.demo.tiny import build_char_tokenizer, tiny_causal_lm


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
    assert all(split_of(p) == "dev" for p in dev)
    with pytest.raises(ValueError, match="split"):
        make_examples(1, seed=0, split="test")


def test_scratchpad_is_a_correct_running_sum_of_the_prompt():
    for ex in make_examples(300, seed=0, split="train"):
        terms = [int(t[1:]) for t in ex["prompt"].removeprefix("sum:").strip().split(",")]
        assert 6 <= len(terms) <= 8
        steps = ex["completion"].split("#")[0].split(";")
        total = terms[0]
        for i, step in enumerate(steps, start=1):
            m = re.fullmatch(r"([a-z]):(\d+)\+(\d+)=(\d+)", step)
            assert m, step
            assert ord(m[1]) - ord("a") == i and int(m[2]) == total and int(m[3]) == terms[i]
            total += terms[i]
            assert int(m[4]) == total
        assert ex["answer"] == str(sum(terms)) == str(total)
        assert 30 <= len(ex["completion"]) <= max_completion_chars() <= 80
    check_charset(make_examples(300, seed=0, split="eval"))


def test_extract_answer_and_rewards():
    ex = render([3, 7, 4])
    assert ex["completion"] == "b:3+7=10;c:10+4=14#14"
    assert extract_answer(ex["completion"]) == "14"
    assert extract_answer(ex["completion"] + "<eos><pad>") == "14"
    # An early mistake carried to the end: well-formed, wrong answer.
    wrong = "b:3+7=11;c:11+4=15#15"
    assert extract_answer(wrong) == "15"
    assert exact_match(wrong, ex) == 0.0
    assert exact_match(ex["completion"], ex) == 1.0
    # Truncated before the answer, or an answer that is not a number.
    assert extract_answer("b:3+7=10;c:10+4=1") is None
    assert extract_answer("b:3+7=10;c:10+4=14#") is None
    assert extract_answer("b:3+7=10#x") is None
    assert exact_match("", ex) == 0.0
    assert accuracy([ex["completion"], wrong], [ex, ex]) == 0.5
    with pytest.raises(ValueError):
        accuracy([wrong], [ex, ex])


def test_task_spec_validates():
    with pytest.raises(ValueError, match="min_terms"):
        TaskSpec(min_terms=5, max_terms=4)
    ex = make_examples(20, seed=0, split="train", spec=TaskSpec(min_terms=3, max_terms=3))
    assert all(e["prompt"].count(",") == 2 for e in ex)


def test_collate_masks_exactly_completion_and_eos():
    ids, attn, loss = collate_right_padded([([5, 6], [7, 1]), ([5], [8, 9, 1])], pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 1], [5, 8, 9, 1]]
    assert attn.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]
    assert loss.tolist() == [[False, False, True, True], [False, True, True, True]]
    ids, attn, loss = collate_right_padded([([5], [1]), ([5, 6], [7, 8, 1])], pad_id=0)
    assert ids[0].tolist() == [5, 1, 0, 0, 0] and attn[0].tolist() == [1, 1, 0, 0, 0]
    assert loss[0].tolist() == [False, True, False, False, False]


def _tiny_model(tok, seed=0):
    return tiny_causal_lm(
        len(tok), hidden=32, layers=1, pad_token_id=tok.pad_token_id, eos_token_id=1, seed=seed
    )


def test_pretrain_lowers_completion_loss():
    torch.manual_seed(0)
    tok = build_char_tokenizer()
    model = _tiny_model(tok)
    losses = pretrain_causal_lm(
        model, tok, make_examples(64, 0, "train"), steps=20, batch_size=8, lr=1e-2, seed=0
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
    prompts = ["sum:a1,b2\n", "sum:a1,b2,c3,d4,e5\n", "sum:a9,b9,c9\n"]
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
    base = {"num_train": 32, "num_dev": 2, "num_eval": 4, "max_new_tokens": 4}
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


def test_presets_are_distinct_and_student_is_much_smaller():
    quick, full = BuildConfig.preset(True), BuildConfig.preset(False)
    assert build.config_hash(quick, 0) != build.config_hash(full, 0)
    assert build.config_hash(full, 0) != build.config_hash(full, 1)
    for cfg in (quick, full):
        tok = build_char_tokenizer()
        t = build._new_model(tok, cfg.teacher, 0)
        s = build._new_model(tok, cfg.student, 0)
        assert build.count_params(t) >= 3.5 * build.count_params(s)
