"""The two other-tokenizer teachers of `cross_tokenizer.py`.

* `permuted_teacher`: the demo teacher's weights behind a permuted character vocabulary
  with renamed specials: equal skill by construction, every span one token on each side.
* `merged_teacher`: a teacher trained here, with the demo teacher's architecture, recipe
  (half of its examples with corrupted steps, clean targets after them) and stopping rule
  (dev accuracy 0.95, checked every 100 steps from step 400), on the demo's data, in a
  tokenizer that writes each step label with its digit as one token (`a7`, `#4`): against
  the student's characters every completion step is a span of two student tokens and one
  teacher token, so the one-to-one positions kd compares are few and pg's exact span
  log-probs carry the comparison. Its skill is measured (greedy accuracy on the eval
  split), not equal by construction. Cached in the output directory.
"""

from __future__ import annotations

import json
import math
import random
import string
from dataclasses import replace
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from opd.cli.demo.build import BuildConfig, _new_model, config_hash
from opd.cli.demo.pretrain import collate_right_padded, completion_nll, greedy_accuracy
from opd.cli.demo.task import corrupt, make_examples
from opd.cli.demo.tiny import DEFAULT_CHARS
from opd.modeling.hf import load_tokenizer

RENAMED = {"<pad>": "[PAD]", "<eos>": "[EOS]", "<unk>": "[UNK]"}


def permuted_teacher(teacher_dir: Path, out: Path, seed: int = 0) -> Path:
    """Teacher A's weights behind a tokenizer with other ids and other special names."""
    tok = load_tokenizer(str(teacher_dir))
    vocab = tok.get_vocab()
    old_ids = sorted(vocab.values())
    new_ids = old_ids[:]
    random.Random(seed).shuffle(new_ids)
    remap = dict(zip(old_ids, new_ids, strict=True))  # old id -> new id
    by_id = {i: t for t, i in vocab.items()}
    new_vocab = {RENAMED.get(by_id[o], by_id[o]): remap[o] for o in old_ids}
    core = Tokenizer(models.WordLevel(vocab=new_vocab, unk_token=RENAMED.get(tok.unk_token)))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    new_tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=RENAMED[tok.pad_token],
        eos_token=RENAMED[tok.eos_token],
        unk_token=RENAMED[tok.unk_token],
    )
    model = AutoModelForCausalLM.from_pretrained(teacher_dir)
    order = torch.tensor([o for o, _ in sorted(remap.items(), key=lambda kv: kv[1])])
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.copy_(emb[order].clone())
        head = model.get_output_embeddings().weight
        if head.data_ptr() != emb.data_ptr():
            head.copy_(head[order].clone())
    model.config.pad_token_id = new_tok.pad_token_id
    model.config.eos_token_id = new_tok.eos_token_id
    model.save_pretrained(out)
    new_tok.save_pretrained(out)
    return out


def merged_tokenizer() -> PreTrainedTokenizerFast:
    """Characters, plus one token for each step label or answer mark with its digit."""
    pairs = [f"{c}{d}" for c in string.ascii_lowercase + "#" for d in string.digits]
    specials = list(RENAMED.values())
    vocab = {t: i for i, t in enumerate(dict.fromkeys(specials + list(DEFAULT_CHARS) + pairs))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[a-z#][0-9]|[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]"
    )


def _pair(tok, example: dict, rng: random.Random | None):
    """(prompt ids, completion ids + EOS, loss mask): a corrupted step's token is context only."""
    completion, wrong = (example["completion"], []) if rng is None else corrupt(example, rng)
    enc = tok(completion, add_special_tokens=False, return_offsets_mapping=True)
    mask = [not any(s <= w < e for w in wrong) for s, e in enc["offset_mapping"]]
    ids = [*enc["input_ids"], tok.eos_token_id]
    prompt = tok(example["prompt"], add_special_tokens=False)["input_ids"]
    return prompt, ids, [*mask, True]


def lr_at(lr: float, step: int, steps: int) -> float:
    """The demo recipe's schedule: linear warm-up over 5% of the steps, then cosine to 10%."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return lr * ((step + 1) / warmup)
    frac = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))


def train_merged(tok, spec, examples, dev, max_new: int, seed: int, log=print):
    """The demo's recipe (`opd.cli.demo.pretrain.pretrain_causal_lm`) in `tok`'s tokens."""
    model = _new_model(tok, spec, seed)
    clean = [_pair(tok, e, None) for e in examples]
    gen, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01, betas=(0.9, 0.98))
    model.train()
    for step in range(spec.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(spec.lr, step, spec.steps)
        idx = torch.randint(len(clean), (spec.batch_size,), generator=gen).tolist()
        pairs = [
            _pair(tok, examples[i], rng) if rng.random() < spec.corrupt_prob else clean[i]
            for i in idx
        ]
        loss = completion_nll(model, *collate_right_padded(pairs, tok.pad_token_id))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        done = step + 1
        if spec.target_accuracy is not None and done >= spec.min_steps and done % spec.check_every == 0:
            model.eval()
            acc = greedy_accuracy(model, tok, dev, max_new)
            model.train()
            log(json.dumps({"merged_teacher_step": done, "dev_accuracy": acc}))
            if acc >= spec.target_accuracy:
                break
    return model.eval(), done


def merged_teacher(
    out: Path, build: BuildConfig, seed: int = 0, stop: bool = True, log=print, tokenizer=None,
    steps: int | None = None,
) -> tuple[Path, dict]:
    """The merged-tokenizer teacher (module doc) of the demo build `build` (its teacher's
    spec: architecture, recipe, stopping rule; its data sizes), trained once into `out`
    (rebuilt when `build` or `seed` changes); its meta. `tokenizer`: the same training in
    another tokenizer (the student's, for a control). `stop=False`: no early stop, all of
    the spec's steps (its whole cosine schedule), for a teacher as skilled as A where the
    stopping rule leaves it weaker. `steps`: that many steps instead of the spec's (with
    `stop=False`), for a merged teacher as skilled as A_long (the merged tokenizer takes
    longer to learn)."""
    key = config_hash(build, seed) + ("" if stop else "-all-steps") + ("-own" if tokenizer else "")
    spec = build.teacher if stop else replace(build.teacher, target_accuracy=None)
    if steps is not None:
        key, spec = f"{key}-{steps}-steps", replace(spec, steps=steps)
    meta_file = out / "meta.json"
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        if meta.get("build_hash") == key:
            return out, meta
    tok = tokenizer or merged_tokenizer()  # another: the same recipe in its tokens
    train = make_examples(build.num_train, seed, "train", build.task)
    dev = make_examples(build.num_dev, seed, "dev", build.task)
    evals = make_examples(build.num_eval, seed, "eval", build.task)
    model, steps = train_merged(tok, spec, train, dev, build.max_new_tokens, seed * 2 + 1, log)
    acc = greedy_accuracy(model, tok, evals, build.max_new_tokens)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    meta = {"steps": steps, "eval_accuracy": acc, "params": sum(p.numel() for p in model.parameters()),
            "build_hash": key}  # fmt: skip
    meta_file.write_text(json.dumps(meta))
    return out, meta
