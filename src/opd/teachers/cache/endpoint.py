"""`opd generate --endpoint URL --model NAME`: an offline cache from any OpenAI-compatible
server (`vllm serve` elsewhere, or a hosted API), in the format `opd generate` writes.

    opd generate --endpoint http://gpu:8000 --model Qwen/Qwen3-8B --tokenizer Qwen/Qwen3-8B \\
        --prompts prompts.jsonl --out cache/ --topk 16 --n 4 --concurrency 16
    OPENAI_API_KEY=... opd generate --endpoint https://api.example.com --model m --api chat \\
        --prompts prompts.jsonl --out cache/ --topk 5 --requests-per-minute 500

Two kinds of cache come out. **Token-level**: `--tokenizer` names a local tokenizer and the
server's `/tokenize` (vLLM) agrees with it on a probe text covering the vocabulary; every
answer then comes back as token ids with their log-probs and top-k, stored in the shard
arrays as `--engine vllm` stores them, and the cache serves token-level KD (the teacher's
log-probs are vLLM's raw ones, at temperature 1). **Text**: no tokenizer given, or the
server cannot show it is the same (a hosted API): the manifest says so and why
(`tokenizer.token_level: false`), the shard arrays are empty, the JSONL rows hold the text
and, when the server gave them, its tokens as strings with their log-probs and top
entries (`teacher_tokens`, for cross-tokenizer use). Both train SeqKD (`loss.objective=ce`).

A request asks for `n` samples of one prompt, seeded with the seed `--engine vllm` gives
the prompt's first sample; vLLM seeds sample j with seed + j, so a seeded vLLM server
writes the rows `--engine vllm` writes. Rows the server refuses, filters or answers
with garbage are stored with an `error` (kind and message), counted per shard and in the
manifest, and left out of training; truncated answers (`finish_reason=length`) are kept and
flagged as `opd generate` does. Usage (prompt and completion tokens as the server reports
them, requests, attempts) is summed per shard and in total: `opd inspect` prints the table.
Shards, manifest and resume are `opd generate`'s (`opd.teachers.cache.generate`): exactly
once after a kill.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm

from opd.config.parse import DataConfig
from opd.data.cache_format import FORMAT, VERSION, pack_shard, write_manifest, write_shard
from opd.data.encoding import is_conversation
from opd.data.rows import Encoder, RowSpec, check_rows, load_rows
from opd.modeling.hf import load_tokenizer, tokenizer_fingerprint
from opd.modeling.vocab import end_token_ids
from opd.teachers.cache.endpoint_answers import (
    Answer,
    InvalidAnswer,
    parse_answers,
    request_payload,
)
from opd.teachers.cache.endpoint_http import EndpointClient, EndpointSettings, RequestRefused
from opd.teachers.cache.endpoint_rows import cost_table, shard_rows, summarize_usage
from opd.teachers.cache.endpoint_servers import check_servers
from opd.teachers.cache.generate import _open_out, _out_of_space, _shard_seed, _summarize
from opd.teachers.cache.spec import CacheSpec, rows_digest

log = logging.getLogger("opd")

SEED_LIMIT = 2**31 - 1  # `--engine vllm` seeds live below this


def answer_bytes(spec: CacheSpec, n: int) -> int:
    """A bound on one answer's size: per token its text, its log-prob and (k + 1) top
    entries of at most ~256 bytes of JSON each (a chat entry spells out the token's bytes),
    plus 1 MiB for the rest."""
    return n * spec.max_new_tokens * (spec.topk + 2) * 256 + (1 << 20)


class _Job:
    """The prompts of one run, in the form the API takes, and how one prompt is asked."""

    def __init__(self, rows, spec: CacheSpec, api: str, model: str, stop, tokenizer, path):
        self.rows, self.spec, self.api, self.model, self.stop = rows, spec, api, model, stop
        self.tokenizer, self.encoder, self.end_ids = tokenizer, None, []
        if tokenizer is not None:
            data = DataConfig(
                prompt_field=spec.prompt_field,
                chat_template=spec.chat_template,
                system_prompt=spec.system_prompt,
                max_prompt_tokens=spec.max_prompt_tokens,
            )
            self.encoder = Encoder(tokenizer, data)
            self.end_ids = end_token_ids(path, tokenizer, self.encoder.stop_id)
        self.vocab = len(tokenizer) if tokenizer is not None else 0
        self.token_level = False

    def prompt(self, row: dict, where: str):
        """The request's prompt: messages (chat), token ids (token-level completions), text."""
        spec, prompt = self.spec, row[self.spec.prompt_field]
        if is_conversation(prompt) and prompt and prompt[-1]["role"] == "assistant":
            prompt = prompt[:-1]  # the answer to generate again (as `Encoder.row_prompt`)
        if self.api == "chat":
            messages = [dict(m) for m in prompt] if is_conversation(prompt) else [
                {"role": "user", "content": prompt}
            ]  # fmt: skip
            if spec.system_prompt and messages[0]["role"] != "system":
                messages.insert(0, {"role": "system", "content": spec.system_prompt})
            return messages
        if self.token_level:
            ids, _ = self.encoder.fit_prompt(prompt)
            if ids is None:
                raise ValueError(
                    f"{where}: its prompt is longer than max_prompt_tokens="
                    f"{spec.max_prompt_tokens}; raise it or remove the row"
                )
            return ids
        if is_conversation(prompt):
            raise ValueError(
                f"{where}: a conversation needs --api chat (or --tokenizer with a chat "
                "template, for a token-level cache)"
            )
        return spec.system_prompt + prompt

    def requests(self, shard: int, p: int) -> list[tuple[int, int]]:
        """(n, seed) per request for prompt `p`: one request of n samples, seeded as
        `--engine vllm` seeds sample 0 (vLLM seeds sample j with seed + j), unless the
        seeds wrap, then one request per sample with its own seed."""
        n, start = self.spec.n, shard * self.spec.shard_size
        first = _shard_seed(self.spec.seed, shard, (p - start) * n) % SEED_LIMIT
        if first + n - 1 < SEED_LIMIT:
            return [(n, first)]
        return [(1, _shard_seed(self.spec.seed, shard, (p - start) * n + j) % SEED_LIMIT)
                for j in range(n)]  # fmt: skip

    def estimate(self, prompt, n: int) -> int:
        """Tokens a request will cost, for the rate limit before the server says."""
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            size = len(prompt)
        else:
            text = prompt if isinstance(prompt, str) else " ".join(
                str(m.get("content", "")) for m in prompt
            )  # fmt: skip
            size = len(text) // 4 + 8
        return size + self.spec.max_new_tokens * n


async def ask(client, job: _Job, shard: int, p: int, prompt) -> dict:
    """All `n` answers for prompt `p`, with the usage and attempts they took."""
    spec, path = job.spec, "/v1/chat/completions" if job.api == "chat" else "/v1/completions"
    out = {"answers": [], "usage": {"prompt_tokens": 0, "completion_tokens": 0}}
    out.update(requests=0, attempts=0, prompt_ids=None)
    for n, seed in job.requests(shard, p):
        payload = request_payload(
            job.api, job.model, prompt, spec, n=n, seed=seed, stop=job.stop,
            token_level=job.token_level, end_ids=job.end_ids,
        )  # fmt: skip
        estimate = job.estimate(prompt, n)
        out["requests"] += 1
        try:
            body, attempts = await client.request(
                "POST", path, payload, estimate, answer_bytes(spec, n)
            )
        except RequestRefused as err:
            out["attempts"] += 1
            kind = "invalid" if err.status == 200 else "refused"
            out["answers"] += [Answer(error=kind, message=str(err)) for _ in range(n)]
            continue
        out["attempts"] += attempts
        try:
            answers, usage, prompt_ids = parse_answers(
                body, job.api, n=n, k=spec.topk, token_level=job.token_level,
                max_tokens=spec.max_new_tokens, vocab_size=job.vocab or 1 << 62,
            )  # fmt: skip
        except InvalidAnswer as err:
            answers, usage, prompt_ids = [Answer(error="invalid", message=str(err))] * n, {}, None
        for key, value in usage.items():
            out["usage"][key] += value
        if usage:
            client.limiter.correct(sum(usage.values()) - estimate)
        out["prompt_ids"] = out["prompt_ids"] or prompt_ids
        out["answers"] += answers
    return out


async def _build(urls, model, rows, prompts, out, spec, settings, api, stop, tokenizer, path,
                 on_shard) -> dict:  # fmt: skip
    job = _Job(rows, spec, api, model, stop, tokenizer, path)
    client = EndpointClient(urls, settings)
    try:
        job.token_level, why = await check_servers(client, model, tokenizer, path)
        log.info("endpoint %s (%s, %s API): %s", client.url, model, api, why)
        if job.token_level and spec.topk > job.vocab:
            raise ValueError(f"--topk {spec.topk} exceeds the vocabulary ({job.vocab} tokens)")
        asked = [job.prompt(row, f"{prompts}: row {i}") for i, row in enumerate(rows)]
        manifest = _manifest(client.url, model, api, stop, spec, rows, prompts, job, why, settings)
        if tokenizer is not None:
            manifest["tokenizer_path"] = path
        lock = _open_out(out, manifest)
        try:
            await _shards(client, job, asked, out, manifest, on_shard)
        finally:
            lock.close()
    finally:
        await client.aclose()
    return manifest


async def _shards(client, job: _Job, asked: list, out: Path, manifest: dict, on_shard) -> None:
    spec = job.spec
    summarize_usage(manifest)
    _summarize(manifest, job.vocab)
    write_manifest(out, manifest)
    done = {e["index"] for e in manifest["shards"]}
    bar = tqdm(total=len(asked), desc="opd generate", disable=None, dynamic_ncols=True)
    bar.update(sum(e["prompt_end"] - e["prompt_start"] for e in manifest["shards"]))
    fresh = not manifest["shards"]
    for index in range(manifest["num_shards"]):
        if index in done:
            continue
        t0 = time.perf_counter()
        start = index * spec.shard_size
        prompt_idx = range(start, min(start + spec.shard_size, len(asked)))
        results = await asyncio.gather(*(ask(client, job, index, p, asked[p]) for p in prompt_idx))
        if fresh:
            check_setup(client.url, index, results)
        fresh = False
        records, texts, usage = shard_rows(job, prompt_idx, asked, results)
        arrays = pack_shard(records, _stored_k(job), "float32")
        whole = len(manifest["shards"])  # a full disk: exit 4 naming the space needed
        try:
            entry = write_shard(out, index, arrays, texts)
        except OSError as err:
            raise _out_of_space(err, out, manifest, whole, arrays, texts) or err from err
        entry.update(
            prompt_start=start,
            prompt_end=prompt_idx.stop,
            finished=sum(t["finished"] for t in texts),
            seconds=round(time.perf_counter() - t0, 3),
            **usage,
        )
        manifest["shards"] = sorted([*manifest["shards"], entry], key=lambda e: e["index"])
        summarize_usage(manifest)
        _summarize(manifest, job.vocab)
        try:
            write_manifest(out, manifest)
        except OSError as err:
            raise _out_of_space(err, out, manifest, whole, arrays, texts) or err from err
        bar.update(len(prompt_idx))
        log.info(
            "%s: %d rows, %d requests, %d prompt + %d completion tokens, %d errors",
            entry["name"], entry["rows"], entry["usage"]["requests"],
            entry["usage"]["prompt_tokens"], entry["usage"]["completion_tokens"],
            sum(entry["errors"].values()),
        )  # fmt: skip
        if on_shard is not None:
            on_shard(index)
    bar.close()


def check_setup(url: str, index: int, results: list[dict]) -> None:
    """Stop a new cache whose first shard's requests were all refused or answered with
    garbage: that is a setting the server refuses (a wrong --model, --topk over its limit),
    not bad rows, and every row would fail alike. One request alone proves nothing."""
    answers = [a for r in results for a in r["answers"]]
    if sum(r["requests"] for r in results) >= 2 and all(
        a.error in ("refused", "invalid") for a in answers
    ):
        raise ValueError(
            f"endpoint {url} answered no row of shard {index} usably (first: "
            f"{answers[0].error}: {answers[0].message}); check --model, --api, --topk "
            "and the sampling options"
        )


def _stored_k(job: _Job) -> int:
    return job.spec.topk if job.token_level else 0


def _manifest(url, model, api, stop, spec, rows, prompts, job: _Job, why, settings) -> dict:
    tok = job.tokenizer
    if job.token_level:
        tokenizer = {
            "fingerprint": tokenizer_fingerprint(tok),
            "vocab_size": len(tok),
            "eos_id": tok.eos_token_id,
            "pad_id": tok.pad_token_id,
            "chat_template_used": "server" if api == "chat" else job.encoder.use_chat,
        }
    else:
        tokenizer = {"fingerprint": None, "vocab_size": None, "eos_id": None, "pad_id": None}
        tokenizer["chat_template_used"] = "server" if api == "chat" else False
    tokenizer.update(token_level=job.token_level, check=why)
    return {
        "format": FORMAT,
        "version": VERSION,
        "spec": asdict(spec),
        "teacher": {"path": url, "model": model, "api": api, "stop": list(stop)},
        "tokenizer": tokenizer,
        "source": {"prompts": str(prompts), "rows": len(rows), "sha256": rows_digest(rows)},
        # vLLM returns raw log-probs (its default logprobs mode): temperature 1
        "logprob_temperature": 1.0 if job.token_level else None,
        "num_shards": math.ceil(len(rows) / spec.shard_size),
        "batch_size": settings.concurrency,
        "shards": [],
    }


def build_endpoint_cache(
    url: str | list[str],
    model: str,
    prompts: str | Path,
    out: str | Path,
    spec: CacheSpec,
    settings: EndpointSettings | None = None,
    *,
    api: str = "completions",
    tokenizer: str = "",
    stop: list[str] | tuple[str, ...] = (),
    on_shard=None,
) -> dict:
    """Write (or finish) the cache in `out` from the server at `url`; returns its manifest.

    `url` may list several servers, replicas of one teacher: each request goes to the
    least-loaded one and a failed one's to another (`endpoint_http.EndpointClient`); the
    cache is the one a single server writes, and a resume may use other servers.

    `tokenizer`: a local tokenizer (the student's, or the teacher's copy) that the cache's
    token ids must be in; without it, or when the server cannot show it tokenizes the
    same, the cache holds text. `spec` is `opd generate`'s `CacheSpec` (mode generate);
    its `logprob_dtype` is float32 here, as the server sends float32."""
    if api not in ("completions", "chat"):
        raise ValueError(f"--api {api!r} must be completions or chat")
    if spec.mode != "generate":
        raise ValueError("an endpoint generates completions: spec.mode must be 'generate'")
    urls = [url] if isinstance(url, str) else list(url)
    if not urls:
        raise ValueError("--endpoint: no server given")
    for one in urls:
        if not one.startswith(("http://", "https://")):
            raise ValueError(f"--endpoint {one!r} must be an http:// or https:// URL")
    urls = [u.rstrip("/").removesuffix("/v1") for u in urls]  # the OpenAI SDK's base_url form
    spec = CacheSpec(**{**asdict(spec), "engine": "endpoint", "logprob_dtype": "float32"})
    settings = settings or EndpointSettings()
    rows = load_rows(prompts)
    check_rows(rows, RowSpec(spec.prompt_field, None), str(prompts))
    if not rows:
        raise ValueError(f"{prompts} holds no rows")
    tok = load_tokenizer(tokenizer) if tokenizer else None
    return asyncio.run(
        _build(urls, model, rows, prompts, Path(out), spec, settings, api, list(stop), tok,
               tokenizer, on_shard)
    )  # fmt: skip


__all__ = ["EndpointSettings", "build_endpoint_cache", "cost_table"]
