"""`opd inspect DIR`: review an offline teacher cache before training on it.

Prints what made the cache, counts, completion/prompt length statistics, bytes per token
(against a dense float32 row), teacher log-prob and top-k coverage summaries, a few rows
decoded, and flags empty completions and truncated ones (no EOS: the teacher hit
max_new_tokens, so the student would learn to stop mid-answer... or never). Checksums are
verified first; a bad shard is an error that names it.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from opd.data.cache_format import CacheReader, is_token_level
from opd.teachers.cache.endpoint_rows import cost_table


def _stats(values: np.ndarray) -> str:
    if values.size == 0:
        return "none"
    p50, p90 = np.percentile(values, [50, 90])
    return (
        f"min {values.min()}  mean {values.mean():.1f}  p50 {p50:.0f}  p90 {p90:.0f}  "
        f"max {values.max()}"
    )


def _decode(tokenizer, ids) -> str:
    if tokenizer is None:
        return " ".join(map(str, ids))
    return tokenizer.decode(list(ids))


def cache_report(root: str, *, samples: int = 3, tokenizer=None, max_flagged: int = 10) -> dict:
    """Everything `opd inspect` prints, as a dict (also used by tests and scripts)."""
    reader = CacheReader(root, verify=True, allow_partial=True)
    m = reader.manifest
    eos, token_level = m["tokenizer"]["eos_id"], is_token_level(m)
    lengths, prompt_lengths, token_lp, tail, sample_rows = [], [], [], [], []
    empty, truncated, errors, n_rows = [], [], [], 0
    for _entry, arrays, rows in reader.iter_shards():
        n_rows += len(rows)
        c_off, p_off = arrays["completion_offsets"], arrays["prompt_offsets"]
        if token_level:
            lengths.append(np.diff(c_off))
            prompt_lengths.append(np.diff(p_off))
            token_lp.append(arrays["token_logprobs"])
        if "tail_logmass" in arrays:
            tail.append(np.exp(arrays["tail_logmass"]))
        for j, meta in enumerate(rows):
            if meta.get("error"):
                errors.append((meta["cache_row"], meta["error"]["kind"]))
                continue
            if not token_level:  # text: the server's own tokens, when it sent them
                known = meta.get("teacher_tokens") or {}
                token_lp.append(np.asarray(known.get("logprobs", []), dtype=np.float32))
                if meta.get("completion_tokens") is not None:
                    lengths.append(np.asarray([meta["completion_tokens"]]))
                if meta["row"][m["spec"]["completion_field"]] == "":
                    empty.append(meta["cache_row"])
                if not meta["finished"]:
                    truncated.append(meta["cache_row"])
                if len(sample_rows) < samples:
                    sample_rows.append(_text_sample(meta, m["spec"]))
                continue
            ids = arrays["completion_ids"][c_off[j] : c_off[j + 1]]
            text_ids = ids[:-1] if len(ids) and ids[-1] == eos else ids
            if len(text_ids) == 0:
                empty.append(meta["cache_row"])
            if not meta["finished"]:
                truncated.append(meta["cache_row"])
            if len(sample_rows) < samples:
                prompt = arrays["prompt_ids"][p_off[j] : p_off[j + 1]]
                sample_rows.append(
                    {
                        "cache_row": meta["cache_row"],
                        "prompt": _decode(tokenizer, prompt),
                        "completion": _decode(tokenizer, ids),
                        "finished": meta["finished"],
                        "mean_teacher_logprob": float(
                            arrays["token_logprobs"][c_off[j] : c_off[j + 1]].mean()
                        )
                        if len(ids)
                        else None,
                    }
                )
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0)  # noqa: E731
    lengths, prompt_lengths, token_lp, tail = map(cat, (lengths, prompt_lengths, token_lp, tail))
    return {
        "root": str(root),
        "manifest": m,
        "complete": m["complete"],
        "shards_done": len(m["shards"]),
        "rows": n_rows,
        "completion_tokens": int(lengths.sum()),
        "completion_lengths": _stats(lengths),
        "prompt_lengths": _stats(prompt_lengths),
        "teacher_nll_per_token": float(-token_lp.mean()) if token_lp.size else None,
        "mean_tail_mass": float(tail.mean()) if tail.size else None,
        "empty": empty,
        "truncated": truncated,
        "errors": errors,
        "samples": sample_rows,
        "max_flagged": max_flagged,
    }


def _text_sample(meta: dict, spec: dict) -> dict:
    lps = (meta.get("teacher_tokens") or {}).get("logprobs") or []
    return {
        "cache_row": meta["cache_row"],
        "prompt": meta["row"][spec["prompt_field"]],
        "completion": meta["row"][spec["completion_field"]],
        "finished": meta["finished"],
        "mean_teacher_logprob": float(np.mean(lps)) if lps else None,
    }


def format_report(r: dict) -> str:
    m, b = r["manifest"], r["manifest"]["bytes"]
    spec, counts = m["spec"], m["counts"]
    t, tok = m["teacher"], m["tokenizer"]
    template = tok["chat_template_used"]
    template = "the server's" if template == "server" else ("on" if template else "off")
    lines = [
        f"cache {r['root']}  ({m['spec']['mode']}, "
        f"{'complete' if r['complete'] else 'INCOMPLETE'}: "
        f"{r['shards_done']}/{m['num_shards']} shards)",
        f"teacher     {t['path']}  "
        + (f"(model {t['model']!r}, {t['api']} API)" if "api" in t
           else f"({t.get('num_parameters', '?')} parameters)"),
        f"tokenizer   {tok['fingerprint']}  V={tok['vocab_size']}  chat template {template}"
        if is_token_level(m)
        else f"tokenizer   unknown: a TEXT cache ({tok['check']})",
        f"prompts     {m['source']['prompts']}  ({m['source']['rows']} rows)",
    ]  # fmt: skip
    if spec["mode"] == "generate":
        lines.append(
            f"sampling    temperature {spec['temperature']}  top_p {spec['top_p']}  "
            f"top_k {spec['top_k']}  max_new_tokens {spec['max_new_tokens']}  n {spec['n']}  "
            f"seed {spec['seed']}"
        )
    if not is_token_level(m):
        lines += [
            f"stored      text rows; the server's tokens as text with up to top-{spec['topk']} "
            "log-probs where it sent them",
            f"counts      {counts['prompts']} prompts, {r['rows']} rows",
            f"completion  {r['completion_lengths']} (server tokens, where reported)",
            f"bytes       {b['total']:,} total",
        ]
    else:
        lines += [
            f"stored      top-{spec['topk']} {spec['logprob_dtype']} log-probs at temperature "
            f"{m['logprob_temperature']}",
            f"counts      {counts['prompts']} prompts, {r['rows']} rows, "
            f"{r['completion_tokens']} completion tokens, {counts['prompt_tokens']} prompt tokens",
            f"completion  {r['completion_lengths']}",
            f"prompt      {r['prompt_lengths']}",
            f"bytes       {b['total']:,} total; {b['per_completion_token']} per completion token "
            f"({b['arrays_per_completion_token']} arrays, layout "
            f"{b['layout_per_completion_token']}) vs {b['dense_float32_per_token']:,} for a "
            "dense float32 row",
        ]
    if r["teacher_nll_per_token"] is not None:
        lines.append(f"teacher     NLL {r['teacher_nll_per_token']:.4f} per completion token")
    if r["mean_tail_mass"] is not None:
        lines.append(
            f"top-k       mean mass outside the top-{spec['topk']}: {r['mean_tail_mass']:.3g}"
        )
    if r["errors"]:
        kinds = Counter(kind for _, kind in r["errors"])
        shown = ", ".join(str(row) for row, _ in r["errors"][: r["max_flagged"]])
        lines.append(
            f"WARNING     {len(r['errors'])} row errors, never trained on "
            f"({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))}): rows {shown}"
            + (" ..." if len(r["errors"]) > r["max_flagged"] else "")
        )
    for name, ids, why in (
        ("empty", r["empty"], "no text before EOS"),
        ("truncated", r["truncated"], "no EOS: hit max_new_tokens"),
    ):
        flag = "WARNING" if ids else "ok"
        shown = ", ".join(map(str, ids[: r["max_flagged"]])) + (
            " ..." if len(ids) > r["max_flagged"] else ""
        )
        lines.append(
            f"{flag:<11} {len(ids)} {name} completions ({why})" + (f": rows {shown}" if ids else "")
        )
    for s in r["samples"]:
        lines += [
            f"--- row {s['cache_row']} ({'finished' if s['finished'] else 'truncated'}, "
            f"mean teacher log-prob {s['mean_teacher_logprob'] or 0:.3f})",
            f"prompt:     {s['prompt']!r}",
            f"completion: {s['completion']!r}",
        ]
    if "cost" in m:
        lines += ["usage as the server reported it:", *cost_table(m)]
    return "\n".join(lines)


def inspect_cache(root: str, *, samples: int = 3, tokenizer_path: str = "") -> str:
    """The report as text; decodes with `tokenizer_path` or the teacher's tokenizer if present."""
    from pathlib import Path

    from opd.data.cache_format import CacheError, read_manifest
    from opd.modeling.hf import load_tokenizer, tokenizer_fingerprint

    manifest = read_manifest(root)
    path = tokenizer_path or manifest.get("tokenizer_path") or manifest["teacher"]["path"]
    if not is_token_level(manifest):
        path = ""  # text rows: nothing to decode
    tokenizer = None
    if path and Path(path).exists():
        tokenizer = load_tokenizer(path)
        if tokenizer_fingerprint(tokenizer) != manifest["tokenizer"]["fingerprint"]:
            if tokenizer_path:
                raise CacheError(f"tokenizer {tokenizer_path} is not the one cache {root} used")
            tokenizer = None  # the teacher directory changed since: show ids, not wrong text
    return format_report(cache_report(root, samples=samples, tokenizer=tokenizer))
