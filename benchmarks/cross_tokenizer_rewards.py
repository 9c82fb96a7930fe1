"""Where two equally skilled teachers in different tokenizers disagree: each student
token's teacher reward half (the teacher's log-prob of the text to the token's end minus
to the previous one) from the student-tokenizer teacher `A_long` directly and from the
merged-tokenizer teacher `merged_xl` through `cross_tokenizer.boundary=marginal` (every
teacher token read), on the initial student's samples of training prompts, by kind of
student token (a step label, the digit after it, the end of turn, other).

    python benchmarks/cross_tokenizer_rewards.py --cache-dir /tmp/xtokb/cache \\
        --same /tmp/xtokb/full-k/teacher-A-long --other /tmp/xtokb/full-n/teacher-merged-xl

(`cross_tokenizer.py --runs same_long` and `--runs merged_xl` train those two teachers.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import string

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

LABELS = string.ascii_lowercase + "#"


def kind_of(tok: str, prev: str, is_end: bool) -> str:
    if is_end:
        return "end"
    if tok.isdigit():
        return "digit_after_label" if prev in LABELS and prev else "digit"
    return "label" if tok in LABELS else "other"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache-dir", required=True)
    parser.add_argument("--same", required=True, help="a teacher in the student's tokenizer")
    parser.add_argument("--other", required=True, help="a teacher in another tokenizer")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    student_dir = build_models(args.cache_dir, seed=0, config=BuildConfig.preset(quick=False))["student_dir"]
    s_tok = load_tokenizer(student_dir)
    s_enc = Encoder(s_tok, DataConfig())
    student = load_causal_lm(student_dir)
    same = LocalTeacher(load_causal_lm(args.same), len(s_tok))
    t_tok = load_tokenizer(args.other)
    other = CrossTokenizerTeacher(
        LocalTeacher(load_causal_lm(args.other), len(t_tok)), student_tokenizer=s_tok, teacher_tokenizer=t_tok,
        student_encoder=s_enc, teacher_encoder=Encoder(t_tok, DataConfig()), boundary_topk=len(t_tok),
    )  # fmt: skip
    data = make_examples(args.rows, args.seed, "train")
    p, c = sample_completions(student, s_enc, data, prompt_field="prompt", max_new_tokens=39,
                              vocab_size=len(s_tok), temperature=1.0, seed=args.seed, batch_size=512)  # fmt: skip
    batch = assemble(p, c, pad_id=s_tok.pad_token_id, source="student", rows=data)
    a = same.score(batch, "token").token_logprobs.double()
    m = other.score(batch, "token").token_logprobs.double()
    pairs: dict[str, list[tuple[float, float]]] = {}
    for b, row in enumerate(c):
        for j, tok in enumerate(row):
            prev = s_tok.convert_ids_to_tokens(row[j - 1]) if j else ""
            kind = kind_of(s_tok.convert_ids_to_tokens(tok), prev, tok == s_enc.stop_id)
            pairs.setdefault(kind, []).append((float(a[b, j]), float(m[b, j])))
    out = {}
    for kind, v in sorted(pairs.items()):
        xs, ys = [x for x, _ in v], [y for _, y in v]
        diff = [y - x for x, y in v]
        corr = torch.corrcoef(torch.tensor([xs, ys]))[0, 1].item() if len(v) > 2 else None
        out[kind] = {"n": len(v), "same_mean": round(statistics.mean(xs), 3), "other_mean": round(statistics.mean(ys), 3),
                     "other_minus_same": round(statistics.mean(diff), 3), "sd": round(statistics.pstdev(diff), 3),
                     "corr": None if corr is None else round(corr, 3)}  # fmt: skip
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
