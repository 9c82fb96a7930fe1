"""One teacher pass that writes an offline cache (format: `opd.teachers.cache`).

    opd generate --teacher T --prompts prompts.jsonl --out cache/ --topk 64 --n 4
    opd score    --teacher T --prompts pairs.jsonl   --out cache/ --topk 64

`generate` samples teacher completions for every prompt (`opd.sampling.reference.sample`, KV-cached)
and then scores them; `score` scores existing prompt/completion pairs (supervised KD on
ground truth). Scoring is one forward pass over prompt+completion (`completion_logits`),
so the stored log-probs are at temperature 1 whatever the sampling temperature was; the
two temperatures are never the same knob. Prompts are tokenized by the same `Encoder` the
training loop uses (same chat template, system prompt, truncation), and the exact token
ids are stored, so training sees the very tokens the teacher scored.

Work is split into shards of `shard_size` prompts; shard i always holds prompts
[i*shard_size, (i+1)*shard_size) and is sampled with a generator seeded by (seed, i, batch),
so a killed run that is restarted with the same arguments skips the shards its manifest
lists (after verifying their checksums) and produces the same cache as an unkilled run.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from opd.config.parse import DataConfig
from opd.config.paths import OutOfSpace, is_out_of_space, make_dir, out_of_space
from opd.data.batch import assemble
from opd.data.cache_format import (
    FORMAT,
    LOGPROB_DTYPES,
    VERSION,
    CacheError,
    pack_shard,
    read_manifest,
    verify_shard,
    write_manifest,
    write_shard,
)
from opd.data.rows import Encoder, RowSpec, check_rows, load_rows
from opd.modeling.hf import (
    load_causal_lm,
    load_tokenizer,
    resolve_device,
    shared_vocab_size,
    tokenizer_fingerprint,
)
from opd.modeling.vocab import end_token_ids
from opd.sampling.reference import sample
from opd.teachers.cache.scoring import remote_records, remote_scorer, score_rows
from opd.teachers.cache.spec import CacheSpec, model_identity, rows_digest

log = logging.getLogger("opd")


def _shard_seed(seed: int, shard: int, batch: int) -> int:
    return (seed * 1_000_003 + shard * 10_007 + batch) % (2**63 - 1)


class _Job:
    """State shared by the shards of one run: rows, encoder, teacher (loaded on first use)."""

    def __init__(
        self, teacher_path, rows, spec: CacheSpec, device, batch_size, vllm_settings, urls=()
    ):
        self.teacher_path, self.rows, self.spec = teacher_path, rows, spec
        self.urls, self.remote = list(urls), {}  # engine remote: the servers, client options
        self.vllm_settings = vllm_settings
        self.device, self.batch_size = device, batch_size
        self.tokenizer = load_tokenizer(teacher_path)
        data = DataConfig(
            prompt_field=spec.prompt_field,
            completion_field=spec.completion_field,
            chat_template=spec.chat_template,
            system_prompt=spec.system_prompt,
            max_prompt_tokens=spec.max_prompt_tokens,
            max_completion_tokens=spec.max_completion_tokens,
        )
        self.encoder = Encoder(self.tokenizer, data)
        self.vocab_size = len(self.tokenizer)
        self._model = None

    def _vllm_batch(self, index: int, b: int, prompts, completions):
        from opd.teachers.vllm import cache_records

        # one seed per row, from (seed, shard, row): a resumed shard samples the same rows
        seeds = [
            _shard_seed(self.spec.seed, index, b + i) % (2**31 - 1) for i in range(len(prompts))
        ]
        return cache_records(
            self.teacher_path, self.spec, self.vllm_settings, self.encoder.end_ids,
            prompts, completions, seeds,
        )  # fmt: skip

    def check_prompts(self, where: str) -> None:
        """Every prompt must fit `max_prompt_tokens` (a cache keeps one row per prompt, so
        none is dropped silently); generation stops on every end id of the teacher."""
        for i, row in enumerate(self.rows):
            try:
                ids, _ = self.encoder.fit_prompt(self.encoder.row_prompt(row))
            except ValueError as err:
                raise ValueError(f"{where}: row {i}: {err}") from None
            if ids is None:
                raise ValueError(
                    f"{where}: row {i}: its chat-template prompt is longer than "
                    f"max_prompt_tokens={self.spec.max_prompt_tokens}; raise it or remove the row"
                )
        self.encoder.end_ids = end_token_ids(
            self.teacher_path, self.tokenizer, self.encoder.stop_id
        )

    @property
    def model(self):
        if self._model is None and self.spec.engine == "remote":
            self._model = remote_scorer(self.urls, self.tokenizer, self.spec.topk, self.remote)
        if self._model is None:
            self._model = load_causal_lm(
                self.teacher_path, dtype=self.spec.teacher_dtype, device=self.device
            ).eval()
            self._model.requires_grad_(False)  # the teacher is never trained
            shared_vocab_size(self.tokenizer, self._model)  # refuses a too-small LM head
        return self._model

    def shard_records(self, index: int) -> tuple[list[dict], list[dict]]:
        """(array records, JSONL rows) of shard `index`, in row-id order."""
        spec, tok, enc = self.spec, self.tokenizer, self.encoder
        start = index * spec.shard_size
        prompt_idx = list(range(start, min(start + spec.shard_size, len(self.rows))))
        seqs = [(p, j) for p in prompt_idx for j in range(spec.n)]
        records, texts = [], []
        for b in range(0, len(seqs), self.batch_size):
            chunk = seqs[b : b + self.batch_size]
            src = [self.rows[p] for p, _ in chunk]
            prompts = [enc.row_prompt_ids(r) for r in src]
            if spec.engine == "vllm":
                given = None
                if spec.mode == "score":
                    given = [enc.completion_ids(enc.row_completion(r)) for r in src]
                completions, scores = self._vllm_batch(index, b, prompts, given)
            elif spec.mode == "generate":
                gen = torch.Generator(device=self.device)
                gen.manual_seed(_shard_seed(spec.seed, index, b // self.batch_size))
                out = sample(
                    self.model,
                    prompts,
                    max_new_tokens=spec.max_new_tokens,
                    eos_id=enc.end_ids,
                    pad_id=tok.pad_token_id,
                    vocab_size=self.vocab_size,
                    temperature=spec.temperature,
                    top_k=spec.top_k,
                    top_p=spec.top_p,
                    generator=gen,
                )
                completions = out.completions
            else:
                completions = [enc.completion_ids(enc.row_completion(r)) for r in src]
            if spec.engine != "vllm":
                batch = assemble(prompts, completions, pad_id=tok.pad_token_id).to(self.device)
                if spec.engine == "remote":
                    scores = remote_records(self.model, batch, spec.topk)
                else:
                    scores = score_rows(self.model, batch, self.vocab_size, spec.topk)
            for (p, j), row, pids, cids, rec in zip(chunk, src, prompts, completions, scores):
                finished = bool(cids) and cids[-1] in enc.end_ids
                text_ids = cids[:-1] if finished else cids
                row_id = p * spec.n + j
                rec.update(row_id=row_id, finished=finished, prompt_ids=pids, completion_ids=cids)
                records.append(rec)
                text = tok.decode(text_ids) if spec.mode == "generate" else enc.row_completion(row)
                texts.append(
                    {
                        "cache_row": row_id,
                        "prompt_index": p,
                        "sample": j,
                        "finished": finished,
                        "prompt_tokens": len(pids),
                        "completion_tokens": len(cids),
                        "row": {**row, spec.completion_field: text},
                    }
                )
        return records, texts


def _check_resumable(old: dict, new: dict, out: Path) -> None:
    for key in ("spec", "tokenizer", "source"):
        for field, value in new[key].items():
            # a spec field added later reads as its default in an older manifest
            theirs = old[key].get(field, getattr(CacheSpec, field, None) if key == "spec" else None)
            if theirs != value:
                raise CacheError(
                    f"{out} holds a cache made with {key}.{field}={theirs!r}, "
                    f"this run has {value!r}; rerun with the same arguments to resume, or "
                    "choose another --out"
                )
    mine = {k: v for k, v in new["teacher"].items() if k != "path"}
    theirs = {k: old["teacher"].get(k) for k in mine}
    if mine != theirs:
        raise CacheError(f"{out} was made by another teacher ({old['teacher']['path']})")


def _open_out(out: Path, manifest: dict):
    """Lock `out` for this run and adopt the verified shards an earlier run left there."""
    make_dir("--out", out)
    lock = (out / ".lock").open("w")
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CacheError(f"another `opd generate`/`opd score` is writing {out}") from None
        if any(not p.name.startswith(".") for p in out.iterdir()):
            try:
                old = read_manifest(out)
            except FileNotFoundError:
                raise FileExistsError(f"--out {out} is not empty and holds no cache") from None
            manifest["source"]["prompts"] = old["source"]["prompts"]
            _check_resumable(old, manifest, out)
            if "num_parameters" in old["teacher"]:
                manifest["teacher"]["num_parameters"] = old["teacher"]["num_parameters"]
            for entry in old["shards"]:
                try:
                    verify_shard(out, entry)
                    manifest["shards"].append(entry)
                except CacheError as err:
                    log.warning("%s; writing that shard again", err)
        for stale in out.glob(".*.tmp-*"):  # left by a killed run; the lock says none is live
            stale.unlink()
    except BaseException:
        lock.close()
        raise
    return lock


def _out_of_space(err, out: Path, manifest: dict, done: int, arrays, texts) -> OutOfSpace | None:
    """For a full disk, the error naming the space the shards left need (this one's size
    each), after removing what the failed write left; None for any other error."""
    if not is_out_of_space(err):
        return None
    for stale in out.glob(f".*.tmp-{os.getpid()}"):
        stale.unlink(missing_ok=True)
    left = manifest["num_shards"] - done
    shard = sum(a.nbytes for a in arrays.values()) + sum(len(json.dumps(t)) + 1 for t in texts)
    then = f"The {done} shard(s) written are intact: free space, then rerun the same command"
    return out_of_space(out, f"--out {out}", shard * left, f"{then} ({left} shard(s) left)")


def _summarize(manifest: dict, vocab: int) -> None:
    shards = manifest["shards"]
    tokens = sum(s["completion_tokens"] for s in shards)
    arrays = sum(b["bytes"] for s in shards for f, b in s["files"].items() if f.endswith("tensors"))
    total = sum(b["bytes"] for s in shards for b in s["files"].values())
    spec = manifest["spec"]
    itemsize = LOGPROB_DTYPES[spec["logprob_dtype"]]().itemsize
    manifest["counts"] = {
        "prompts": sum(s["prompt_end"] - s["prompt_start"] for s in shards),
        "rows": sum(s["rows"] for s in shards),
        "completion_tokens": tokens,
        "prompt_tokens": sum(s["prompt_tokens"] for s in shards),
        "finished": sum(s["finished"] for s in shards),
    }
    manifest["bytes"] = {
        "total": total,
        "arrays": arrays,
        "per_completion_token": round(total / max(tokens, 1), 2),
        "arrays_per_completion_token": round(arrays / max(tokens, 1), 2),
        # 6k + 12 with fp16: top-k ids and log-probs, tail mass, token id and log-prob.
        "layout_per_completion_token": spec["topk"] * (4 + itemsize) + 4 * bool(spec["topk"]) + 8,
        "dense_float32_per_token": 4 * vocab,
    }
    manifest["complete"] = len(shards) == manifest["num_shards"]


def build_cache(
    teacher: str,
    prompts: str | Path,
    out: str | Path,
    spec: CacheSpec,
    *,
    batch_size: int = 16,
    device: str = "auto",
    on_shard: Callable[[int], None] | None = None,
    vllm_settings=None,
    urls: list[str] | tuple = (),
    remote: dict | None = None,
) -> dict:
    """Write (or finish) the cache in `out`; returns its manifest.

    `vllm_settings` (a `VllmConfig`) sizes the engine of `spec.engine == "vllm"`. `urls`
    (`opd score --endpoint`): the rows are scored by those servers (`opd serve` or vLLM,
    replicas of one teacher: `engine: remote`), `teacher` is then the tokenizer the rows
    are encoded in (the servers' own, checked at connect) and `remote` the client's
    `token_env`, `timeout_s`, `max_retries`."""
    if urls:
        if spec.mode != "score":
            raise ValueError("teacher servers score given completions: opd score --endpoint")
        spec = CacheSpec(**{**asdict(spec), "engine": "remote"})
    out, device = Path(out), resolve_device(device)
    make_dir("--out", out)  # a path mistake fails before the rows and the teacher load
    rows = load_rows(prompts)
    completion = spec.completion_field if spec.mode == "score" else None
    check_rows(rows, RowSpec(spec.prompt_field, completion), str(prompts))
    if not rows:
        raise ValueError(f"{prompts} holds no rows")
    if spec.engine == "vllm" and vllm_settings is None:
        from opd.config.parse import VllmConfig

        vllm_settings = VllmConfig(gpu_memory_utilization=0.9)  # no trainer shares the GPU
    job = _Job(teacher, rows, spec, device, batch_size, vllm_settings, urls)
    job.remote = remote or {}
    job.check_prompts(str(prompts))  # before the teacher model loads
    vocab = len(job.tokenizer)
    if spec.topk > vocab:
        log.info("topk=%d exceeds the vocabulary; storing k=%d", spec.topk, vocab)
        spec = CacheSpec(**{**asdict(spec), "topk": vocab})
        job.spec = spec
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "spec": asdict(spec),
        "teacher": {"path": ", ".join(urls), "model": job.model.model}
        if urls
        else model_identity(teacher),
        "tokenizer": {
            "fingerprint": tokenizer_fingerprint(job.tokenizer),
            "vocab_size": vocab,
            "eos_id": job.tokenizer.eos_token_id,
            "pad_id": job.tokenizer.pad_token_id,
            "chat_template_used": job.encoder.use_chat,
        },
        "source": {"prompts": str(prompts), "rows": len(rows), "sha256": rows_digest(rows)},
        "logprob_temperature": 1.0,
        "num_shards": math.ceil(len(rows) / spec.shard_size),
        "batch_size": batch_size,
        "shards": [],
    }
    lock = _open_out(out, manifest)
    try:
        _summarize(manifest, vocab)
        write_manifest(out, manifest)
        done = {e["index"] for e in manifest["shards"]}
        bar = tqdm(total=len(rows), desc=f"opd {spec.mode}", disable=None, dynamic_ncols=True)
        bar.update(sum(e["prompt_end"] - e["prompt_start"] for e in manifest["shards"]))
        for index in range(manifest["num_shards"]):
            if index in done:
                continue
            t0 = time.perf_counter()
            with torch.no_grad():  # sampling and scoring train nothing
                records, texts = job.shard_records(index)
            arrays = pack_shard(records, spec.topk, spec.logprob_dtype)
            whole = len(manifest["shards"])  # shards the manifest on disk lists
            try:
                entry = write_shard(out, index, arrays, texts)
            except OSError as err:
                raise _out_of_space(err, out, manifest, whole, arrays, texts) or err from err
            entry.update(
                prompt_start=index * spec.shard_size,
                prompt_end=min((index + 1) * spec.shard_size, len(rows)),
                finished=sum(t["finished"] for t in texts),
                seconds=round(time.perf_counter() - t0, 3),
            )
            manifest["shards"] = sorted([*manifest["shards"], entry], key=lambda e: e["index"])
            if spec.engine not in ("vllm", "remote"):  # no torch module here
                manifest["teacher"].setdefault(
                    "num_parameters", sum(p.numel() for p in job.model.parameters())
                )
            _summarize(manifest, vocab)
            try:
                write_manifest(out, manifest)
            except OSError as err:
                raise _out_of_space(err, out, manifest, whole, arrays, texts) or err from err
            bar.update(entry["prompt_end"] - entry["prompt_start"])
            log.info(
                "%s: %d rows, %d tokens, %.1f tokens/s",
                entry["name"],
                entry["rows"],
                entry["completion_tokens"],
                entry["completion_tokens"] / max(entry["seconds"], 1e-9),
            )
            if on_shard is not None:
                on_shard(index)
        bar.close()
    finally:
        lock.close()  # releases the lock (a killed process releases it too)
        if urls:
            job.model.close()
    return manifest
