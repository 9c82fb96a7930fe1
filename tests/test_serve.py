"""The teacher server under load and faults: loopback only, bounded, seconds per test."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

from opd.cli import main as cli_main
from opd.teachers.server.app import check_exposure
from opd.teachers.server.protocol import array_b64
from serve_util import LIMITS, TOKEN, auth, close, local_logprobs, random_seqs, start_server


@pytest.fixture(scope="module")
def served(tiny_pair):
    server, service = start_server(tiny_pair[0])
    yield server, service
    server.stop()


def check_vllm_choice(choice, seq, k, service):
    """One `/v1/completions` choice against an unbatched local forward."""
    ref = local_logprobs(service.model, seq, service.vocab_size)
    plp = choice["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(seq)
    for p in range(1, len(seq)):
        entries = plp[p]
        first = next(iter(entries))
        assert first == str(seq[p])  # the actual token comes first, as in vLLM
        close(entries[first]["logprob"], ref[p - 1, seq[p]])
        assert entries[first]["rank"] == int((ref[p - 1] >= ref[p - 1, seq[p]]).sum())
        top = sorted((v["rank"], int(t), v["logprob"]) for t, v in entries.items() if t != first)
        values, ids = ref[p - 1].topk(k)
        expect = [(r + 1, int(i), float(v)) for r, (v, i) in enumerate(zip(values, ids))]
        expect = [e for e in expect if e[1] != seq[p]]
        assert [t[:2] for t in top] == [e[:2] for e in expect]
        close([t[2] for t in top], [e[2] for e in expect])
        assert len(entries) in (k, k + 1)
        assert entries[first]["decoded_token"] == service.tokenizer.decode([seq[p]])


def check_score(body, seqs, starts, k, service):
    """One `/opd/v1/score` answer against unbatched local forwards."""
    tok = array_b64(body["token_logprobs"], "<f4")
    ids = array_b64(body["topk_ids"], "<i4").reshape(-1, k)
    lps = array_b64(body["topk_logprobs"], "<f4").reshape(-1, k)
    at = 0
    for seq, start, n in zip(seqs, starts, body["lengths"]):
        assert n == len(seq) - start
        ref = local_logprobs(service.model, seq, service.vocab_size)[start - 1 :]
        close(tok[at : at + n], ref.gather(-1, torch.tensor(seq[start:])[:, None])[:, 0])
        values, top = ref.topk(k)
        assert (ids[at : at + n] == top.numpy()).all()
        close(lps[at : at + n], values)
        at += n
    assert at == len(tok)


def test_vllm_completions_format(served):
    server, service = served
    seqs = random_seqs(random.Random(0), 3, service.vocab_size)
    payload = {"prompt": seqs, "max_tokens": 0, "echo": True, "prompt_logprobs": 4}
    r = httpx.post(f"{server.url}/v1/completions", json=payload, headers=auth())
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "tiny-teacher"
    assert body["usage"] == {
        "prompt_tokens": sum(map(len, seqs)),
        "completion_tokens": 0,
        "total_tokens": sum(map(len, seqs)),
    }
    for i, (choice, seq) in enumerate(zip(body["choices"], seqs)):
        assert choice["index"] == i and choice["text"] == service.tokenizer.decode(seq)
        assert choice["logprobs"] is None and choice["finish_reason"] == "length"
        check_vllm_choice(choice, seq, 4, service)
    # A single prompt as a flat list, named model, no top-k: only the actual tokens.
    one = {"model": "tiny-teacher", "prompt": seqs[0], "max_tokens": 0, "echo": True}
    one["prompt_logprobs"] = 0
    plp = httpx.post(f"{server.url}/v1/completions", json=one, headers=auth()).json()
    assert all(len(d) == 1 for d in plp["choices"][0]["prompt_logprobs"][1:])
    models = httpx.get(f"{server.url}/v1/models", headers=auth()).json()
    assert models["data"][0]["id"] == "tiny-teacher"


@pytest.mark.parametrize(
    ("change", "status", "words"),
    [
        ({"model": "other"}, 404, "does not exist"),
        ({"max_tokens": 16}, 400, "max_tokens=0"),
        ({"prompt": "text"}, 400, "token ids"),
        ({"prompt_logprobs": -1}, 400, "--max-topk"),
        ({"prompt_logprobs": 17}, 400, "--max-topk"),
        ({"prompt": [[5] * 9] * 9}, 413, "--max-seqs-per-request"),
        ({"prompt": [5] * 65}, 413, "--max-seq-len"),
        ({"prompt": [5, 100000]}, 400, "outside [0,"),
        ({"prompt": [5, 1.5]}, 400, "integer token ids"),
        ({"stream": True}, 400, "stream"),
    ],
)
def test_vllm_refusals(served, change, status, words):
    server, _ = served
    payload = {"prompt": [5, 6, 7], "max_tokens": 0, "echo": True, "prompt_logprobs": 2, **change}
    r = httpx.post(f"{server.url}/v1/completions", json=payload, headers=auth())
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]
    assert r.json()["error"]["code"] == status


def test_concurrent_clients_get_their_own_answers(served):
    """8 clients x 10 requests, both endpoints: nothing lost, duplicated or mixed up."""
    server, service = served
    batches_before = service.batcher.batches

    async def client(c: int, http: httpx.AsyncClient):
        rng = random.Random(c)
        for i in range(10):
            seqs = random_seqs(rng, rng.randint(1, 4), service.vocab_size)
            k = rng.randint(1, 8)
            if (c + i) % 2:
                starts = [rng.randint(1, len(s)) for s in seqs]
                payload = {"sequences": seqs, "start": starts, "topk": k}
                r = await http.post("/opd/v1/score", json=payload)
                assert r.status_code == 200, r.text
                check_score(r.json(), seqs, starts, k, service)
            else:
                payload = {"prompt": seqs, "max_tokens": 0, "echo": True, "prompt_logprobs": k}
                r = await http.post("/v1/completions", json=payload)
                assert r.status_code == 200, r.text
                for choice, seq in zip(r.json()["choices"], seqs):
                    check_vllm_choice(choice, seq, k, service)

    async def run():
        async with httpx.AsyncClient(base_url=server.url, headers=auth(), timeout=30) as http:
            await asyncio.gather(*(client(c, http) for c in range(8)))

    asyncio.run(run())
    assert service.batcher.batches - batches_before < 80  # requests were batched together
    assert service.batcher.queued_tokens == 0


def test_bad_requests_do_not_harm_others(served):
    server, service = served
    url = server.url
    big = json.dumps({"sequences": [[5] * 64] * 8, "pad": "x" * LIMITS.max_body_bytes})
    bad = [
        ("POST", "/opd/v1/score", b'{"sequences": [[5, 6', auth(), 400, "malformed JSON"),
        ("POST", "/opd/v1/score", b"[1, 2]", auth(), 400, "JSON object"),
        ("POST", "/opd/v1/score", big.encode(), auth(), 413, "bytes"),
        ("POST", "/opd/v1/score", b'{"sequences": [[5, 6]]}', auth("wrong"), 401, "token"),
        ("POST", "/opd/v1/score", b'{"sequences": [[5, 6]]}', {}, 401, "token"),
        ("GET", "/opd/v1/info", b"", {}, 401, "token"),
        ("POST", "/opd/v1/score", b'{"sequences": [[5, 6]], "topk": 99}', auth(), 400, "99"),
        ("POST", "/opd/v1/score", b'{"sequences": [[5, 6]], "start": [3]}', auth(), 400, "start"),
    ]

    async def refused(http, method, path, body, headers, status, words):
        r = await http.request(method, url + path, content=body, headers=headers)
        assert r.status_code == status, (path, r.text)
        assert words in r.json()["error"]["message"]

    async def good(http, c):
        seqs = random_seqs(random.Random(100 + c), 3, service.vocab_size)
        r = await http.post(
            url + "/opd/v1/score", json={"sequences": seqs, "topk": 3}, headers=auth()
        )
        assert r.status_code == 200
        check_score(r.json(), seqs, [1] * 3, 3, service)

    async def run():
        async with httpx.AsyncClient(timeout=30) as http:
            jobs = [refused(http, *b) for b in bad] + [good(http, c) for c in range(8)]
            await asyncio.gather(*jobs)
            assert (await http.get(url + "/health")).json() == {"status": "ok"}
            info = (await http.get(url + "/opd/v1/info", headers=auth())).json()
            assert info["vocab_size"] == service.vocab_size
            assert info["tokenizer_fingerprint"] == service.fingerprint

    asyncio.run(run())


def test_slow_client_gets_408_and_others_go_on(served):
    server, service = served
    host, port = server.url.removeprefix("http://").split(":")
    slow = socket.create_connection((host, int(port)), timeout=5)
    slow.sendall(
        b"POST /opd/v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {TOKEN}\r\nContent-Length: 200\r\n\r\n".encode()
        + b'{"sequences": [[5, 6,'
    )  # ...and then nothing more
    with httpx.Client(base_url=server.url, headers=auth(), timeout=5) as http:
        for i in range(5):
            seqs = random_seqs(random.Random(i), 2, service.vocab_size)
            r = http.post("/opd/v1/score", json={"sequences": seqs, "topk": 2})
            assert r.status_code == 200
    # Served while the slow client was still being waited for (it has no answer yet).
    assert select.select([slow], [], [], 0)[0] == []
    answer = b""
    while b"}}" not in answer:  # the whole error body, however it is split into packets
        chunk = slow.recv(4096)
        answer += chunk
        if not chunk:
            break
    slow.close()
    answer = answer.decode()
    assert answer.startswith("HTTP/1.1 408"), answer
    assert "not received within" in answer


def test_graceful_shutdown_finishes_requests_in_flight(tiny_pair):
    server, service = start_server(tiny_pair[0], batch_wait_ms=400)  # requests wait in queue
    url, result = server.url, {}

    def request():
        payload = {"sequences": [[5, 6, 7, 8]], "topk": 2}
        result["r"] = httpx.post(url + "/opd/v1/score", json=payload, headers=auth(), timeout=10)

    thread = threading.Thread(target=request)
    thread.start()
    while service.batcher.queued_tokens == 0:  # the request is inside the server
        time.sleep(0.005)
    server.stop()
    thread.join(10)
    assert result["r"].status_code == 200
    check_score(result["r"].json(), [[5, 6, 7, 8]], [1], 2, service)
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", timeout=2)


def test_refuses_public_address_without_token(tiny_pair, capsys, monkeypatch):
    monkeypatch.delenv("NO_SUCH_TOKEN_VAR", raising=False)
    with pytest.raises(ValueError, match="without a bearer token"):
        check_exposure("0.0.0.0", None)
    check_exposure("0.0.0.0", "t")
    check_exposure("127.0.0.1", None)
    check_exposure("::1", None)
    argv = ["serve", "--model", str(tiny_pair[0]), "--host", "0.0.0.0"]
    assert cli_main([*argv, "--token-env", "NO_SUCH_TOKEN_VAR"]) == 2
    assert "NO_SUCH_TOKEN_VAR" in capsys.readouterr().err


def test_cli_serve_process(tiny_pair):
    """`opd serve` as a real process: serves, then SIGTERM shuts it down cleanly."""
    env = {**os.environ, "OPD_TEACHER_TOKEN": TOKEN}
    cmd = [sys.executable, "-m", "opd.cli", "serve", "--model", str(tiny_pair[0]), "--port", "0"]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline, url = time.monotonic() + 60, None
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            found = re.search(r"running on (http://127\.0\.0\.1:\d+)", line)
            url = found.group(1) if found else None
        assert url, "server did not start"
        r = httpx.post(url + "/opd/v1/score", json={"sequences": [[5, 6, 7]]}, headers=auth())
        assert r.status_code == 200 and r.json()["lengths"] == [2]
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal to exit as SIGTERM does.
        assert proc.wait(30) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
