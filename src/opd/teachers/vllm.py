"""A teacher on a local vLLM engine, scoring given sequences with `prompt_logprobs`.

    opd train cfg.yaml teacher.kind=vllm teacher.path=Qwen/Qwen3-8B loss.objective=pg
    opd train cfg.yaml teacher.kind=vllm loss.estimator=topk loss.topk=20

vLLM returns, per position, the log-prob of the given token plus the top-k (at temperature
1: the engine keeps its raw log-probs), never full logits. That serves the `pg` objective
(token) and the `topk` estimator; full-vocabulary objectives are refused at start. The
engine is started with `max_logprobs` = the run's top-k, since vLLM refuses larger requests.
A server (`vllm serve`) is `teacher.kind=remote` instead: same numbers, over HTTP.
"""

from __future__ import annotations

import math

import torch

from opd.config.checks import teacher_need
from opd.data.batch import SequenceBatch
from opd.data.cache_format import tail_logmass_from_topk
from opd.teachers.base import TeacherScores, check_need, check_untempered
from opd.teachers.cross_tokenizer.build import needs_alignment, wrap
from opd.teachers.remote import sequences_of

FULL_VOCAB_REFUSAL = (
    "teacher.kind='vllm' returns token and top-k log-probs, not full logits: use "
    "loss.objective=pg (sampled token) or loss.estimator=topk (with loss.topk)"
)


class VllmTeacher:
    def __init__(self, llm, vocab_size: int, max_logprobs: int):
        self.llm, self.vocab_size, self.max_logprobs = llm, vocab_size, max_logprobs

    def score(
        self, batch: SequenceBatch, need: str, topk: int = 0, temperature: float = 1.0
    ) -> TeacherScores:
        from vllm import SamplingParams

        check_need(need, topk)
        if need == "topk":
            check_untempered("vllm", temperature)  # prompt_logprobs are at temperature 1
        if need == "logits":
            raise ValueError(FULL_VOCAB_REFUSAL)
        k = min(topk, self.vocab_size) if need == "topk" else 0
        if k > self.max_logprobs:
            raise ValueError(
                f"top-k {k} exceeds the vLLM teacher's max_logprobs={self.max_logprobs}"
            )
        rows = sequences_of(batch)
        B, L = batch.size, batch.completion_width
        token = torch.zeros((B, L), dtype=torch.float32)
        # Positions past a row's completion are masked by the loss, but must stay finite.
        ids = torch.arange(k, dtype=torch.long).expand(B, L, k).clone()
        lps = torch.full((B, L, k), -math.log(k + 1), dtype=torch.float32)
        params = SamplingParams(max_tokens=1, prompt_logprobs=k, detokenize=False)
        outs = self.llm.generate(
            [{"prompt_token_ids": seq} for _, seq, _ in rows], params, use_tqdm=False
        )
        for (r, seq, start), out in zip(rows, outs):
            tok, top_ids, top_lps = unpack_prompt_logprobs(out.prompt_logprobs, seq, start, k)
            n = len(tok)
            token[r, :n] = torch.tensor(tok)
            if k:
                ids[r, :n] = torch.tensor(top_ids, dtype=torch.long)
                lps[r, :n] = torch.tensor(top_lps)
        device = batch.input_ids.device
        scores = TeacherScores(
            token_logprobs=token.to(device), tokens_scored=batch.num_target_tokens()
        )
        if k:
            scores.topk_ids, scores.topk_logprobs = ids.to(device), lps.to(device)
        return scores


def unpack_prompt_logprobs(plp, seq: list[int], start: int, k: int):
    """vLLM's per-position `{token id: Logprob}` -> given-token log-probs and top-k, from `start`."""
    tok, top_ids, top_lps = [], [], []
    for j in range(start, len(seq)):
        entries = plp[j]
        tok.append(entries[seq[j]].logprob)
        if k:
            best = sorted(entries.items(), key=lambda kv: kv[1].rank)[:k]
            top_ids.append([t for t, _ in best])
            top_lps.append([v.logprob for _, v in best])
    return tok, top_ids, top_lps


def build_vllm_teacher(config, tokenizer, encoder=None):
    """The `teacher.kind: vllm` of a run config; refuses full-vocabulary objectives first."""
    from opd.modeling.hf import load_tokenizer
    from opd.modeling.vocab import check_same_tokenizer
    from opd.sampling.vllm import start_engine

    need, topk = teacher_need(config.loss)
    if need == "logits":
        raise ValueError(FULL_VOCAB_REFUSAL)
    t = config.teacher
    if not t.path:
        raise ValueError("teacher.path is required for teacher.kind='vllm'")
    teacher_tok = load_tokenizer(t.path)
    cross = needs_alignment(config, tokenizer, teacher_tok)
    if not cross:
        check_same_tokenizer(tokenizer, teacher_tok, t.path)
    s, data = config.sampling, config.data
    longest = s.max_new_tokens  # student samples only (lambda = 1), else dataset rows too
    if config.source.lmbda < 1:
        longest = max(longest, data.max_completion_tokens)
    max_len = data.max_prompt_tokens + longest
    if cross:  # the same text in the teacher's tokens: room for a tokenizer twice as fine
        max_len *= 2
    max_logprobs = max(topk, config.cross_tokenizer.boundary_k(config.loss.objective) if cross else 0, 1)
    llm = start_engine(
        t.path,
        dtype=t.dtype,
        settings=config.vllm,
        max_model_len=max_len,
        seed=config.seed,
        max_logprobs=max_logprobs,
    )
    if not cross:
        return VllmTeacher(llm, len(tokenizer), max_logprobs)
    inner = VllmTeacher(llm, len(teacher_tok), max_logprobs)
    return wrap(config, inner, tokenizer, teacher_tok, encoder, t.path)


def cache_records(
    teacher_path: str,
    spec,
    settings,
    end_ids: list[int],
    prompts: list[list[int]],
    completions: list[list[int]] | None,
    seeds: list[int],
) -> tuple[list[list[int]], list[dict]]:
    """(completions, score records) for an offline cache (`opd generate --engine vllm`;
    `spec` is its `CacheSpec`, `settings` a `VllmConfig`).

    With `completions=None` the engine samples them and reports, in the same pass, the
    top-k and sampled-token log-probs at temperature 1 (raw log-probs: they never see the
    sampling temperature); given completions are scored with `prompt_logprobs`."""
    import numpy as np
    from vllm import SamplingParams

    from opd.sampling.vllm import start_engine

    longest = spec.max_new_tokens if completions is None else spec.max_completion_tokens
    llm = start_engine(
        teacher_path,
        dtype=spec.teacher_dtype,
        settings=settings,
        max_model_len=spec.max_prompt_tokens + longest,
        seed=spec.seed,
        max_logprobs=max(spec.topk, 1),
    )
    topk = spec.topk
    records = []
    if completions is None:
        params = [
            SamplingParams(
                temperature=spec.temperature,
                top_k=spec.top_k,
                top_p=spec.top_p,
                max_tokens=spec.max_new_tokens,
                stop_token_ids=list(end_ids),
                logprobs=topk,
                detokenize=False,
                seed=int(s),
            )
            for s in seeds
        ]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        completions = [list(o.outputs[0].token_ids) for o in outs]
        per_row = [
            unpack_prompt_logprobs([None, *o.outputs[0].logprobs], [-1, *c], 1, topk)
            for o, c in zip(outs, completions)
        ]
    else:
        params = SamplingParams(max_tokens=1, prompt_logprobs=topk, detokenize=False)
        seqs = [p + c for p, c in zip(prompts, completions)]
        outs = llm.generate([{"prompt_token_ids": s} for s in seqs], params, use_tqdm=False)
        per_row = [
            unpack_prompt_logprobs(o.prompt_logprobs, s, len(p), topk)
            for o, s, p in zip(outs, seqs, prompts)
        ]
    for tok, top_ids, top_lps in per_row:
        rec = {"token_logprobs": np.asarray(tok, dtype=np.float32)}
        if topk:
            lps = np.asarray(top_lps, dtype=np.float64).reshape(len(tok), topk)
            rec["topk_ids"] = np.asarray(top_ids, dtype=np.int64).reshape(len(tok), topk)
            rec["topk_logprobs"] = lps.astype(np.float32)
            rec["tail_logmass"] = tail_logmass_from_topk(lps)
        records.append(rec)
    return completions, records
