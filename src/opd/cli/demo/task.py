"""The demo task: a running count of odd terms (mod 10), step by step, 2 to 16 steps.

    prompt      "ODD:a3b8c4d9\n"
    completion  "a1b1c1d2#2"        step i: its label, then how many of x_1..x_i are odd, mod 10
    answer      "2"

Why this task: the exposure-bias argument needs a situation where the student's
slip leads to a state never seen under teacher forcing, from which a correct answer is
still reachable, and a teacher that reaches it. Each step is easy from the step before
(look up term i by its label, add one if it is odd) and hard from the prompt alone (a
count over a prefix), so a model trained on clean text carries a slip forward: every
later value is then off by the same amount, and so is the answer. Longer problems give
more chances to slip, so accuracy falls with length, as roughly (1 - per-step error)^steps.
(A running sum of digits mod 10 has the same structure; tiny models learn its addition
table too slowly for a demo on two CPU cores, the count's "+0 or +1" quickly.)

A correct answer stays reachable: a step may be written again under the same label,
`...c7c1d2...`, and the later value counts (a correction, as a language model that
notices an error writes "wait, ..."). Clean solutions never contain one. The demo's
teacher is trained on solutions in which corrupted steps are each followed by their
correction (`corrupt`), so from a prefix holding a slip it writes the fix; the student
never sees a correction unless it is trained on its own prefixes. Whether on-policy
distillation teaches the student to correct its own slips, and not only to slip less,
is the demo's question.

Characters used: digits, lowercase labels, "ODD:" (upper case: a label letter in it
would be read as a step), "#", newline, all in the tiny character tokenizer. Train, dev
and eval splits are disjoint by construction: a prompt belongs to exactly one split (a
stable hash of its text), whatever the seed.
"""

from __future__ import annotations

import itertools
import random
import re
import string
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass

SPLITS = ("train", "dev", "eval")
LABELS = string.ascii_lowercase
ANSWER_MARK = "#"
_BUCKETS = 16  # 1 in 16 of all prompts is eval, 1 in 16 dev, the rest train
_ANSWER_RE = re.compile(r"#(\d)")
_STEP_RE = re.compile(r"([a-z])(\d)")


@dataclass(frozen=True)
class TaskSpec:
    """Problem lengths are drawn uniformly from [min_steps, max_steps]; terms from 0..max_term."""

    min_steps: int = 2
    max_steps: int = 16
    max_term: int = 9

    def __post_init__(self) -> None:
        if not 2 <= self.min_steps <= self.max_steps <= len(LABELS):
            raise ValueError(
                f"TaskSpec: need 2 <= min_steps <= max_steps <= {len(LABELS)}, "
                f"got {self.min_steps}, {self.max_steps}"
            )
        if not 1 <= self.max_term <= 9:
            raise ValueError(f"TaskSpec: max_term must be in 1..9, got {self.max_term}")

    def to_dict(self) -> dict:
        return asdict(self)


DEFAULT_SPEC = TaskSpec()


def split_of(prompt: str) -> str:
    """The split a prompt belongs to; stable across runs and Python versions."""
    bucket = zlib.crc32(prompt.encode()) % _BUCKETS
    return "eval" if bucket == 0 else "dev" if bucket == 1 else "train"


def running_sums(values: Sequence[int]) -> list[int]:
    """The value of each step: how many of x_1..x_i are odd, mod 10."""
    out, total = [], 0
    for v in values:
        total = (total + v % 2) % 10
        out.append(total)
    return out


def render(values: Sequence[int]) -> dict:
    """The example (prompt, worked completion, answer, terms) for a list of digits."""
    if not 1 <= len(values) <= len(LABELS) or not all(0 <= v <= 9 for v in values):
        raise ValueError(f"terms must be 1..{len(LABELS)} digits, got {list(values)}")
    prompt = "ODD:" + "".join(f"{LABELS[i]}{v}" for i, v in enumerate(values)) + "\n"
    sums = running_sums(values)
    completion = "".join(f"{LABELS[i]}{m}" for i, m in enumerate(sums))
    completion += f"{ANSWER_MARK}{sums[-1]}"
    return {
        "prompt": prompt,
        "completion": completion,
        "answer": str(sums[-1]),
        "values": list(values),
    }


def max_completion_chars(spec: TaskSpec = DEFAULT_SPEC, corrections: int = 2) -> int:
    """Length of the longest clean completion plus room for a few corrections."""
    return 2 * (spec.max_steps + corrections) + 2


def make_examples(
    n: int,
    seed: int,
    split: str = "train",
    spec: TaskSpec = DEFAULT_SPEC,
    steps: int | None = None,
) -> list[dict]:
    """`n` examples of `split`, deterministic in the arguments.

    With `steps`, all have that many steps and no problem repeats; a split holds only
    about 1/16 of the problems of a short length (100 of length 2), so fewer than `n`
    come back when fewer exist."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    if steps is not None and not 2 <= steps <= len(LABELS):
        raise ValueError(f"steps must be in 2..{len(LABELS)}, got {steps}")
    rng = random.Random(f"opd-demo-odd:{split}:{seed}:{steps}")
    if steps is not None and (spec.max_term + 1) ** steps <= 100_000:
        every = [render(v) for v in itertools.product(range(spec.max_term + 1), repeat=steps)]
        mine = [e for e in every if split_of(e["prompt"]) == split]
        rng.shuffle(mine)
        return mine[:n]
    out: list[dict] = []
    seen: set[str] = set()
    while len(out) < n:
        k = steps or rng.randint(spec.min_steps, spec.max_steps)
        example = render([rng.randint(0, spec.max_term) for _ in range(k)])
        if split_of(example["prompt"]) != split or (steps and example["prompt"] in seen):
            continue
        seen.add(example["prompt"])
        out.append(example)
    return out


def corrupt(example: dict, rng: random.Random, max_slips: int = 2) -> tuple[str, list[int]]:
    """The completion with 1..max_slips steps written wrong, each followed by its
    correction, and the character offsets of the wrong digits (context, never a training
    target: the teacher learns to correct a slip, not to make one)."""
    values, sums = example["values"], running_sums(example["values"])
    slipped = set(rng.sample(range(len(values)), min(len(values), rng.randint(1, max_slips))))
    text, wrong_at = "", []
    for i, m in enumerate(sums):
        if i in slipped:
            wrong_at.append(len(text) + 1)
            text += f"{LABELS[i]}{rng.choice([d for d in range(10) if d != m])}"
        text += f"{LABELS[i]}{m}"
    return f"{text}{ANSWER_MARK}{sums[-1]}", wrong_at


def slipped_prefix(example: dict, i: int, wrong: int) -> str:
    """Clean completion text up to step i (0-based), whose value is written as `wrong`."""
    if wrong == running_sums(example["values"])[i]:
        raise ValueError(f"{wrong} is the right value of step {i}, not a slip")
    return f"{example['completion'][: 2 * i + 1]}{wrong}"


def attempts(text: str) -> list[tuple[int, int]]:
    """The (step index, value) pairs written before the answer mark, in order; parsing
    stops at the first character that is not a label-digit pair."""
    out, pos = [], 0
    while (match := _STEP_RE.match(text, pos)) is not None:
        out.append((LABELS.index(match[1]), int(match[2])))
        pos = match.end()
    return out


def step_correct(text: str, example: dict) -> list[bool]:
    """Per step of the example, whether the text's final value for it (the last one written
    under its label, so a correction counts) is right. Steps never written are wrong."""
    final: dict[int, int] = {}
    for step, value in attempts(text):
        final[step] = value
    return [final.get(i) == m for i, m in enumerate(running_sums(example["values"]))]


def extract_answer(text: str) -> str | None:
    """The digit after the first '#', or None (no answer yet, or not a digit)."""
    match = _ANSWER_RE.search(text)
    return None if match is None else match.group(1)


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
