"""`opd inspect DIR`: review an offline teacher cache before training on it.

Prints what made the cache, counts, completion/prompt length statistics, bytes per token
(against a dense float32 row), teacher log-prob and top-k coverage summaries, a few rows
decoded, and flags empty completions and truncated ones (no EOS: the teacher hit
max_new_tokens, so the student would learn to stop mid-answer... or never). Checksums are
verified first; a bad shard is an error that names it.
"""

from __future__ import annotations

import numpy as np

from opd.data.cache_format import CacheReader


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
    eos = m["tokenizer"]["eos_id"]
    lengths, prompt_lengths, token_lp, tail, sample_rows = [], [], [], [], []
    empty, truncated = [], []
    for _entry, arrays, rows in reader.iter_shards():
        c_off, p_off = arrays["completion_offsets"], arrays["prompt_offsets"]
        lengths.append(np.diff(c_off))
        prompt_lengths.append(np.diff(p_off))
        token_lp.append(arrays["token_logprobs"])
        if "tail_logmass" in arrays:
            tail.append(np.exp(arrays["tail_logmass"]))
        for j, meta in enumerate(rows):
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
        "rows": int(lengths.size),
        "completion_tokens": int(lengths.sum()),
        "completion_lengths": _stats(lengths),
        "prompt_lengths": _stats(prompt_lengths),
        "teacher_nll_per_token": float(-token_lp.mean()) if token_lp.size else None,
        "mean_tail_mass": float(tail.mean()) if tail.size else None,
        "empty": empty,
        "truncated": truncated,
        "samples": sample_rows,
        "max_flagged": max_flagged,
    }


def format_report(r: dict) -> str:
    m, b = r["manifest"], r["manifest"]["bytes"]
    spec, counts = m["spec"], m["counts"]
    lines = [
        f"cache {r['root']}  ({m['spec']['mode']}, "
        f"{'complete' if r['complete'] else 'INCOMPLETE'}: "
        f"{r['shards_done']}/{m['num_shards']} shards)",
        f"teacher     {m['teacher']['path']}  "
        f"({m['teacher'].get('num_parameters', '?')} parameters)",
        f"tokenizer   {m['tokenizer']['fingerprint']}  V={m['tokenizer']['vocab_size']}  "
        f"chat template {'on' if m['tokenizer']['chat_template_used'] else 'off'}",
        f"prompts     {m['source']['prompts']}  ({m['source']['rows']} rows)",
    ]
    if spec["mode"] == "generate":
        lines.append(
            f"sampling    temperature {spec['temperature']}  top_p {spec['top_p']}  "
            f"top_k {spec['top_k']}  max_new_tokens {spec['max_new_tokens']}  n {spec['n']}  "
            f"seed {spec['seed']}"
        )
    lines += [
        f"stored      top-{spec['topk']} {spec['logprob_dtype']} log-probs at temperature "
        f"{m['logprob_temperature']}",
        f"counts      {counts['prompts']} prompts, {r['rows']} rows, "
        f"{r['completion_tokens']} completion tokens, {counts['prompt_tokens']} prompt tokens",
        f"completion  {r['completion_lengths']}",
        f"prompt      {r['prompt_lengths']}",
        f"bytes       {b['total']:,} total; {b['per_completion_token']} per completion token "
        f"({b['arrays_per_completion_token']} arrays, layout {b['layout_per_completion_token']}) "
        f"vs {b['dense_float32_per_token']:,} for a dense float32 row",
    ]
    if r["teacher_nll_per_token"] is not None:
        lines.append(f"teacher     NLL {r['teacher_nll_per_token']:.4f} per completion token")
    if r["mean_tail_mass"] is not None:
        lines.append(
            f"top-k       mean mass outside the top-{spec['topk']}: {r['mean_tail_mass']:.3g}"
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
    return "\n".join(lines)


def inspect_cache(root: str, *, samples: int = 3, tokenizer_path: str = "") -> str:
    """The report as text; decodes with `tokenizer_path` or the teacher's tokenizer if present."""
    from pathlib import Path

    from opd.data.cache_format import CacheError, read_manifest
    from opd.modeling.hf import load_tokenizer, tokenizer_fingerprint

    manifest = read_manifest(root)
    path = tokenizer_path or manifest["teacher"]["path"]
    tokenizer = None
    if path and Path(path).exists():
        tokenizer = load_tokenizer(path)
        if tokenizer_fingerprint(tokenizer) != manifest["tokenizer"]["fingerprint"]:
            if tokenizer_path:
                raise CacheError(f"tokenizer {tokenizer_path} is not the one cache {root} used")
            tokenizer = None  # the teacher directory changed since: show ids, not wrong text
    return format_report(cache_report(root, samples=samples, tokenizer=tokenizer))
