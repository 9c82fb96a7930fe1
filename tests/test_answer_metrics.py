"""exact_match, boxed and regex, for eval_metric and reward.function alike."""

import pytest

from opd.evaluation.rewards import last_boxed, normalize_answer, resolve_metric, resolve_reward


@pytest.mark.parametrize(
    "text,answer",
    [
        ("42", "42"),
        (" 42. ", "42"),
        ("#### 1,000", "1000"),
        ("so \\boxed{42}.", "42"),
        ("New York.", "new york"),  # multi-word answers
        ("3.50", "3.5"),
        ("#7", "7"),
        ("the answer is 8, not 7 #7", "7"),
    ],
)
def test_exact_match_on_normalized_final_answer(text, answer):
    assert resolve_metric("exact_match")(text, {"answer": answer}) == 1.0


@pytest.mark.parametrize(
    "text,answer",
    [
        ("The answer is 42.", "4"),
        ("#### 41", "42"),
        # The answer is not the final answer just because the completion ends with it.
        ("the answer is 8, not 7", "7"),
        ("the answer is 8, not 7", "8"),
        ("The answer is 42.", "42"),
        ("It is New York.", "new york"),
    ],
)
def test_exact_match_refuses_near_misses(text, answer):
    assert resolve_metric("exact_match")(text, {"answer": answer}) == 0.0


def test_last_number_reads_the_completions_last_number_by_value():
    metric = resolve_metric("last_number")
    assert metric("The answer is 42.", {"answer": "42"}) == 1.0
    assert metric("x = 3.50", {"answer": "3.5"}) == 1.0
    assert metric("so 1,000 apples", {"answer": 1000}) == 1.0
    assert metric("7, no, 8", {"answer": "8"}) == 1.0
    assert metric("the answer is 8, not 7", {"answer": "8"}) == 0.0  # the last number is 7
    assert metric("-3", {"answer": "-3"}) == 1.0 and metric("no idea", {"answer": "0"}) == 0.0
    assert metric("12+7=19", {"answer": "19"}) == 1.0


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
