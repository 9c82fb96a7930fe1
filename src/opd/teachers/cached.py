"""A teacher that answers from an offline cache (`opd generate` / `opd score`): no model.

Rows reach the loop from the same cache (`data.train: <cache dir>`) carrying `cache_row`
and their stored token ids, so batch row i's completion columns are exactly the tokens the
teacher scored; `score` checks that before returning anything. Only what the cache holds
can be served: the sampled token's log-prob and the top-k (+ tail) log-probs, at the
temperature they were computed at (1). Full logits, student samples and other completions
are refused with a message saying what to change.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch

from opd.data.batch import SequenceBatch
from opd.data.cache_format import CacheError, CacheReader
from opd.teachers.base import TeacherScores, check_need
from opd.teachers.cross_tokenizer.build import wrap
from opd.teachers.cross_tokenizer.cache import cache_in_other_tokenizer

log = logging.getLogger("opd")


def renormalized_topk(topk_lp: torch.Tensor, tail_logmass: torch.Tensor) -> torch.Tensor:
    """Rescale stored (fp16-rounded) top-k log-probs so head + exact tail sums to one.

    `[N, k], [N] -> [N, k]`. The tail was computed from full logits when the cache was
    written; without this, rounding of k values would leave a tail of noise (or a
    negative one, clamped to zero) where the true tail is tiny.
    """
    head = topk_lp.float()
    head_mass = torch.log(-torch.expm1(tail_logmass.float())).unsqueeze(-1)  # log(1 - tail)
    return head - torch.logsumexp(head, dim=-1, keepdim=True) + head_mass


class CachedTeacher:
    def __init__(self, cache_dir: str | Path, tokenizer=None, *, verify: bool = True):
        self.reader = CacheReader(cache_dir, verify=verify)
        if tokenizer is not None:
            self.reader.check_tokenizer(tokenizer)
        self.topk = self.reader.topk
        self.temperature = float(self.reader.manifest["logprob_temperature"])

    def score(
        self, batch: SequenceBatch, need: str, topk: int = 0, temperature: float = 1.0
    ) -> TeacherScores:
        check_need(need, topk)
        if need == "topk" and temperature != self.temperature:
            raise CacheError(
                f"loss.kd_temperature={temperature} but cache {self.reader.root} holds "
                f"log-probs at temperature {self.temperature}"
            )
        if need == "logits":
            raise CacheError(
                "the cached teacher stores top-k log-probs, not full logits: use "
                f"loss.estimator=topk with loss.topk <= {self.topk}"
            )
        if need == "topk" and not 0 < topk <= self.topk:
            raise CacheError(
                f"loss.topk={topk} but cache {self.reader.root} stores top-{self.topk} log-probs"
            )
        if len(batch.rows) != batch.size:
            raise CacheError("the cached teacher needs the batch's dataset rows (batch.rows)")
        B, L, P, K = batch.size, batch.completion_width, batch.prompt_width, self.topk
        ids = batch.input_ids[:, P:].cpu().numpy()
        lengths = batch.completion_mask[:, P:].sum(-1).tolist()
        token = np.zeros((B, L), np.float32)
        if need == "topk":
            # Unsupervised (padding) positions get a uniform distribution over K distinct
            # ids, so no divergence there is NaN before the mask removes it.
            top_ids = np.broadcast_to(np.arange(K, dtype=np.int64), (B, L, K)).copy()
            top_lp = np.full((B, L, K), -math.log(K), np.float32)
            tail = np.full((B, L), -np.inf, np.float32)
        for i, row in enumerate(batch.rows):
            if "cache_row" not in row:
                raise CacheError(
                    "batch row has no 'cache_row': with teacher.kind=cached, data.train must be "
                    f"the cache directory ({self.reader.root})"
                )
            arrays = self.reader.token_arrays(row["cache_row"], topk=need == "topk")
            stored, n = arrays["completion_ids"], lengths[i]
            if n > len(stored) or not np.array_equal(ids[i, :n], stored[:n]):
                raise CacheError(
                    f"batch row {i} (cache row {row['cache_row']}, source {batch.source!r}) does "
                    "not hold the cached completion: the cached teacher can only score the "
                    "completions it stored (source.lmbda=0, stored token ids)"
                )
            token[i, :n] = arrays["token_logprobs"][:n]
            if need == "topk":
                top_ids[i, :n] = arrays["topk_ids"][:n]
                top_lp[i, :n] = arrays["topk_logprobs"][:n]
                tail[i, :n] = arrays["tail_logmass"][:n]
        out = {"token_logprobs": torch.from_numpy(token)}
        if need == "topk":
            lp = renormalized_topk(torch.from_numpy(top_lp), torch.from_numpy(tail))
            out["topk_ids"] = torch.from_numpy(top_ids[..., :topk])
            out["topk_logprobs"] = lp[..., :topk]
            # the stored tail (exact, from the teacher's logits) plus the stored entries
            # beyond the k asked for
            rest = torch.cat([torch.from_numpy(tail)[..., None], lp[..., topk:]], dim=-1)
            out["topk_tail_logmass"] = torch.logsumexp(rest, dim=-1)
        device = batch.input_ids.device
        # No teacher compute happens here, so nothing is counted as scored.
        return TeacherScores(
            **{k: v.to(device, non_blocking=True) for k, v in out.items()}, tokens_scored=0
        )


def build_cached_teacher(config, tokenizer, encoder=None):
    """`teacher.kind: cached` from a run config, checked by opd.run.preflight.check_cache."""
    from opd.data.cache_format import is_cache, looks_like_cache, read_manifest
    from opd.teachers.checks import check_cache

    check_cache(config)
    train = config.data.train
    if not config.teacher.cache_dir and train and looks_like_cache(train) and not is_cache(train):
        read_manifest(train)  # raises: the manifest is missing or damaged, and how to rebuild
    cache_dir = config.teacher.cache_dir or (train if train and is_cache(train) else "")
    if not config.teacher.cache_dir:
        log.info("teacher.cache_dir not set; using the cache in data.train (%s)", cache_dir)
    teacher_tok = cache_in_other_tokenizer(config, tokenizer)
    if teacher_tok is None:
        return CachedTeacher(cache_dir, tokenizer)
    # The rows were re-tokenized for the student (opd.data); scores are aligned to them.
    inner = CachedTeacher(cache_dir, teacher_tok)
    cap = inner.topk if inner.temperature == 1.0 else 0  # the boundary rule reads top-k at T=1
    return wrap(config, inner, tokenizer, teacher_tok, encoder, cache_dir, topk_cap=cap)
