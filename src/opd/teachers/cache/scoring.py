"""A batch's teacher scores as offline-cache records (`opd.data.cache_format.pack_shard`):
from a local model's logits (`score_rows`), or from a teacher server over one or more
replicas (`remote_records`: `opd score --endpoint`, `opd.teachers.remote.RemoteTeacher`,
so rows are spread over the servers and a dead one's requests move to another)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np
import torch

from opd.data.cache_format import tail_logmass_from_topk
from opd.losses.sparse import fold_student_to_buckets
from opd.modeling.hf import completion_logits, tokenizer_fingerprint

if TYPE_CHECKING:  # the client needs httpx (opd[serve]); `opd generate` and the demo do not
    from opd.teachers.remote import RemoteTeacher


@torch.no_grad()
def score_rows(model, batch, vocab_size: int, topk: int) -> list[dict]:
    """Teacher log-probs of each row's completion tokens (temperature 1), top-k and tail."""
    logits = completion_logits(model, batch, vocab_size).float()
    logp = torch.log_softmax(logits, dim=-1)
    ids = batch.completion_ids().to(logp.device)
    token = logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1).cpu()
    if topk:
        top_lp, top_ids = logp.topk(topk, dim=-1)
        tail = fold_student_to_buckets(logits, top_ids)[..., -1]
        top_lp, top_ids, tail = top_lp.cpu(), top_ids.cpu(), tail.cpu()
    lengths = batch.completion_mask[:, batch.prompt_width :].sum(-1).tolist()
    out = []
    for i, n in enumerate(lengths):
        rec = {"token_logprobs": token[i, :n].numpy()}
        if topk:
            rec["topk_ids"] = top_ids[i, :n].numpy()
            rec["topk_logprobs"] = top_lp[i, :n].numpy()
            rec["tail_logmass"] = tail[i, :n].numpy()
        out.append(rec)
    return out


def remote_scorer(urls: list[str], tokenizer, topk: int, remote: dict) -> RemoteTeacher:
    """The server(s) scoring a cache's rows, checked at connect against `tokenizer` (the
    rows' token ids are sent as they are) and its vocabulary; `remote`: `token_env`,
    `timeout_s`, `max_retries`."""
    from opd.teachers.remote import RemoteTeacher  # optional dependency: httpx

    env = remote.get("token_env", "OPD_TEACHER_TOKEN")
    return RemoteTeacher(
        list(urls),
        token=os.environ.get(env) or None,
        token_env=env,
        timeout_s=remote.get("timeout_s", 60.0),
        max_retries=remote.get("max_retries", 5),
        expected_fingerprint=tokenizer_fingerprint(tokenizer),
        expected_vocab_size=len(tokenizer),
        required_topk=topk,
        tokenizer=tokenizer,
    )


def remote_records(teacher: RemoteTeacher, batch, topk: int) -> list[dict]:
    """`score_rows`' records from a teacher server: token log-probs, top-k, and the tail
    mass from the top-k (a server returns no logits), as `--engine vllm` stores it."""
    scores = teacher.score(batch, "topk" if topk else "token", topk)
    lengths = batch.completion_mask[:, batch.prompt_width :].sum(-1).tolist()
    out = []
    for i, n in enumerate(lengths):
        rec = {"token_logprobs": scores.token_logprobs[i, :n].cpu().numpy()}
        if topk:
            lps = scores.topk_logprobs[i, :n].cpu().double().numpy()
            rec["topk_ids"] = scores.topk_ids[i, :n].cpu().numpy()
            rec["topk_logprobs"] = lps.astype(np.float32)
            rec["tail_logmass"] = tail_logmass_from_topk(lps)
        out.append(rec)
    return out
