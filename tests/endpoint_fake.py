"""A small stdlib fake of a hosted OpenAI-compatible API, on 127.0.0.1, with scripted faults.

Markers in a prompt's text choose its behaviour: RATE (first attempt 429 with
`Retry-After: 1`), BUSY (two 500s), SLOW (first attempt outlives the client's timeout),
TRUNC (finish_reason=length), FILTER (finish_reason=content_filter), NOLP (no logprobs
field), REFUSE (chat: a refusal message), BAD (400), DOWN (503 with `Retry-After: 10`),
TRICKLE (first attempt: a body that trickles in and never ends), HUGE (a 3 MB answer),
HTML (a 200 whose body is a proxy's HTML page).
Answers are deterministic in (prompt, seed, choice), so a resumed cache can be compared
with an unkilled one. Like a hosted API, it has no /tokenize: caches from it hold text.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

KEY = "sk-opd-test-9f8e7d6c5b4a"
SLOW_S = 3.0  # the tests' client timeout (1 s) plus backoff is well below this


def answer_text(prompt: str, seed, choice: int) -> str:
    return f"{prompt.strip()} is {len(prompt) + choice} seed {seed}"


class FakeAPI:
    def __init__(self, key: str | None = KEY, delay_s: float = 0.0, model_id: str = "fake-model"):
        """`key=None`: no key is checked; `model_id`: what /v1/models lists."""
        self.key, self.delay_s = key, delay_s
        self.attempts: Counter = Counter()  # prompt text -> attempts seen
        self.log: list[dict] = []  # every request: time, path, prompt, auth, status
        self.served: Counter = Counter()  # usage of the answers that were served (200)
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                if self.path == "/v1/models":
                    return self._send(200, {"data": [{"id": model_id}]})
                self._send(404, {"error": {"message": "not found"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, payload, headers = fake.handle(self.path, body, self.headers)
                if status == "trickle":
                    return self._trickle()
                if status == "html":
                    return self._html()
                self._send(status, payload, headers)

            def _html(self):
                data = b"<html><body>502 Bad Gateway (proxy)</body></html>"
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _trickle(self):
                """A 200 whose body never completes: a byte every 0.2 s for 10 s."""
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", "100000")
                    self.end_headers()
                    for _ in range(50):
                        self.wfile.write(b" ")
                        self.wfile.flush()
                        time.sleep(0.2)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _send(self, status, payload, headers=None):
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False  # a slow answer nobody waits for is dropped
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def handle(self, path: str, body: dict, headers) -> tuple[int, dict, dict]:
        chat = path == "/v1/chat/completions"
        if path not in ("/v1/completions", "/v1/chat/completions"):
            return 404, {"error": {"message": f"no route {path}"}}, {}
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        with self.lock:
            self.attempts[prompt] += 1
            attempt = self.attempts[prompt]
            entry = {"t": time.monotonic(), "path": path, "prompt": prompt, "body": body}
            entry["auth"] = headers.get("Authorization")
            self.log.append(entry)
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.key is not None and headers.get("Authorization") != f"Bearer {self.key}":
            entry["status"] = 401
            return 401, {"error": {"message": "invalid api key"}}, {}
        if "RATE" in prompt and attempt == 1:
            entry["status"] = 429
            return 429, {"error": {"message": "rate limited"}}, {"Retry-After": "1"}
        if "DOWN" in prompt:
            entry["status"] = 503
            return 503, {"error": {"message": "maintenance"}}, {"Retry-After": "10"}
        if "BUSY" in prompt and attempt <= 2:
            entry["status"] = 500
            return 500, {"error": {"message": "overloaded"}}, {}
        late = "SLOW" in prompt and attempt == 1
        if late:  # the client has given up by the time this answer is sent
            time.sleep(SLOW_S)
        if "TRICKLE" in prompt and attempt == 1:
            return "trickle", {}, {}
        if "HTML" in prompt:
            return "html", {}, {}
        if "HUGE" in prompt:
            entry["status"] = 200
            return 200, {"choices": [{"index": 0, "text": "x" * (3 << 20)}]}, {}
        if "BAD" in prompt:
            entry["status"] = 400
            return 400, {"error": {"message": "this prompt is refused"}}, {}
        entry["status"] = 200
        return 200, self.answer(prompt, body, chat, count=not late), {}

    def answer(self, prompt: str, body: dict, chat: bool, count: bool = True) -> dict:
        choices, completion_tokens = [], 0
        k = body.get("top_logprobs", 0) if chat else body.get("logprobs") or 0
        for i in range(body.get("n", 1)):
            text = answer_text(prompt, body.get("seed"), i)
            words = text.split(" ")
            tokens = [w if j == 0 else " " + w for j, w in enumerate(words)]
            completion_tokens += len(tokens)
            finish = "length" if "TRUNC" in prompt else "stop"
            if "FILTER" in prompt:
                finish = "content_filter"
            lps = [-0.25 - 0.01 * j for j in range(len(tokens))]
            top = [[(f"alt{a}", lp - 3.0 - a) for a in range(max(k - 1, 0))] for lp in lps]
            top = [[(t, lp), *alts] for t, lp, alts in zip(tokens, lps, top)]
            choice = {"index": i, "finish_reason": finish}
            want = (body.get("logprobs") if chat else body.get("logprobs") is not None) and (
                "NOLP" not in prompt
            )
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
                if "REFUSE" in prompt:
                    choice["message"] = {"role": "assistant", "content": None,
                                         "refusal": "I can't help with that."}  # fmt: skip
                if want:
                    choice["logprobs"] = {"content": [
                        {"token": t, "logprob": lp,
                         "top_logprobs": [{"token": a, "logprob": v} for a, v in alts]}
                        for t, lp, alts in zip(tokens, lps, top)
                    ]}  # fmt: skip
            else:
                choice["text"] = text
                if want:
                    choice["logprobs"] = {
                        "tokens": tokens,
                        "token_logprobs": lps,
                        "top_logprobs": [dict(alts) for alts in top],
                        "text_offset": [0] * len(tokens),
                    }
            choices.append(choice)
        usage = {"prompt_tokens": len(prompt.split()) + 3, "completion_tokens": completion_tokens}
        with self.lock:
            if count:
                self.served.update(usage)
        return {"id": "cmpl-fake", "object": "text_completion", "choices": choices, "usage": usage}
