"""How noisy is the sampled-token reverse-KL gradient? Cosine with the full-vocabulary one.

    python benchmarks/pg_gradient_noise.py --models ~/.cache/opd/cli/demo/models-<hash>

On the same student samples, computes the gradient of the full-vocabulary reverse KL
(`minillm_like`'s loss) and of the policy-gradient loss with the sampled-token advantage
(`on_policy`'s loss, Thinking Machines' estimator), and prints their cosine similarity
for several batch sizes. In expectation the two agree (tests/losses check this); the
cosine shows how far one batch is from that expectation.
"""

from __future__ import annotations

import argparse

import torch

from opd.cli.demo.task import make_examples
from opd.data.batch import assemble
from opd.losses import distill_advantages, masked_sum, policy_gradient_loss, token_divergence
from opd.modeling.hf import completion_logits, load_causal_lm, load_tokenizer, token_logprobs
from opd.sampling.reference import sample


def flat_grad(model, loss: torch.Tensor) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", required=True, help="a demo build folder (student/, teacher/)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128, 256])
    parser.add_argument("--max-new-tokens", type=int, default=72)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    tok = load_tokenizer(f"{args.models}/student")
    student = load_causal_lm(f"{args.models}/student")
    teacher = load_causal_lm(f"{args.models}/teacher").eval()
    vocab = len(tok)
    rows = make_examples(max(args.batch_sizes), args.seed, "train")
    prompts = [tok(r["prompt"], add_special_tokens=False)["input_ids"] for r in rows]
    print("| sequences | cosine(pg, full reverse KL) | norm pg | norm full |")
    print("|---:|---:|---:|---:|")
    for n in args.batch_sizes:
        gen = torch.Generator().manual_seed(args.seed)
        out = sample(
            student,
            prompts[:n],
            max_new_tokens=args.max_new_tokens,
            eos_id=tok.eos_token_id,
            pad_id=tok.pad_token_id,
            vocab_size=vocab,
            temperature=1.0,
            generator=gen,
        )
        batch = assemble(prompts[:n], out.completions, pad_id=tok.pad_token_id)
        mask = batch.loss_mask()
        count = mask.sum()
        with torch.no_grad():
            t_logits = completion_logits(teacher, batch, vocab)
        s_logits = completion_logits(student, batch, vocab)
        full = masked_sum(token_divergence(s_logits, t_logits, "reverse_kl"), mask) / count
        g_full = flat_grad(student, full)
        s_lp = token_logprobs(completion_logits(student, batch, vocab), batch.completion_ids())
        t_lp = token_logprobs(t_logits, batch.completion_ids())
        pg = policy_gradient_loss(s_lp, distill_advantages(s_lp, t_lp, mask))
        g_pg = flat_grad(student, masked_sum(pg, mask) / count)
        cos = torch.nn.functional.cosine_similarity(g_full, g_pg, dim=0)
        print(f"| {n} | {cos:.3f} | {g_pg.norm():.3f} | {g_full.norm():.3f} |")


if __name__ == "__main__":
    main()
