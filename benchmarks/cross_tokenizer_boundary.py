"""Why kd from `cross_tokenizer.py`'s merged teacher collapses the student: the teacher's
distribution at a one-to-one position right after a token that could have merged with the
next text (a standalone label `o`, where `o7` is one teacher token) is conditioned on the
boundary its tokenizer put there, which it puts only when no digit follows.

    python benchmarks/cross_tokenizer_boundary.py --out /tmp/xtokb/full   # after a run there

For the student's samples of the training prompts: where kd trains (one-to-one positions,
by what the student wrote there) and its per-position reverse KL to the mapped teacher
distribution; then, at positions whose teacher prefix ends in a standalone label or `#`,
three numbers: the mapped teacher's P(a digit comes next), the student's, and the
teacher's own probability that a digit follows that label, read one token earlier at the
boundary every continuation shares (its merged tokens `o0`..`o9` against `o` alone); and
pg's span rewards at a standalone label's span (the teacher's rare `o` alone) and at the span
after it, whose first student token is the choice that made the label stand alone; and the
per-token rewards `cross_tokenizer.boundary=marginal` gives there instead (the label, the
token after it; a label and its digit inside the teacher's `o7`). `label_alone`'s `n` is
how many standalone labels the student wrote in those rows.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import string
from pathlib import Path

import torch

from opd.cli.demo.build import BuildConfig, build_models
from opd.cli.demo.task import make_examples
from opd.config.sections import DataConfig
from opd.data.batch import assemble
from opd.data.encoding import Encoder
from opd.evaluation.generation import sample_completions
from opd.modeling.hf import load_causal_lm, load_tokenizer
from opd.teachers.cross_tokenizer.teacher import CrossTokenizerTeacher
from opd.teachers.local import LocalTeacher


def probe(student_dir, teacher_dir, rows: int, seed: int) -> dict:
    s_tok, t_tok = load_tokenizer(str(student_dir)), load_tokenizer(str(teacher_dir))
    s_enc, t_enc = Encoder(s_tok, DataConfig()), Encoder(t_tok, DataConfig())
    student, t_model = load_causal_lm(str(student_dir)), load_causal_lm(str(teacher_dir))
    cross = CrossTokenizerTeacher(
        LocalTeacher(t_model, len(t_tok)), student_tokenizer=s_tok, teacher_tokenizer=t_tok,
        student_encoder=s_enc, teacher_encoder=t_enc,
    )  # fmt: skip
    data = make_examples(rows, seed, "train")
    p, c = sample_completions(student, s_enc, data, prompt_field="prompt", max_new_tokens=39,
                              vocab_size=len(s_tok), temperature=1.0, seed=seed, batch_size=512)  # fmt: skip
    batch = assemble(p, c, pad_id=s_tok.pad_token_id, source="student", rows=data)
    mapped = cross.score(batch, "logits")
    P = batch.prompt_width
    with torch.no_grad():
        out = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    s_p = torch.softmax(out.logits[:, P - 1 : -1].double(), -1)
    tbatch, arows = cross.teacher_batch(batch)
    t_p = torch.softmax(cross.inner.score(tbatch, "logits", 0).logits.double(), -1)
    digits = [s_tok.convert_tokens_to_ids(str(d)) for d in range(10)]
    t_vocab = t_tok.get_vocab()
    kinds, rkl, leak = collections.Counter(), collections.defaultdict(list), []
    for b, row in enumerate(arows):
        for sp in row.alignment.spans:
            if not sp.one_to_one:
                continue
            j, t0 = sp.s0, sp.t0
            ok = mapped.topk_ids[b, j] >= 0
            ids, q = mapped.topk_ids[b, j][ok], mapped.topk_logprobs[b, j][ok].double().exp()
            s_on = s_p[b, j][ids]
            wrote = s_tok.convert_ids_to_tokens(c[b][j])
            kind = "end" if c[b][j] == s_enc.stop_id else "digit" if wrote.isdigit() else "other"
            kinds[kind] += 1
            rkl[kind].append(float((s_on * (s_on.clamp_min(1e-30) / q.clamp_min(1e-30)).log()).sum()))
            prev = t_tok.convert_ids_to_tokens(row.teacher_ids[t0 - 1]) if t0 > 0 else ""
            if len(prev) == 1 and (prev in string.ascii_lowercase or prev == "#"):
                at = dict(zip(ids.tolist(), q.tolist(), strict=True))
                before = t_p[b, t0 - 1]
                merged = sum(float(before[t_vocab[prev + str(d)]]) for d in range(10))
                alone = float(before[row.teacher_ids[t0 - 1]])
                leak.append((sum(at.get(d, 0.0) for d in digits), float(s_p[b, j][digits].sum()),
                             merged / (merged + alone)))  # fmt: skip
    # pg's span rewards (log p_T(span) - log p_S(span)) at a standalone label's span and at
    # the span after it, whose first student token is what made the label stand alone
    token = cross.score(batch, "token")
    marginal = CrossTokenizerTeacher(
        LocalTeacher(t_model, len(t_tok)), student_tokenizer=s_tok, teacher_tokenizer=t_tok,
        student_encoder=s_enc, teacher_encoder=t_enc, boundary_topk=16,
    ).score(batch, "token")  # fmt: skip
    s_lp = torch.log(s_p.gather(-1, batch.input_ids[:, P:, None]).squeeze(-1))
    rewards = {"label_alone": [], "next": [], "label_with_digit": []}
    # boundary=marginal: one reward per student token (the label; the next span's first token)
    per_token = {"label_alone": [], "next_first_token": [], "label_before_digit": [], "digit_after_label": []}
    for b, row in enumerate(arows):
        spans = [sp for sp in row.alignment.spans if sp.two_sided]
        for k, sp in enumerate(spans):
            text = t_tok.convert_ids_to_tokens(row.teacher_ids[sp.t0]) if sp.t1 == sp.t0 + 1 else ""
            reward = float(token.token_logprobs[b, sp.s1 - 1]) - float(s_lp[b, sp.s0 : sp.s1].sum())
            mine = lambda k, b=b: float(marginal.token_logprobs[b, k]) - float(s_lp[b, k])  # noqa: E731
            if len(text) == 2 and text[0] in string.ascii_lowercase and text[1].isdigit():
                rewards["label_with_digit"].append(reward)
                if sp.s1 - sp.s0 == 2:
                    per_token["label_before_digit"].append(mine(sp.s0))
                    per_token["digit_after_label"].append(mine(sp.s0 + 1))
            elif len(text) == 1 and text in string.ascii_lowercase:
                rewards["label_alone"].append(reward)
                per_token["label_alone"].append(mine(sp.s0))
                if k + 1 < len(spans):
                    nxt = spans[k + 1]
                    per_token["next_first_token"].append(mine(nxt.s0))
                    rewards["next"].append(float(token.token_logprobs[b, nxt.s1 - 1])
                                           - float(s_lp[b, nxt.s0 : nxt.s1].sum()))  # fmt: skip
    tokens = sum(len(x) for x in c)
    mean = lambda xs: round(statistics.mean(xs), 4) if xs else None  # noqa: E731
    return {
        "completion_tokens": tokens,
        "one_to_one_by_what_the_student_wrote": dict(kinds),
        "reverse_kl_by_kind": {k: mean(v) for k, v in rkl.items()},
        "pg_span_rewards": {k: {"n": len(v), "mean": mean(v)} for k, v in rewards.items()},
        "pg_marginal_token_rewards": {k: {"n": len(v), "mean": mean(v)} for k, v in per_token.items()},
        "after_a_standalone_label": {
            "positions": len(leak),
            "mapped_teacher_p_digit_next": mean([x[0] for x in leak]),
            "student_p_digit_next": mean([x[1] for x in leak]),
            "teacher_p_digit_follows_read_one_token_earlier": mean([x[2] for x in leak]),
        },
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="a cross_tokenizer.py --out directory")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "opd" / "demo"))
    parser.add_argument("--students", nargs="*", default=[],
                        help="trained students (checkpoint dirs) to probe beside the initial one")  # fmt: skip
    parser.add_argument("--teacher", default="teacher-merged", help="a teacher folder in --out")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    models_ = build_models(args.cache_dir, seed=0, config=BuildConfig.preset(quick=False))
    teacher = Path(args.out) / args.teacher
    for student in [models_["student_dir"], *args.students]:
        print(json.dumps({"student": str(student), **probe(student, teacher, args.rows, args.seed)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
