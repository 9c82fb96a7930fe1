"""A merged-tokenizer teacher distilled from A_long: A_long's text distribution, other tokens.

`merged_xl` (cross_tokenizer_teachers.py) is as skilled as A_long but trained apart from it,
and the two disagree where the task is uncertain: their per-token values correlate 0.64-0.82
(`cross_tokenizer_rewards.py`) where two same-tokenizer teachers reach 0.90-0.99. So a
gain ratio measured between them mixes what the alignment loses with how the teachers
differ. This teacher separates the two: it has the merged tokenizer (each step label with
its digit one token) and is trained on A_long's own distributions, so what the student is
told differs from A_long's signal only by what the training leaves over.

At each position of its own tokenization (context text s) the target is A_long's
distribution over the next merged token, exact from A_long's characters:

    T(c d) = p_A(c | s) p_A(d | s c)                  a label (or `#`) c with its digit d
    T(c)   = p_A(c | s) (1 - sum_d p_A(d | s c))      c with no digit after it
    T(y)   = p_A(y | s)                               any other character, or the end

p_A(. | s c) comes from A_long's teacher-forced pass where c is the text's next character,
and from one extra forward for the most likely other label; the mass of the remaining
labels (reported as `approx_mass`, the share of T not computed exactly) stays on T(c).
Contexts: the demo teacher's recipe (half the examples with corrupted steps), every
completion position supervised, forward KL (cross-entropy against T), the teacher spec's
learning-rate schedule. Checked before training (`check_targets`): on 16 rows, the sum of
log T over each row's own merged tokens equals A's log-prob of the text (< 1e-5 nats).
"""

from __future__ import annotations

import hashlib
import json
import random
import string
from pathlib import Path

import torch
import torch.nn.functional as F
from cross_tokenizer_teachers import RENAMED, lr_at, merged_tokenizer

from opd.cli.demo.build import BuildConfig, _new_model, config_hash
from opd.cli.demo.pretrain import greedy_accuracy
from opd.cli.demo.task import corrupt, make_examples
from opd.modeling.hf import load_causal_lm, load_tokenizer

LETTERS = string.ascii_lowercase + "#"


class _Maps:
    """Ids between A's characters and the merged vocabulary."""

    def __init__(self, a_tok, b_tok):
        b_vocab = b_tok.get_vocab()
        a_by_id = {i: t for t, i in a_tok.get_vocab().items()}
        size = len(a_tok)
        self.a_to_b = torch.tensor(
            [b_vocab.get(RENAMED.get(a_by_id[i], a_by_id[i]), b_tok.unk_token_id) for i in range(size)]
        )
        self.letters = torch.tensor([a_tok.convert_tokens_to_ids(c) for c in LETTERS])
        self.digits = torch.tensor([a_tok.convert_tokens_to_ids(d) for d in string.digits])
        self.is_letter = torch.zeros(size, dtype=torch.bool)
        self.is_letter[self.letters] = True
        self.letter_index = torch.full((size,), -1, dtype=torch.long)
        self.letter_index[self.letters] = torch.arange(len(LETTERS))
        self.pairs = torch.tensor([[b_vocab[f"{c}{d}"] for d in string.digits] for c in LETTERS])


def _rows(a_tok, b_tok, prompt: str, completion: str):
    """A's ids, B's ids, and per B completion position (its tokens, then the end): the
    character offset it starts at."""
    a_ids = [*a_tok(prompt + completion, add_special_tokens=False)["input_ids"], a_tok.eos_token_id]
    pb = b_tok(prompt, add_special_tokens=False)["input_ids"]
    enc = b_tok(completion, add_special_tokens=False, return_offsets_mapping=True)
    b_ids = [*pb, *enc["input_ids"], b_tok.eos_token_id]
    starts = [s for s, _ in enc["offset_mapping"]] + [len(completion)]
    a_prompt = len(a_ids) - 1 - len(completion)
    return a_ids, b_ids, len(pb), [a_prompt + s for s in starts]


def _batch(a_tok, b_tok, texts: list[tuple[str, str]]):
    """`_rows` of each (prompt, completion): A's rows, B's rows, and per B completion
    position `(row, A index of its next character)` and `(row, B index of its token)`."""
    rows_a, rows_b, where, cells = [], [], [], []
    for k, (prompt, completion) in enumerate(texts):
        a_ids, b_ids, pb, starts = _rows(a_tok, b_tok, prompt, completion)
        rows_a.append(a_ids)
        rows_b.append(b_ids)
        where += [(k, g) for g in starts]
        cells += [(k, pb + j) for j in range(len(starts))]
    return rows_a, rows_b, where, cells


def _pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], attn[i, : len(r)] = torch.tensor(r), 1
    return ids, attn


@torch.no_grad()
def _targets(a, maps: _Maps, a_rows, a_pad, where) -> tuple[torch.Tensor, float]:
    """`T [N, V_B]` at the positions `where` = [(row, A index of the next character)]."""
    ids, attn = _pad(a_rows, a_pad)
    logp = torch.log_softmax(a(input_ids=ids, attention_mask=attn).logits.float(), -1)
    row = torch.tensor([r for r, _ in where])
    g = torch.tensor([i for _, i in where])
    q = logp[row, g - 1].exp()  # p_A(. | s)
    nxt = ids[row, g]  # the text's next character (or A's end of turn)
    alt_pool = q[:, maps.letters].clone()
    actual_letter = maps.is_letter[nxt]
    alt_pool[actual_letter, maps.letter_index[nxt[actual_letter]]] = -1.0
    alt = maps.letters[alt_pool.argmax(-1)]  # the most likely other label
    extra = [[*a_rows[r][:i], int(c)] for (r, i), c in zip(where, alt, strict=True)]
    e_ids, e_attn = _pad(extra, a_pad)
    last = e_attn.sum(-1) - 1
    e_logits = a(input_ids=e_ids, attention_mask=e_attn).logits.float()
    r_alt = torch.softmax(e_logits[torch.arange(len(extra)), last], -1)[:, maps.digits]
    r_act = logp[row, g].exp()[:, maps.digits]
    n = q.shape[0]
    T = torch.zeros(n, int(maps.pairs.max()) + 1)
    T.index_add_(1, maps.a_to_b, q)
    for char, r, on in ((nxt, r_act, actual_letter), (alt, r_alt, torch.ones(n, dtype=torch.bool))):
        li = maps.letter_index[char].clamp(min=0)
        mass = q.gather(1, char[:, None]) * on[:, None]
        split = mass * r  # [N, 10]: c followed by each digit
        T.scatter_add_(1, maps.pairs[li], split)
        T.scatter_add_(1, maps.a_to_b[char][:, None], -split.sum(-1, keepdim=True))
    exact = q.gather(1, alt[:, None]).squeeze(1) + torch.where(
        actual_letter, q.gather(1, nxt[:, None]).squeeze(1), 0.0
    )
    approx = (q[:, maps.letters].sum(-1) - exact).clamp(min=0)
    return T.clamp(min=0), float(approx.mean())


@torch.no_grad()
def check_targets(a, a_tok, b_tok, examples, rng: random.Random) -> float:
    """The targets on `examples` (every other one corrupted): each sums to 1, and each row's
    sum of log T(the text's next merged token) equals A's log-prob of the text, which the
    exact split of each label's mass must give (the text's own labels are always exact).
    Returns the largest identity difference in nats; raises above 1e-4."""
    texts = [(ex["prompt"], corrupt(ex, rng)[0] if k % 2 else ex["completion"])
             for k, ex in enumerate(examples)]  # fmt: skip
    rows_a, rows_b, where, cells = _batch(a_tok, b_tok, texts)
    T, _ = _targets(a, _Maps(a_tok, b_tok), rows_a, a_tok.pad_token_id, where)
    ids, attn = _pad(rows_a, a_tok.pad_token_id)
    logp = torch.log_softmax(a(input_ids=ids, attention_mask=attn).logits.float(), -1)
    got, want = [0.0] * len(examples), [0.0] * len(examples)
    for n, (k, j) in enumerate(cells):
        got[k] += float(T[n, rows_b[k][j]].log())
    for k, row in enumerate(rows_a):
        first = min(g for r, g in where if r == k)
        want[k] = float(sum(logp[k, t - 1, row[t]] for t in range(first, len(row))))
    worst = max(abs(x - y) for x, y in zip(got, want, strict=True))
    if not worst <= 1e-4:
        raise RuntimeError(f"distillation targets break the sequence identity by {worst:.2e} nats")
    off = float((T.sum(-1) - 1).abs().max())  # each label's mass split, none made or lost
    if not off <= 1e-4:
        raise RuntimeError(f"a distillation target sums to 1 {off:+.2e}")
    return worst


def train_distilled(a, a_tok, b_tok, spec, examples, steps: int, seed: int, log=print):
    """The merged-tokenizer model trained on A's targets (module doc), `steps` updates."""
    maps = _Maps(a_tok, b_tok)
    model = _new_model(b_tok, spec, seed)
    gen, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01, betas=(0.9, 0.98))
    model.train()
    approx = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(spec.lr, step, steps)
        picked = [examples[i] for i in torch.randint(len(examples), (spec.batch_size,), generator=gen).tolist()]
        texts = [(ex["prompt"], corrupt(ex, rng)[0] if rng.random() < spec.corrupt_prob else ex["completion"])
                 for ex in picked]  # fmt: skip
        a_rows, b_rows, where, cells = _batch(a_tok, b_tok, texts)
        T, mass = _targets(a, maps, a_rows, a_tok.pad_token_id, where)
        approx.append(mass)
        ids, attn = _pad(b_rows, b_tok.pad_token_id)
        logits = model(input_ids=ids, attention_mask=attn).logits.float()
        rows = torch.tensor([r for r, _ in cells])
        cols = torch.tensor([c - 1 for _, c in cells])  # the position that predicts token c
        loss = -(T * F.log_softmax(logits[rows, cols], -1)).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % 200 == 0:
            log(json.dumps({"distilled_step": step + 1, "loss": round(float(loss), 4)}))
    return model.eval(), sum(approx) / len(approx)


def distilled_teacher(
    out: Path, build: BuildConfig, source: Path, steps: int, seed: int = 0, log=print
) -> tuple[Path, dict]:
    """The merged-tokenizer teacher distilled from `source` (A_long), trained once into
    `out` (rebuilt when the build, seed, steps or source weights change); its meta."""
    weights = (source / "model.safetensors").read_bytes()
    key = f"{config_hash(build, seed)}-{steps}-{hashlib.sha256(weights).hexdigest()[:12]}"
    meta_file = out / "meta.json"
    if meta_file.is_file() and json.loads(meta_file.read_text()).get("build_hash") == key:
        return out, json.loads(meta_file.read_text())
    a, a_tok, b_tok = load_causal_lm(str(source)).eval(), load_tokenizer(str(source)), merged_tokenizer()
    train = make_examples(build.num_train, seed, "train", build.task)
    evals = make_examples(build.num_eval, seed, "eval", build.task)
    identity = check_targets(a, a_tok, b_tok, train[:16], random.Random(seed))
    model, approx = train_distilled(a, a_tok, b_tok, build.teacher, train, steps, seed * 2 + 1, log)
    acc = greedy_accuracy(model, b_tok, evals, build.max_new_tokens)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    b_tok.save_pretrained(out)
    meta = {"steps": steps, "eval_accuracy": acc, "approx_mass": approx, "build_hash": key,
            "identity_nats": identity, "params": sum(p.numel() for p in model.parameters())}  # fmt: skip
    meta_file.write_text(json.dumps(meta))
    return out, meta
