"""What `opd generate --endpoint` asks an OpenAI-compatible server, and what it accepts back.

Two APIs: `completions` (the prompt is sent as the token ids opd's `Encoder` makes, chat
template included, when the cache is token-level; as text otherwise) and `chat` (the
messages are sent and the server applies its own chat template). In token-level mode the
vLLM extensions `return_token_ids` and `return_tokens_as_token_ids` make every token an
id (`"token_id:123"`), so nothing is re-tokenized and top-k entries that decode to the
same text stay apart.

vLLM puts the sampled token first in each position's log-prob list, then the top-k
(`vllm.logprobs.append_logprobs_for_next_position`): the completions API returns those
k + 1 entries, the chat API the first `top_logprobs` of them. So chat asks for k + 1 and
both sort by log-prob and keep k: the true top-k either way.

Every answer is checked before it is stored (a teacher answer is data from elsewhere), by
the rules every teacher answer obeys (`opd.teachers.answer_checks`): counts and lengths
agree and are bounded by the request, log-probs are finite and <= 0 (top entries may be
-inf), a position's top-k ids are distinct, inside the vocabulary and hold mass <= 1. An
answer that fails becomes a row error (`invalid`), counted and never trained on.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from opd.teachers.answer_checks import check_ids, check_logprobs, check_topk
from opd.teachers.errors import BadAnswer

SERVER = "endpoint"  # how `opd.teachers.answer_checks` names the source in a problem
TOKEN_IDS = re.compile(r"token_id:\d{1,9}(?: token_id:\d{1,9})*")  # `return_tokens_as_token_ids`
CHARS_PER_TOKEN = 256  # a completion's text bound: max_tokens * this, per choice
ERROR_FINISH = {"content_filter": "content_filter"}


@dataclass
class Answer:
    """One choice of one request, checked; `error` names why it cannot be trained on."""

    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    message: str = ""
    tokens: list[str] | None = None  # text caches: as the server wrote them
    token_ids: list[int] | None = None  # token-level caches
    token_logprobs: list[float] | None = None
    top: list[list[tuple]] | None = field(default=None, repr=False)  # text: [(token, lp)] desc
    top_ids: np.ndarray | None = field(default=None, repr=False)  # token-level: [T, k]
    top_logprobs: np.ndarray | None = field(default=None, repr=False)  # [T, k], desc

    @property
    def finished(self) -> bool:
        return self.error is None and self.finish_reason == "stop"


class InvalidAnswer(ValueError):
    pass


def request_payload(
    api: str,
    model: str,
    prompt,
    spec,
    *,
    n: int,
    seed: int | None,
    stop: list[str],
    token_level: bool,
    end_ids: list[int],
) -> dict:
    """The body of one request for `n` samples of one prompt (`spec`: the `CacheSpec`)."""
    payload = {
        "model": model,
        "max_tokens": spec.max_new_tokens,
        "temperature": spec.temperature,
        "top_p": spec.top_p,
        "n": n,
    }
    if seed is not None:
        payload["seed"] = seed
    if stop:
        payload["stop"] = list(stop)
    if spec.top_k:
        payload["top_k"] = spec.top_k  # a vLLM extension: sent only when asked for
    want_logprobs = token_level or spec.topk > 0
    if api == "chat":
        payload["messages"] = prompt
        if want_logprobs:
            payload["logprobs"] = True
            payload["top_logprobs"] = spec.topk + 1 if token_level and spec.topk else spec.topk
    else:
        payload["prompt"] = prompt
        if want_logprobs:
            payload["logprobs"] = spec.topk
    if token_level:
        payload["return_token_ids"] = True
        payload["return_tokens_as_token_ids"] = True
        payload["skip_special_tokens"] = False  # the text is then the decoded ids
        if api == "completions":
            payload["stop_token_ids"] = list(end_ids)  # what `--engine vllm` stops on
    return payload


def _numbers(values: list, what: str, neg_inf_ok: bool = False) -> np.ndarray:
    """Log-probs as float64, each a number, finite (or -inf where allowed) and <= 0 within
    the tolerance of `opd.teachers.answer_checks`."""
    try:
        check_logprobs(SERVER, what, values, neg_inf_ok)
    except BadAnswer as err:
        raise InvalidAnswer(err.problem) from None
    return np.minimum(np.asarray(values, dtype=np.float64), 0.0)


def _ids(tokens: list, vocab_size: int, what: str) -> np.ndarray:
    """Token ids from vLLM's `token_id:N` strings, each inside the vocabulary."""
    try:
        joined = " ".join(tokens)
    except TypeError:
        joined = None
    if joined is None or (tokens and not TOKEN_IDS.fullmatch(joined)):
        raise InvalidAnswer(f"{what}: a token is not of the form 'token_id:N'")
    ids = np.asarray(joined.replace("token_id:", "").split(), dtype=np.int64)  # digits only
    try:
        return check_ids(SERVER, what, ids, vocab_size)
    except BadAnswer as err:
        raise InvalidAnswer(err.problem) from None


def _logprob_lists(choice: dict, api: str):
    """(tokens, token log-probs, per-position top entries as (token, lp)) or None."""
    lp = choice.get("logprobs")
    if not lp:
        return None
    if api == "chat":
        content = lp.get("content") if isinstance(lp, dict) else None
        if not isinstance(content, list):
            return None
        tokens = [c.get("token") for c in content]
        values = [c.get("logprob") for c in content]
        tops = [[(t.get("token"), t.get("logprob")) for t in c.get("top_logprobs") or []]
                for c in content]  # fmt: skip
        return tokens, values, tops
    tokens, values, tops = lp.get("tokens"), lp.get("token_logprobs"), lp.get("top_logprobs")
    if not isinstance(tokens, list) or not isinstance(values, list):
        return None
    if not isinstance(tops, list):
        tops = [None] * len(tokens)
    return tokens, values, [list((t or {}).items()) for t in tops]


def check_answer(
    answer: Answer, lists, *, k: int, token_level: bool, max_tokens: int, vocab_size: int,
    given_ids=None,
) -> None:  # fmt: skip
    """Fill `answer`'s tokens, log-probs and top entries from the server's lists; raise
    InvalidAnswer on anything out of bounds."""
    tokens, values, tops = lists
    if not (len(tokens) == len(values) == len(tops)):
        raise InvalidAnswer("tokens, log-probs and top log-probs differ in length")
    if len(tokens) > max_tokens:
        raise InvalidAnswer(f"{len(tokens)} tokens, more than max_tokens={max_tokens}")
    counts = [len(e) for e in tops]
    if any(c > k + 1 for c in counts):
        raise InvalidAnswer(f"{max(counts)} top log-probs at a position, asked for {k}")
    answer.token_logprobs = _numbers(values, "token log-probs").tolist()
    top_values = _numbers([v for e in tops for _, v in e], "top log-probs", neg_inf_ok=True)
    if not token_level:
        answer.tokens = [str(t) for t in tokens]
        at, answer.top = 0, []
        for entries, n in zip(tops, counts):
            pairs = sorted(zip((str(t) for t, _ in entries), top_values[at : at + n].tolist()),
                           key=lambda e: -e[1])  # fmt: skip
            at += n
            if pairs and math.fsum(math.exp(v) for _, v in pairs[: k or None]) > 1 + 1e-3:
                raise InvalidAnswer("top log-probs at a position sum to more than probability 1")
            answer.top.append(pairs)
        return
    ids = _ids(tokens, vocab_size, "tokens")
    if given_ids is not None and list(given_ids) != ids.tolist():
        raise InvalidAnswer("token_ids differ from the tokens of the log-probs")
    answer.token_ids = ids.tolist()
    answer.top_ids, answer.top_logprobs = _top_k(tops, counts, top_values, k, vocab_size)


def _top_k(tops, counts, values, k: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """`[T, k]` ids and log-probs, sorted by log-prob, from k or k + 1 entries a position
    (vLLM: the sampled token first, then the top-k)."""
    T = len(tops)
    if k == 0:
        return np.zeros((T, 0), np.int64), np.zeros((T, 0), np.float64)
    if any(c < k for c in counts):
        raise InvalidAnswer(f"{min(counts)} top log-probs at a position, asked for {k}")
    ids = _ids([t for e in tops for t, _ in e], vocab_size, "top log-probs")
    starts = np.cumsum([0, *counts[:-1]])
    rows = np.repeat(np.arange(T), counts)
    cols = np.arange(len(ids)) - np.repeat(starts, counts)
    grid_v = np.full((T, k + 1), -np.inf)
    grid_i = np.full((T, k + 1), -1, dtype=np.int64)
    grid_v[rows, cols], grid_i[rows, cols] = values, ids
    order = np.argsort(-grid_v, axis=1, kind="stable")[:, :k]
    top_lps = np.take_along_axis(grid_v, order, 1)
    top_ids = np.take_along_axis(grid_i, order, 1)
    try:  # distinct ids, not all -inf, probabilities summing to at most 1
        check_topk(SERVER, "top log-probs", top_ids, top_lps, vocab_size)
    except BadAnswer as err:
        raise InvalidAnswer(err.problem) from None
    return top_ids, top_lps


def parse_answers(
    body, api: str, *, n: int, k: int, token_level: bool, max_tokens: int, vocab_size: int
) -> tuple[list[Answer], dict, list[int] | None]:
    """(answers in choice order, usage as reported, the server's prompt ids when given)."""
    if not isinstance(body, dict) or not isinstance(body.get("choices"), list):
        raise InvalidAnswer("the answer has no 'choices' list")
    choices = sorted(body["choices"], key=lambda c: c.get("index", 0) if isinstance(c, dict) else 0)
    if len(choices) != n or not all(isinstance(c, dict) for c in choices):
        raise InvalidAnswer(f"{len(choices)} choices, asked for n={n}")
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    usage = {
        key: int(usage[key])
        for key in ("prompt_tokens", "completion_tokens")
        if isinstance(usage.get(key), int) and usage[key] >= 0
    }
    prompt_ids = body.get("prompt_token_ids") or choices[0].get("prompt_token_ids")
    if prompt_ids is not None and not (
        isinstance(prompt_ids, list)
        and all(isinstance(i, int) and 0 <= i < vocab_size for i in prompt_ids)
    ):
        raise InvalidAnswer("prompt_token_ids are not token ids of the vocabulary")
    return [_answer(c, api, k, token_level, max_tokens, vocab_size) for c in choices], usage, (
        prompt_ids
    )


def _answer(choice: dict, api: str, k: int, token_level: bool, max_tokens: int, vocab: int):
    finish = choice.get("finish_reason")
    if api == "chat":
        message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
        text, refusal = message.get("content") or "", message.get("refusal")
    else:
        text, refusal = choice.get("text") or "", None
    answer = Answer(text=text if isinstance(text, str) else "", finish_reason=finish)
    if not isinstance(text, str) or len(text) > CHARS_PER_TOKEN * max_tokens:
        return _error(answer, "invalid", "the text is not a string of bounded length")
    if refusal:
        return _error(answer, "refusal", str(refusal)[:300])
    if finish in ERROR_FINISH:
        return _error(answer, ERROR_FINISH[finish], f"finish_reason={finish}")
    if finish not in ("stop", "length"):
        return _error(answer, "invalid", f"finish_reason={finish!r}")
    lists = _logprob_lists(choice, api)
    if lists is None:
        if token_level:
            return _error(answer, "no_logprobs", "the answer has no log-probs")
        return answer
    given = choice.get("token_ids")
    try:
        check_answer(
            answer, lists, k=k, token_level=token_level, max_tokens=max_tokens,
            vocab_size=vocab, given_ids=given,
        )  # fmt: skip
    except InvalidAnswer as err:
        return _error(answer, "invalid", str(err))
    return answer


def _error(answer: Answer, kind: str, message: str) -> Answer:
    answer.error, answer.message = kind, message
    answer.tokens = answer.token_ids = answer.token_logprobs = answer.top = None
    answer.top_ids = answer.top_logprobs = None
    return answer
