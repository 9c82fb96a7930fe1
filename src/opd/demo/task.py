"""The demo task: a running sum of labelled terms, written out step by step.

    prompt      "sum:a3,b7,c4,d9,e2,f8\n"
    completion  "b:3+7=10;c:10+4=14;d:14+9=23;e:23+2=25;f:25+8=33#33"
    answer      "33"

Every step copies the previous result and adds the next term, so a single wrong digit
early in the scratchpad is carried through every later step to the final answer: with
per-step accuracy p and n steps, the answer is right with probability about p^n. The
state after a mistake ("c:10+4=15;d:15+9=24") is still well formed, so a model trained
only on correct prefixes (teacher forcing) has never been in it; this is the exposure
bias that on-policy distillation targets (GKD, Agarwal et al. 2024).

The letters make the "which term is next" lookup content-based (find the step's label in
the prompt, copy the digit after it: an induction head), which a two-layer model learns
in a few hundred steps. Without them the model has to count steps to find the term by
position; in our runs that took several times longer to learn (65% vs 94% accuracy
after 600 vs 400 steps of batch 32).

Only characters of `opd.demo.tiny.DEFAULT_CHARS` are used. The train, dev and eval splits are
disjoint by construction, not only by seed: a prompt belongs to exactly one split (by a
stable hash of its text), and each split's generator rejects prompts of the others.
"""

from __future__ import annotations

import random
import re
import string
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from opd.demo.tiny import DEFAULT_CHARS

SPLITS = ("train", "dev", "eval")
ANSWER_MARK = "#"
_BUCKETS = 16  # 1 in 16 of all prompts is eval, 1 in 16 dev (early stopping), the rest train
_ANSWER_RE = re.compile(r"#(\d+)")


@dataclass(frozen=True)
class TaskSpec:
    """Size of the problems: the number of terms is drawn uniformly from [min_terms, max_terms]."""

    min_terms: int = 6
    max_terms: int = 8
    max_value: int = 9  # terms are drawn uniformly from 0..max_value

    def __post_init__(self) -> None:
        if not 2 <= self.min_terms <= self.max_terms:
            raise ValueError(
                f"TaskSpec: need 2 <= min_terms <= max_terms, got {self.min_terms}, {self.max_terms}"
            )
        if self.max_value < 1:
            raise ValueError(f"TaskSpec: max_value must be >= 1, got {self.max_value}")

    def to_dict(self) -> dict:
        return asdict(self)


DEFAULT_SPEC = TaskSpec()


def split_of(prompt: str) -> str:
    """The split a prompt belongs to; stable across runs and Python versions."""
    bucket = zlib.crc32(prompt.encode()) % _BUCKETS
    return "eval" if bucket == 0 else "dev" if bucket == 1 else "train"


def render(terms: Sequence[int]) -> dict:
    """The example (prompt, worked completion, answer) for a list of terms."""
    labels = string.ascii_lowercase
    prompt = "sum:" + ",".join(f"{labels[i]}{t}" for i, t in enumerate(terms)) + "\n"
    steps, total = [], terms[0]
    for i, term in enumerate(terms[1:], start=1):
        steps.append(f"{labels[i]}:{total}+{term}={total + term}")
        total += term
    completion = ";".join(steps) + f"{ANSWER_MARK}{total}"
    return {"prompt": prompt, "completion": completion, "answer": str(total)}


def max_completion_chars(spec: TaskSpec = DEFAULT_SPEC) -> int:
    """Length of the longest possible completion (add one token for EOS when sampling)."""
    return len(render([spec.max_value] * spec.max_terms)["completion"])


def make_examples(n: int, seed: int, split: str = "train", spec: TaskSpec = DEFAULT_SPEC) -> list:
    """`n` examples of `split`, a deterministic function of (n, seed, split, spec)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    rng = random.Random(f"opd-demo:{split}:{seed}")
    out: list[dict] = []
    while len(out) < n:
        k = rng.randint(spec.min_terms, spec.max_terms)
        terms = [rng.randint(0, spec.max_value) for _ in range(k)]
        example = render(terms)
        if split_of(example["prompt"]) == split:
            out.append(example)
    return out


def extract_answer(text: str) -> str | None:
    """The final answer of a generated completion: the integer after the first '#'.

    None when there is no answer yet (truncated generation) or it is not an integer.
    Anything after the answer's digits (an EOS string, padding) is ignored.
    """
    match = _ANSWER_RE.search(text)
    return None if match is None else str(int(match.group(1)))


def exact_match(completion_text: str, example: dict) -> float:
    """1.0 if the completion's final answer equals the example's, else 0.0 (an RL reward)."""
    return 1.0 if extract_answer(completion_text) == example["answer"] else 0.0


def accuracy(completions: Sequence[str], examples: Sequence[dict]) -> float:
    """Mean exact match of completions against their examples."""
    if len(completions) != len(examples):
        raise ValueError(f"{len(completions)} completions for {len(examples)} examples")
    if not examples:
        return 0.0
    return sum(exact_match(c, e) for c, e in zip(completions, examples)) / len(examples)


def check_charset(examples: Sequence[dict], chars: str = DEFAULT_CHARS) -> None:
    """Raise if any example uses a character the demo tokenizer does not have."""
    allowed = set(chars)
    for ex in examples:
        bad = set(ex["prompt"] + ex["completion"]) - allowed
        if bad:
            raise ValueError(f"characters {sorted(bad)!r} are not in the tokenizer: {ex}")
