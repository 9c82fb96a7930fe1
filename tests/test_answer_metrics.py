"""exact_match, boxed and regex, for eval_metric and reward.function alike."""

import pytest

from opd.evaluation.rewards import last_boxed, normalize_answer, resolve_metric, resolve_reward


@pytest.mark.parametrize(
    "text,answer",
    [
        ("The answer is 42.", "42"),
        ("#### 1,000", "1000"),
        ("so \\boxed{42}.", "42"),
        ("It is New York.", "new york"),  # multi-word answers
        ("x = 3.50", "3.5"),
        ("#7", "7"),
    ],
)
def test_exact_match_on_normalized_final_answer(text, answer):
    assert resolve_metric("exact_match")(text, {"answer": answer}) == 1.0


@pytest.mark.parametrize("text,answer", [("The answer is 42.", "4"), ("#### 41", "42")])
def test_exact_match_refuses_near_misses(text, answer):
    assert resolve_metric("exact_match")(text, {"answer": answer}) == 0.0


def test_boxed_extracts_the_last_balanced_box():
    boxed = resolve_reward("boxed")
    assert last_boxed(r"first \boxed{1} then \boxed{\frac{1}{2}}.") == r"\frac{1}{2}"
    assert boxed(r"so \boxed{\frac{1}{2}}.", {"answer": r"\frac{1}{2}"}) == 1.0
    assert boxed(r"\boxed{42}.", {"answer": 42}) == 1.0  # numeric answers compare by value
    assert boxed("42", {"answer": "42"}) == 0.0  # no box, no credit
    assert boxed(r"\boxed{42", {"answer": "42"}) == 0.0  # unclosed


def test_regex_uses_the_last_match_group_normalized():
    metric = resolve_metric("regex", pattern=r"answer: (\S+)")
    assert metric("answer: 3 ... answer: 19.", {"answer": "19"}) == 1.0
    assert metric("19", {"answer": "19"}) == 0.0
    whole = resolve_metric("regex", pattern=r"\d+")
    assert whole("7 then 8", {"answer": "8"}) == 1.0


def test_normalization_and_missing_answer():
    assert normalize_answer("  $1,234.0$ ") == "1234"
    assert normalize_answer("Paris!") == "paris"
    with pytest.raises(KeyError, match="needs column 'answer'"):
        resolve_metric("exact_match")("1", {"prompt": "x"})
