"""Wire formats of the teacher server: request parsing with limits, and response bodies.

Two endpoints score token sequences (see `opd.teachers.server` for the server, `opd.teachers.remote`
for the client):

* `POST /v1/completions`, the subset of vLLM's OpenAI-compatible API that prompt scoring
  uses, so one client works against `opd serve` and a real vLLM server. Request fields:
  `prompt` (a list of token ids, or a list of such lists), `max_tokens` (must be 0: this
  server never generates; vLLM accepts 0 only together with `echo: true`), `echo`,
  `prompt_logprobs` (k >= 0; -1, the whole vocabulary, is refused), `model` (optional; must
  name the served model), `return_token_ids`; `n` must be 1, `stream` false, `logprobs`
  null; sampling fields (`temperature`, `top_p`, ...) are accepted and ignored, as prompt
  log-probs are raw in vLLM too. Response: `{id, object: "text_completion", created,
  model, choices: [{index, text, logprobs: null, finish_reason: "length", stop_reason:
  null, prompt_logprobs, prompt_token_ids?}], usage: {prompt_tokens, completion_tokens: 0,
  total_tokens}}` where `prompt_logprobs` is vLLM's: `null` for the first position, then
  per position a dict `{"<token id>": {"logprob", "rank", "decoded_token"}}` holding the
  actual token first (its rank counted as vLLM does: the number of tokens with log-prob >=
  its own) then the top k with ranks 1..k, so k or k+1 entries; -inf is written as -9999.0
  as vLLM does; `prompt_token_ids` and `token_ids: []` appear with `return_token_ids`.
  `GET /v1/models` lists the one served model. A real vLLM server refuses k above its
  `--max-logprobs` (default 20), and normalizes over its LM head's rows where opd uses the
  tokenizer's (`opd.modeling.hf.shared_vocab_size`); they differ only for padded heads.
* `POST /opd/v1/score`, our compact form: `{"sequences": [[ids]], "start": [s_i],
  "topk": k}` scores positions `s_i .. len_i-1` of each sequence (default `s_i` = 1) and
  answers `{"object": "opd.score", "model", "topk", "lengths": [n_i], "token_logprobs",
  "topk_ids", "topk_logprobs"}` with the three arrays base64 of little-endian float32 /
  int32 / float32, flat over all scored positions (`[N]`, `[N*k]`, `[N*k]`). No float ever
  goes through decimal text, and positions before `s_i` (the prompt) are never computed.

Errors are `{"error": {"message", "type", "param", "code"}}` as vLLM writes them.
"""

from __future__ import annotations

import base64
import functools
import json
import time
import uuid
from dataclasses import asdict, dataclass

import numpy as np

VLLM_LOGPROB_FLOOR = -9999.0  # vLLM's stand-in for -inf in JSON


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; each violation is a 4xx naming the limit."""

    max_seq_len: int = 4096  # tokens per sequence
    max_seqs_per_request: int = 256
    max_topk: int = 64
    max_batch_tokens: int = 16384  # padded tokens per forward (server side)
    body_timeout_s: float = 30.0  # seconds to receive a request body
    # scored positions x (k + 1) per request: bounds the response (a /v1/completions entry
    # is ~70 bytes of JSON, a /opd/v1/score one 8 bytes before base64)
    max_logprobs_per_request: int = 1 << 19

    def __post_init__(self):
        for key in ("max_seq_len", "max_seqs_per_request", "max_batch_tokens"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} must be >= 1")
        one_sequence = self.max_seq_len * (self.max_topk + 1)
        if self.max_logprobs_per_request < one_sequence:
            raise ValueError(
                f"max_logprobs_per_request={self.max_logprobs_per_request} must be >= "
                f"max_seq_len x (max_topk + 1) = {one_sequence} (one sequence must fit in one "
                "request)"
            )
        if self.max_topk < 0:
            raise ValueError(f"max_topk={self.max_topk} must be >= 0")
        if self.body_timeout_s <= 0:
            raise ValueError(f"body_timeout_s={self.body_timeout_s} must be > 0")
        if self.max_batch_tokens < self.max_seq_len:
            raise ValueError(
                f"max_batch_tokens={self.max_batch_tokens} must be >= max_seq_len="
                f"{self.max_seq_len} (one sequence must fit in one forward)"
            )

    @property
    def max_body_bytes(self) -> int:
        # A token id is at most 7 digits plus a separator in JSON; leave room for the rest.
        return self.max_seqs_per_request * (self.max_seq_len * 8 + 64) + 65536

    def as_dict(self) -> dict:
        return {**asdict(self), "max_body_bytes": self.max_body_bytes}


class RequestError(Exception):
    """A request the server refuses: HTTP status, message, and the offending field."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> dict:
        kind = {
            400: "BadRequestError",
            401: "AuthenticationError",
            404: "NotFoundError",
            408: "RequestTimeoutError",
            413: "RequestTooLargeError",
            503: "ServiceUnavailableError",
        }.get(self.status, "Error")
        return {
            "error": {
                "message": self.message,
                "type": kind,
                "param": self.param,
                "code": self.status,
            }
        }


@dataclass
class ScoreWork:
    """What the batcher computes: log-probs of `seqs[i][starts[i]:]`, plus top-k/ranks."""

    seqs: list[list[int]]
    starts: list[int]
    topk: int
    ranks: bool = False

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.seqs)


def _int_field(data: dict, key: str, default, lo: int | None = None, hi: int | None = None):
    value = data.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(400, f"`{key}` must be an integer, got {value!r}", key)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise RequestError(400, f"`{key}`={value} must be in [{lo}, {hi}]", key)
    return value


def check_sequences(seqs, limits: Limits, vocab_size: int, param: str) -> list[list[int]]:
    """Lists of in-vocabulary token ids within the size limits (413 when too big)."""
    if not isinstance(seqs, list) or not seqs:
        raise RequestError(400, f"`{param}` must be a non-empty list of token-id lists", param)
    if len(seqs) > limits.max_seqs_per_request:
        raise RequestError(
            413,
            f"{len(seqs)} sequences in one request; this server's limit is "
            f"{limits.max_seqs_per_request} (--max-seqs-per-request)",
            param,
        )
    for i, seq in enumerate(seqs):
        if not isinstance(seq, list) or not seq:
            raise RequestError(400, f"`{param}[{i}]` must be a non-empty list of token ids", param)
        if len(seq) > limits.max_seq_len:
            raise RequestError(
                413,
                f"`{param}[{i}]` has {len(seq)} tokens; this server's limit is "
                f"{limits.max_seq_len} (--max-seq-len)",
                param,
            )
        try:
            arr = np.asarray(seq)
        except (ValueError, OverflowError):
            arr = None
        if arr is None or arr.dtype.kind not in "iu" or arr.ndim != 1:
            raise RequestError(400, f"`{param}[{i}]` must hold only integer token ids", param)
        if arr.min() < 0 or arr.max() >= vocab_size:
            bad = int(arr.max() if arr.max() >= vocab_size else arr.min())
            raise RequestError(
                400, f"`{param}[{i}]` holds token id {bad}, outside [0, {vocab_size})", param
            )
    return seqs


def _check_topk(k: int, limits: Limits, key: str) -> int:
    if k > limits.max_topk:
        raise RequestError(
            400, f"`{key}`={k} exceeds this server's limit of {limits.max_topk} (--max-topk)", key
        )
    return k


def _check_response_size(work: ScoreWork, limits: Limits, key: str) -> ScoreWork:
    """Refuse (413) a request whose answer would hold more than the limit's log-probs."""
    positions = sum(len(s) - st for s, st in zip(work.seqs, work.starts))
    values = positions * (work.topk + 1)
    if values > limits.max_logprobs_per_request:
        raise RequestError(
            413,
            f"{positions} scored positions x (k={work.topk} + 1) = {values} log-probs in one "
            f"request; this server's limit is {limits.max_logprobs_per_request} "
            "(--max-logprobs-per-request): send fewer sequences per request",
            key,
        )
    return work


@dataclass
class CompletionJob:
    work: ScoreWork
    want_logprobs: bool  # prompt_logprobs was given
    echo: bool
    return_token_ids: bool
    model: str | None


def parse_completion(data, limits: Limits, vocab_size: int) -> CompletionJob:
    """The vLLM `/v1/completions` subset used for prompt scoring (see the module doc)."""
    if not isinstance(data, dict):
        raise RequestError(400, "the request body must be a JSON object")
    prompt = data.get("prompt")
    if isinstance(prompt, str) or (
        isinstance(prompt, list) and prompt and isinstance(prompt[0], str)
    ):
        raise RequestError(
            400, "this server scores token ids: send `prompt` as a list of token ids", "prompt"
        )
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], list):
        prompt = [prompt]
    seqs = check_sequences(prompt, limits, vocab_size, "prompt")
    max_tokens = _int_field(data, "max_tokens", 16)
    if max_tokens != 0:
        raise RequestError(
            400,
            f"`max_tokens`={max_tokens}: this teacher server only scores prompts; send "
            "max_tokens=0 with echo=true (vLLM's prompt-scoring form)",
            "max_tokens",
        )
    if _int_field(data, "n", 1) != 1:
        raise RequestError(400, "`n` must be 1", "n")
    for key in ("stream", "use_beam_search"):
        if data.get(key):
            raise RequestError(400, f"`{key}` is not supported by this server", key)
    if data.get("logprobs") is not None:
        raise RequestError(
            400, "`logprobs` is not supported; ask for `prompt_logprobs` instead", "logprobs"
        )
    raw_k = data.get("prompt_logprobs")
    if raw_k == -1:
        raise RequestError(
            400,
            f"`prompt_logprobs`=-1 (the whole vocabulary) exceeds this server's limit of "
            f"{limits.max_topk} (--max-topk)",
            "prompt_logprobs",
        )
    k = _int_field(data, "prompt_logprobs", None, 0)
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError(400, "`model` must be a string", "model")
    work = ScoreWork(seqs, [1] * len(seqs), _check_topk(k or 0, limits, "prompt_logprobs"), True)
    if k is not None:
        _check_response_size(work, limits, "prompt_logprobs")
    return CompletionJob(
        work, k is not None, bool(data.get("echo")), bool(data.get("return_token_ids")), model
    )


def parse_score(data, limits: Limits, vocab_size: int) -> ScoreWork:
    """The compact `/opd/v1/score` request."""
    if not isinstance(data, dict):
        raise RequestError(400, "the request body must be a JSON object")
    seqs = check_sequences(data.get("sequences"), limits, vocab_size, "sequences")
    starts = data.get("start")
    if starts is None:
        starts = [1] * len(seqs)
    if not isinstance(starts, list) or len(starts) != len(seqs):
        raise RequestError(400, "`start` must be a list with one index per sequence", "start")
    for i, (s, seq) in enumerate(zip(starts, seqs)):
        if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= len(seq):
            raise RequestError(
                400, f"`start[{i}]`={s!r} must be an integer in [1, {len(seq)}]", "start"
            )
    k = _check_topk(_int_field(data, "topk", 0, 0), limits, "topk")
    return _check_response_size(ScoreWork(seqs, starts, k, False), limits, "sequences")


def b64_array(values: np.ndarray, dtype: str) -> str:
    return base64.b64encode(np.ascontiguousarray(values, dtype=dtype).tobytes()).decode("ascii")


def array_b64(text: str, dtype: str) -> np.ndarray:
    return np.frombuffer(bytearray(base64.b64decode(text)), dtype=dtype)


def score_response(model: str, work: ScoreWork, results: list[dict]) -> dict:
    """`/opd/v1/score` body from the batcher's per-sequence results."""
    k = work.topk
    lengths = [len(r["token_logprobs"]) for r in results]
    empty_f, empty_i = np.zeros(0, np.float32), np.zeros((0, k), np.int32)
    cat = np.concatenate
    return {
        "object": "opd.score",
        "model": model,
        "topk": k,
        "lengths": lengths,
        "token_logprobs": b64_array(cat([empty_f, *(r["token_logprobs"] for r in results)]), "<f4"),
        "topk_ids": b64_array(cat([empty_i, *(r["topk_ids"] for r in results)]), "<i4"),
        "topk_logprobs": b64_array(
            cat([empty_i.astype(np.float32), *(r["topk_logprobs"] for r in results)]), "<f4"
        ),
    }


def _position_dict(tok: int, lp: float, rank: int, ids, lps, decoded) -> dict:
    out = {
        str(tok): {
            "logprob": max(lp, VLLM_LOGPROB_FLOOR),
            "rank": rank,
            "decoded_token": decoded[tok],
        }
    }
    for r, (i, v) in enumerate(zip(ids, lps), 1):
        out.setdefault(
            str(i), {"logprob": max(v, VLLM_LOGPROB_FLOOR), "rank": r, "decoded_token": decoded[i]}
        )
    return out


def completion_chunks(
    model: str,
    job: CompletionJob,
    results: list[dict] | None,
    decoded: list[str],
    tokenizer,
    positions_per_chunk: int = 64,
):
    """`/v1/completions` body in vLLM's layout (see the module doc), as UTF-8 pieces.

    A body can reach tens of MB (k + 1 entries per position); built in pieces, each small
    enough that the server can hand them out one at a time from a worker thread and keep
    answering other requests in between (one `json.dumps` of it all would hold the GIL).
    """
    dumps = functools.partial(json.dumps, separators=(",", ":"))
    head = {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
    }
    yield (dumps(head)[:-1] + ',"choices":[').encode()
    total = 0
    for i, seq in enumerate(job.work.seqs):
        total += len(seq)
        choice = {
            "index": i,
            "text": tokenizer.decode(seq) if job.echo else "",
            "logprobs": None,
            "finish_reason": "length",
            "stop_reason": None,
        }
        if job.return_token_ids:
            choice.update(prompt_token_ids=list(seq), token_ids=[])
        yield (("," if i else "") + dumps(choice)[:-1] + ',"prompt_logprobs":').encode()
        if not job.want_logprobs:
            yield b"null}"
            continue
        r, k = results[i], job.work.topk
        yield b"[null"
        for lo in range(0, len(seq) - 1, positions_per_chunk):
            hi = min(lo + positions_per_chunk, len(seq) - 1)
            tok_lp, ranks = r["token_logprobs"][lo:hi].tolist(), r["ranks"][lo:hi].tolist()
            ids = r["topk_ids"][lo:hi].tolist() if k else [[]] * (hi - lo)
            lps = r["topk_logprobs"][lo:hi].tolist() if k else [[]] * (hi - lo)
            part = [
                _position_dict(seq[p + 1], tok_lp[j], ranks[j], ids[j], lps[j], decoded)
                for j, p in enumerate(range(lo, hi))
            ]
            yield ("," + dumps(part)[1:-1]).encode()
        yield b"]}"
    usage = {"prompt_tokens": total, "completion_tokens": 0, "total_tokens": total}
    yield ('],"usage":' + dumps(usage) + "}").encode()
