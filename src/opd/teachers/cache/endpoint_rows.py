"""A shard of an endpoint cache from the server's answers, and what the shards cost.

Token-level rows fill the shard arrays as `--engine vllm` does (`opd.teachers.vllm`):
the tail mass of a position is 1 - the sum of its top-k probabilities, floored
(`opd.data.cache_format.tail_logmass_from_topk`). Text rows leave the arrays
empty and keep the server's tokens, as strings, in the JSONL row. A row with an error has
no tokens at all: it is kept (its row id exists exactly once) but never trained on.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from opd.data.cache_format import tail_logmass_from_topk

USAGE_KEYS = ("requests", "attempts", "prompt_tokens", "completion_tokens")


def _arrays(answer, row_id: int, prompt_ids: list[int], k: int, token_level: bool) -> dict:
    ids = answer.token_ids if token_level and answer.error is None else []
    lps = answer.token_logprobs if ids else []
    rec = {
        "row_id": row_id,
        "finished": answer.finished,
        "prompt_ids": prompt_ids if token_level else [],
        "completion_ids": ids,
        "token_logprobs": np.asarray(lps, dtype=np.float32),
    }
    if k:
        top_ids = answer.top_ids if ids else np.zeros((0, k), np.int64)
        top_lps = answer.top_logprobs if ids else np.zeros((0, k), np.float64)
        rec["topk_ids"] = top_ids
        rec["topk_logprobs"] = top_lps.astype(np.float32)
        rec["tail_logmass"] = tail_logmass_from_topk(top_lps)
    return rec


def _check_prompt_ids(job, answer, sent, returned) -> list[int]:
    """The prompt ids a token-level row stores: those sent (completions; the server's must
    agree when it returns them) or the server's (chat: its template made them)."""
    if job.api == "completions":
        if returned is not None and list(returned) != list(sent) and answer.error is None:
            answer.error = "invalid"
            answer.message = "the server's prompt ids differ from those sent"
        return list(sent)
    if not returned and answer.error is None:
        answer.error, answer.message = "invalid", "the answer has no prompt_token_ids"
    return list(returned or [])


def shard_rows(job, prompt_idx, asked: list, results: list[dict]):
    """(array records, JSONL rows, usage fields of the shard entry) in row-id order."""
    spec, token_level = job.spec, job.token_level
    k = spec.topk if token_level else 0
    records, texts = [], []
    usage, errors, truncated = dict.fromkeys(USAGE_KEYS, 0), Counter(), 0
    for p, res in zip(prompt_idx, results):
        usage["requests"] += res["requests"]
        usage["attempts"] += res["attempts"]
        for key, value in res["usage"].items():
            usage[key] += value
        for j, answer in enumerate(res["answers"]):
            prompt_ids = []
            if token_level:
                prompt_ids = _check_prompt_ids(job, answer, asked[p], res["prompt_ids"])
            row_id = p * spec.n + j
            if answer.error:
                errors[answer.error] += 1
            elif answer.finish_reason == "length":
                truncated += 1
            records.append(_arrays(answer, row_id, prompt_ids, k, token_level))
            n_tokens = len(records[-1]["completion_ids"]) if token_level else None
            if not token_level and answer.tokens is not None:
                n_tokens = len(answer.tokens)
            text = {
                "cache_row": row_id,
                "prompt_index": p,
                "sample": j,
                "finished": answer.finished,
                "finish_reason": answer.finish_reason,
                "prompt_tokens": len(prompt_ids) if token_level else None,
                "completion_tokens": n_tokens,
                "row": {**job.rows[p], spec.completion_field: answer.text},
            }
            if answer.error:
                text["error"] = {"kind": answer.error, "message": answer.message}
            elif not token_level and answer.tokens is not None:
                text["teacher_tokens"] = {
                    "tokens": answer.tokens,
                    "logprobs": answer.token_logprobs,
                    "top": [[[t, v] for t, v in pos] for pos in answer.top],
                }
            texts.append(text)
    return records, texts, {"usage": usage, "errors": dict(errors), "truncated": truncated}


def summarize_usage(manifest: dict) -> None:
    """Totals over the finished shards: usage as the server reported it, errors by kind."""
    shards = manifest["shards"]
    cost = {key: sum(s["usage"][key] for s in shards) for key in USAGE_KEYS}
    cost["total_tokens"] = cost["prompt_tokens"] + cost["completion_tokens"]
    errors: Counter = Counter()
    for s in shards:
        errors.update(s["errors"])
    manifest["cost"] = cost
    manifest["errors"] = dict(sorted(errors.items()))
    manifest["truncated"] = sum(s["truncated"] for s in shards)


def cost_table(manifest: dict) -> list[str]:
    """Markdown table: per shard and total, the server's token counts and the row errors."""
    header = ["shard", "rows", "requests", "retries", "prompt tokens", "completion tokens",
              "errors", "truncated", "seconds"]  # fmt: skip

    def line(name, rows, u, errors, truncated, seconds):
        shown = ", ".join(f"{k} {v}" for k, v in sorted(errors.items())) or "0"
        return [name, f"{rows:,}", f"{u['requests']:,}", f"{u['attempts'] - u['requests']:,}",
                f"{u['prompt_tokens']:,}", f"{u['completion_tokens']:,}", shown,
                f"{truncated:,}", f"{seconds:.1f}"]  # fmt: skip

    body = [
        line(s["name"], s["rows"], s["usage"], s["errors"], s["truncated"], s["seconds"])
        for s in sorted(manifest["shards"], key=lambda s: s["index"])
    ]
    seconds = sum(s["seconds"] for s in manifest["shards"])
    rows = sum(s["rows"] for s in manifest["shards"])
    body.append(
        line("total", rows, manifest["cost"], manifest["errors"], manifest["truncated"], seconds)
    )
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(r) + " |" for r in body]
