"""Is a teacher server's answer usable? Checked against the request before any value is used.

A teacher server (`opd serve`, a vLLM server, one replica of several, an API) is another
program: what it answers is checked here before it reaches a loss or a cache. Each check
raises `BadAnswer(server, problem)`, a retryable error (another attempt or another replica
may answer well) whose message names the server and what was wrong. Nothing here does I/O;
`opd.teachers.bounded_http` reads the bytes (size bound, deadline, JSON with a snippet).

The rules, for every answer:

* shapes: exactly the positions the request asked for, per sequence and in total; every
  sequence answered once;
* ids: integers in `[0, vocab_size)`;
* log-probs: never NaN or +inf, at most `LOGPROB_TOLERANCE` above 0 (float rounding of a
  near-certain token); -inf only where `neg_inf_ok` (top-k entries past the tokens that
  have any probability), never for the log-prob of a given token;
* top-k rows: not all -inf, no id twice, probabilities summing to at most 1 (within the
  tolerance), so the tail mass `1 - sum` the sparse loss uses is never negative.

API (numpy arrays in, checked arrays out; `server` is the URL named in messages):

    check_logprobs(server, what, values, neg_inf_ok=False) -> float32 array
    check_ids(server, what, ids, vocab_size)                -> int64 array
    check_topk(server, what, ids [n, k], logprobs [n, k], vocab_size) -> (ids, logprobs)
    check_lengths(server, got, want)                        # per-sequence positions
    unpack_opd_score(server, body, want_lengths, k, vocab_size)          # /opd/v1/score
    unpack_completions(server, body, seqs, starts, k, vocab_size)        # /v1/completions
    answer_bytes_bound(positions, sequences, k, protocol)   # the byte bound of one answer
    check_info(server, info) -> info; check_models(server, body) -> model id   # at connect

Both unpackers return one `(token_logprobs [n], topk_ids [n, k] | None, topk_logprobs
[n, k] | None)` per requested sequence, in request order.
"""

from __future__ import annotations

import base64
import binascii
import math

import numpy as np

from opd.teachers.errors import BadAnswer
from opd.teachers.server.protocol import VLLM_LOGPROB_FLOOR

__all__ = [
    "LOGPROB_TOLERANCE",
    "BadAnswer",
    "answer_bytes_bound",
    "check_ids",
    "check_info",
    "check_lengths",
    "check_logprobs",
    "check_models",
    "check_topk",
    "unpack_completions",
    "unpack_opd_score",
]

# A log-prob up to this far above 0 is float rounding (log_softmax of a near-certain token
# in float32 / bfloat16); anything larger is no log-prob.
LOGPROB_TOLERANCE = 1e-3

# Bytes one answer may take, per value it carries (see `answer_bytes_bound`).
_OPD_VALUE_BYTES = 4 * 4 / 3  # float32 / int32, base64
_VLLM_ENTRY_BYTES = 192  # {"<id>":{"logprob":..,"rank":..,"decoded_token":".."}}, generous
_VLLM_POSITION_BYTES = 96  # the echoed text and prompt_token_ids, per position
_SLACK_BYTES = 1 << 16  # ids, model name, usage, whitespace


def answer_bytes_bound(positions: int, sequences: int, k: int, protocol: str) -> int:
    """Most bytes a well-formed answer to one request may take: twice its layout's size
    plus 64 KiB. `positions`: scored positions the answer carries (vLLM's prompt scoring
    returns every position after the first, /opd/v1/score only those asked for)."""
    if protocol == "opd":
        per_position = (1 + 2 * k) * _OPD_VALUE_BYTES
    else:
        per_position = (k + 1) * _VLLM_ENTRY_BYTES + _VLLM_POSITION_BYTES
    return int(2 * (positions * per_position + 16 * sequences)) + _SLACK_BYTES


def _where(what: str, flat_index: int, row_width: int | None, rows=None) -> str:
    """`what` at a flat index, as (sequence, position) when `rows` (lengths) are known."""
    pos = flat_index // row_width if row_width else flat_index
    if rows is not None:
        for seq, n in enumerate(rows):
            if pos < n:
                return f"{what} of sequence {seq} at position {pos}"
            pos -= n
    return f"{what} at position {pos}"


def check_logprobs(
    server: str, what: str, values, neg_inf_ok: bool = False, *, rows=None, width=None
) -> np.ndarray:
    """Float32 log-probs, each finite and <= LOGPROB_TOLERANCE (or -inf if `neg_inf_ok`).
    `rows` (positions per sequence) and `width` (values per position) only locate the first
    bad value in the message."""
    arr = np.asarray(values)
    if arr.dtype.kind not in "fiu":
        raise BadAnswer(server, f"{what} are not numbers (dtype {arr.dtype})")
    arr = arr.astype(np.float32, copy=False)
    bad = np.isnan(arr) | (arr > LOGPROB_TOLERANCE)
    if not neg_inf_ok:
        bad |= np.isneginf(arr)
    if bad.any():
        i = int(np.flatnonzero(bad.reshape(-1))[0])
        value = float(arr.reshape(-1)[i])
        rule = "finite" if not neg_inf_ok else "finite or -inf"
        raise BadAnswer(
            server,
            f"{_where(what, i, width, rows)} is {value!r}; a log-prob must be {rule} and <= 0 "
            f"(tolerance {LOGPROB_TOLERANCE})",
        )
    return arr


def check_ids(server: str, what: str, ids, vocab_size: int | None, *, rows=None, width=None):
    """Int64 token ids inside `[0, vocab_size)` (`vocab_size` None: only >= 0)."""
    arr = np.asarray(ids)
    if arr.dtype.kind not in "iu":
        raise BadAnswer(server, f"{what} are not integers (dtype {arr.dtype})")
    arr = arr.astype(np.int64, copy=False)
    bad = arr < 0
    if vocab_size is not None:
        bad |= arr >= vocab_size
    if bad.any():
        i = int(np.flatnonzero(bad.reshape(-1))[0])
        limit = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
        raise BadAnswer(
            server,
            f"{_where(what, i, width, rows)} is token id {int(arr.reshape(-1)[i])}, outside "
            f"the vocabulary {limit}",
        )
    return arr


def check_topk(server: str, what: str, ids, logprobs, vocab_size: int | None, *, rows=None):
    """Top-k rows `[n, k]`: ids in the vocabulary and distinct, log-probs finite or -inf
    and <= 0, not all -inf, their probabilities summing to at most 1 + tolerance."""
    ids, lps = np.asarray(ids), np.asarray(logprobs)
    if ids.ndim != 2 or ids.shape != lps.shape:
        raise BadAnswer(
            server, f"{what}: ids {ids.shape} and log-probs {lps.shape} are not [positions, k]"
        )
    n, k = ids.shape
    ids = check_ids(server, f"{what} ids", ids, vocab_size, rows=rows, width=k)
    lps = check_logprobs(server, f"{what} log-probs", lps, True, rows=rows, width=k)
    if not n or not k:
        return ids, lps
    empty = (lps <= VLLM_LOGPROB_FLOOR).all(axis=1)  # vLLM writes -inf as -9999
    if empty.any():
        pos = int(np.flatnonzero(empty)[0])
        raise BadAnswer(
            server,
            f"{_where(what, pos, None, rows)}: all {k} log-probs are -inf (no token has any "
            "probability)",
        )
    ordered = np.sort(ids, axis=1)
    twice = (ordered[:, 1:] == ordered[:, :-1]).any(axis=1)
    if twice.any():
        pos = int(np.flatnonzero(twice)[0])
        raise BadAnswer(server, f"{_where(what, pos, None, rows)} lists a token id twice")
    top = lps.max(axis=1, keepdims=True)
    mass = np.log(np.exp((lps - top).astype(np.float64)).sum(axis=1)) + top[:, 0]
    over = mass > LOGPROB_TOLERANCE
    if over.any():
        pos = int(np.flatnonzero(over)[0])
        raise BadAnswer(
            server,
            f"{_where(what, pos, None, rows)}: the top-{k} probabilities sum to "
            f"{math.exp(float(mass[pos])):.4g} > 1",
        )
    return ids, lps


def check_lengths(server: str, got, want: list[int]) -> list[int]:
    """The positions per sequence an answer holds equal what the request asked for."""
    if not isinstance(got, list) or any(isinstance(n, bool) or not isinstance(n, int) for n in got):
        raise BadAnswer(server, f"`lengths` must be a list of integers, got {_snip(got)}")
    if len(got) != len(want):
        raise BadAnswer(
            server, f"the answer holds {len(got)} sequence(s), the request sent {len(want)}"
        )
    for i, (g, w) in enumerate(zip(got, want)):
        if g != w:
            raise BadAnswer(
                server, f"sequence {i}: the answer scores {g} position(s), the request asked {w}"
            )
    return got


def _snip(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _field(server: str, body, key: str, kind):
    if not isinstance(body, dict):
        raise BadAnswer(server, f"the answer is a JSON {type(body).__name__}, not an object")
    if key not in body:
        raise BadAnswer(server, f"the answer has no `{key}` (keys: {sorted(body)[:12]})")
    value = body[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise BadAnswer(server, f"`{key}` is {_snip(value)}, not a {kind.__name__}")
    return value


def _b64(server: str, body: dict, key: str, dtype: str, count: int) -> np.ndarray:
    text = _field(server, body, key, str)
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadAnswer(server, f"`{key}` is not base64") from None
    if len(raw) != 4 * count:
        raise BadAnswer(
            server, f"`{key}` holds {len(raw)} bytes; the request's positions need {4 * count}"
        )
    return np.frombuffer(bytearray(raw), dtype=dtype)


def unpack_opd_score(server: str, body, want_lengths: list[int], k: int, vocab_size: int | None):
    """A `/opd/v1/score` answer (see `opd.teachers.server.protocol`), checked."""
    lengths = check_lengths(server, _field(server, body, "lengths", list), want_lengths)
    if body.get("topk", k) != k:
        raise BadAnswer(server, f"the answer is top-{body.get('topk')!r}, the request top-{k}")
    n = sum(lengths)
    tok = check_logprobs(
        server, "token log-prob", _b64(server, body, "token_logprobs", "<f4", n), rows=lengths
    )
    top_ids = top_lps = None
    if k:
        top_ids = _b64(server, body, "topk_ids", "<i4", n * k).reshape(n, k)
        top_lps = _b64(server, body, "topk_logprobs", "<f4", n * k).reshape(n, k)
        top_ids, top_lps = check_topk(server, "top-k", top_ids, top_lps, vocab_size, rows=lengths)
    out, at = [], 0
    for m in lengths:
        sl = slice(at, at + m)
        out.append((tok[sl], top_ids[sl] if k else None, top_lps[sl] if k else None))
        at += m
    return out


def _entry_logprob(server: str, where: str, entry) -> float:
    value = entry.get("logprob") if isinstance(entry, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadAnswer(server, f"{where}: the entry {_snip(entry)} has no numeric `logprob`")
    return float(value)


def _position(server: str, where: str, entries, token: int, k: int, vocab_size):
    """One `prompt_logprobs` position: the given token's log-prob and the best k entries."""
    if not isinstance(entries, dict):
        raise BadAnswer(server, f"{where} is {_snip(entries)}, not an object of entries")
    if str(token) not in entries:
        raise BadAnswer(server, f"{where} has no entry for its own token {token}")
    tok = _entry_logprob(server, where, entries[str(token)])
    if not k:
        return tok, None, None
    scored = []
    for key, entry in entries.items():
        lp = _entry_logprob(server, where, entry)
        rank = entry.get("rank", 0)
        if not key.isdigit() or isinstance(rank, bool) or not isinstance(rank, int):
            raise BadAnswer(server, f"{where}: entry {_snip(key)} is not a token id with a rank")
        scored.append((-lp, rank, int(key)))
    if len(scored) < k:
        raise BadAnswer(server, f"{where} has {len(scored)} entries; the request asked top-{k}")
    best = sorted(scored)[:k]
    return tok, [t for _, _, t in best], [-m for m, _, _ in best]


def unpack_completions(
    server: str, body, seqs: list[list[int]], starts: list[int], k: int, vocab_size: int | None
):
    """A vLLM `/v1/completions` prompt-scoring answer (`prompt_logprobs`), checked, for
    positions `starts[i]..` of each sequence."""
    choices = _field(server, body, "choices", list)
    if len(choices) != len(seqs):
        raise BadAnswer(
            server, f"the answer holds {len(choices)} choice(s), the request sent {len(seqs)}"
        )
    by_index: dict[int, dict] = {}
    for c in choices:
        i = c.get("index") if isinstance(c, dict) else None
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(seqs) or i in by_index:
            raise BadAnswer(server, f"choice {_snip(c, 60)} has a missing, repeated or bad `index`")
        by_index[i] = c
    want = [len(s) - st for s, st in zip(seqs, starts)]
    out = []
    for i, (seq, start) in enumerate(zip(seqs, starts)):
        plp = by_index[i].get("prompt_logprobs")
        if not isinstance(plp, list) or len(plp) != len(seq):
            got = len(plp) if isinstance(plp, list) else _snip(plp, 40)
            raise BadAnswer(
                server,
                f"choice {i}: `prompt_logprobs` has {got} position(s), its prompt {len(seq)}",
            )
        tok, ids, lps = [], [], []
        for j in range(start, len(seq)):
            t, top_i, top_l = _position(
                server, f"choice {i} position {j}", plp[j], seq[j], k, vocab_size
            )
            tok.append(t)
            if k:
                ids.append(top_i)
                lps.append(top_l)
        tok = check_logprobs(server, f"choice {i} token log-prob", np.asarray(tok, np.float64))
        if k:
            ids, lps = check_topk(
                server,
                f"choice {i} top-k",
                np.asarray(ids, np.int64).reshape(-1, k),
                np.asarray(lps, np.float64).reshape(-1, k),
                vocab_size,
            )
        out.append((tok, ids if k else None, lps if k else None))
    check_lengths(server, [len(t) for t, _, _ in out], want)
    return out


def _count(server: str, body: dict, key: str, lo: int, optional: bool = False) -> int | None:
    if optional and body.get(key) is None:
        return None
    value = _field(server, body, key, int)
    if value < lo:
        raise BadAnswer(server, f"`{key}`={value} must be >= {lo}")
    return value


def check_info(server: str, info) -> dict:
    """`/opd/v1/info`: the fields a client reads, typed and in range."""
    _field(server, info, "model", str)
    _field(server, info, "tokenizer_fingerprint", str)
    _count(server, info, "vocab_size", 1)
    limits = _field(server, info, "limits", dict)
    for key, lo in (("max_seqs_per_request", 1), ("max_topk", 0), ("max_seq_len", 1)):
        _count(server, limits, key, lo)
    _count(server, limits, "max_logprobs_per_request", 1, optional=True)
    return info


def check_models(server: str, body) -> str:
    """`/v1/models`: the id of the first served model."""
    data = _field(server, body, "data", list)
    if not data or not isinstance(data[0], dict) or not isinstance(data[0].get("id"), str):
        raise BadAnswer(server, f"/v1/models lists no model id: {_snip(data)}")
    return data[0]["id"]
