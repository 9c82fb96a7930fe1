"""A teacher server that misbehaves on purpose: stdlib HTTP on 127.0.0.1, one mode per fault.

It answers like `opd serve` (`/opd/v1/info`, `/opd/v1/score`) or, with `protocol="vllm"`,
like a vLLM server (`/v1/models`, `/v1/completions`, no info endpoint). Every answer starts
as the true one, computed with a real model and the server's own response builders
(`opd.teachers.server`), and `mode` then breaks it in one way (see `MODES`). `requests`
counts the scoring requests it received, so tests can see a bad answer was retried;
`bad_left` (None: every answer) is how many more scoring answers misbehave.
"""

from __future__ import annotations

import base64
import contextlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from opd.modeling.hf import tokenizer_fingerprint
from opd.teachers.server.batcher import score_sequences
from opd.teachers.server.protocol import (
    CompletionJob,
    Limits,
    ScoreWork,
    completion_chunks,
    score_response,
)

LIMITS = Limits(max_seq_len=64, max_seqs_per_request=8, max_topk=16, max_batch_tokens=512)

# mode -> what the answer gets wrong
MODES = {
    "ok": "nothing",
    "topk_all_neg_inf": "every top-k log-prob is -inf",
    "positive_logprobs": "log-probs of +5",
    "nan_logprob": "one token log-prob is NaN",
    "id_over_vocab": "a top-k id equal to the vocabulary size",
    "id_negative": "a top-k id of -1",
    "duplicate_id": "a top-k row lists one id twice",
    "short_row": "one position too few in every sequence (lengths agree with the arrays)",
    "missing_sequence": "the last sequence is not in the answer",
    "lengths_longer": "`lengths` one longer than the arrays",
    "lengths_contradict": "`lengths` sum to the arrays' size but split them wrongly",
    "huge_declared": "a Content-Length of 500 MB",
    "endless": "a body streamed as fast as possible, never ending",
    "trickle": "a byte every 0.3 s, never ending",
    "html": "an HTML page with status 200",
    "invalid_json": "JSON cut in the middle",
    "no_own_token": "vllm: a position without its own token's entry",
    "choice_missing": "vllm: one choice fewer than prompts",
}


def _b64(arr: np.ndarray, dtype: str) -> str:
    return base64.b64encode(np.ascontiguousarray(arr, dtype=dtype).tobytes()).decode()


def _unb64(text: str, dtype: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=dtype).copy()


def break_opd(body: dict, mode: str, k: int, vocab: int) -> dict:
    tok = _unb64(body["token_logprobs"], "<f4")
    ids = _unb64(body["topk_ids"], "<i4").reshape(-1, k) if k else None
    lps = _unb64(body["topk_logprobs"], "<f4").reshape(-1, k) if k else None
    lengths = list(body["lengths"])
    if mode == "topk_all_neg_inf":
        lps[:] = -np.inf
    elif mode == "positive_logprobs":
        tok[:] = 5.0
        if k:
            lps[:] = 5.0
    elif mode == "nan_logprob":
        tok[len(tok) // 2] = np.nan
    elif mode in ("id_over_vocab", "id_negative"):
        ids[len(ids) // 2, 0] = vocab if mode == "id_over_vocab" else -1
    elif mode == "duplicate_id":
        ids[0, 1] = ids[0, 0]
    elif mode == "short_row":
        keep = np.concatenate([np.arange(sum(lengths[:i]), sum(lengths[: i + 1]) - 1)
                               for i in range(len(lengths)) if lengths[i]] or [np.zeros(0, int)])
        tok = tok[keep]
        ids, lps = (ids[keep], lps[keep]) if k else (None, None)
        lengths = [max(n - 1, 0) for n in lengths]
    elif mode == "missing_sequence":
        cut = sum(lengths[:-1])
        tok, lengths = tok[:cut], lengths[:-1]
        ids, lps = (ids[:cut], lps[:cut]) if k else (None, None)
    elif mode == "lengths_longer":
        lengths[0] += 1
    elif mode == "lengths_contradict":
        lengths = lengths[::-1] if lengths[0] != lengths[-1] else [lengths[0] + 1, *lengths[1:-1], lengths[-1] - 1]
    body.update(lengths=lengths, token_logprobs=_b64(tok, "<f4"))
    if k:
        body.update(topk_ids=_b64(ids, "<i4"), topk_logprobs=_b64(lps, "<f4"))
    return body


def break_vllm(body: dict, mode: str, vocab: int) -> dict:
    choices = body["choices"]
    plp = choices[0]["prompt_logprobs"]
    last = plp[-1]
    if mode == "choice_missing":
        body["choices"] = choices[:-1]
    elif mode == "no_own_token":
        token = str(choices[0]["prompt_token_ids"][-1])
        last.pop(token)
    elif mode in ("positive_logprobs", "topk_all_neg_inf"):
        for entry in last.values():
            entry["logprob"] = 5.0 if mode == "positive_logprobs" else -9999.0
    elif mode == "id_over_vocab":
        last[str(vocab)] = {"logprob": 0.0, "rank": 1, "decoded_token": "?"}
    return body


class FakeTeacher:
    """`FakeTeacher(model, tokenizer, protocol="opd")`; `.url`, `.mode`, `.requests`, `.stop()`."""

    def __init__(self, model, tokenizer, protocol: str = "opd", mode: str = "ok"):
        self.model, self.tokenizer, self.protocol, self.mode = model, tokenizer, protocol, mode
        self.vocab = len(tokenizer)
        self.requests = 0
        self.bad_left: int | None = None
        self.decoded = tokenizer.batch_decode([[i] for i in range(self.vocab)])
        self._stop = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                if self.path == "/opd/v1/info" and fake.protocol == "opd":
                    self._json(fake.info())
                elif self.path == "/v1/models":
                    self._json({"object": "list", "data": [{"id": "fake", "object": "model"}]})
                else:
                    self._json({"error": {"message": "not found"}}, 404)

            def do_POST(self):
                raw = self.rfile.read(int(self.headers["content-length"]))
                fake.requests += 1
                fake.answer(self, json.loads(raw))

            def _json(self, body, status=200):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def info(self) -> dict:
        return {
            "object": "opd.info",
            "model": "fake",
            "vocab_size": self.vocab,
            "tokenizer_fingerprint": tokenizer_fingerprint(self.tokenizer),
            "limits": LIMITS.as_dict(),
        }

    def true_answer(self, request: dict) -> dict:
        if "sequences" in request:
            seqs, starts, k = request["sequences"], request["start"], request["topk"]
            work = ScoreWork(seqs, starts, k, False)
            results = score_sequences(self.model, self.vocab, seqs, starts, k, False, 4096, "cpu")
            return score_response("fake", work, results)
        seqs, k = request["prompt"], request["prompt_logprobs"]
        work = ScoreWork(seqs, [1] * len(seqs), k, True)
        results = score_sequences(self.model, self.vocab, seqs, work.starts, k, True, 4096, "cpu")
        job = CompletionJob(work, True, True, True, "fake")
        parts = completion_chunks("fake", job, results, self.decoded, self.tokenizer)
        return json.loads(b"".join(parts))

    def answer(self, handler, request: dict) -> None:
        mode, w = self.mode, handler.wfile
        if self.bad_left is not None:
            mode = mode if self.bad_left > 0 else "ok"
            self.bad_left -= 1
        if mode == "html":
            page = b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"
            return self._send(handler, page, "text/html")
        body = self.true_answer(request)
        if mode in ("ok", "huge_declared", "endless", "trickle", "invalid_json"):
            pass
        elif "sequences" in request:
            body = break_opd(body, mode, request["topk"], self.vocab)
        else:
            body = break_vllm(body, mode, self.vocab)
        data = json.dumps(body).encode()
        if mode == "invalid_json":
            return self._send(handler, data[: len(data) // 2])
        if mode == "huge_declared":
            return self._send(handler, data, length=500_000_000)
        if mode in ("endless", "trickle"):
            handler.send_response(200)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Connection", "close")
            handler.end_headers()
            block = b" " * (1 << 16) if mode == "endless" else b" "
            try:
                w.write(data[:-1])
                while not self._stop.is_set():
                    w.write(block)
                    w.flush()
                    if mode == "trickle":
                        time.sleep(0.3)
            except OSError:  # the client hung up: what a bounded client does
                pass
            handler.close_connection = True
            return None
        return self._send(handler, data)

    @staticmethod
    def _send(handler, data: bytes, content_type="application/json", length=None) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(length if length is not None else len(data)))
        handler.end_headers()
        with contextlib.suppress(OSError):  # a client that hung up
            handler.wfile.write(data)
        if length is not None:
            handler.close_connection = True

    def stop(self) -> None:
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()
