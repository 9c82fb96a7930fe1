"""One sampling draw per decode step: `torch.multinomial` against `opd.sampling.draw.draw_tokens`.

    python benchmarks/sampling_draw.py                  # B = 32, V = 49, 32,000, 151,936
    python benchmarks/sampling_draw.py --batch 8 --vocab 151936 --threads 1

`torch.multinomial(p, 1)` (what Hugging Face `generate`, and so TRL, calls) draws a
`[B, V]` Exp(1) noise tensor and takes `argmax(p / noise)`; on a CPU the noise is drawn
serially. `draw_tokens` takes one uniform per row and inverts the CDF with two float64
prefix sums (over blocks, then inside the chosen block). Both are exact samplers of the
same distribution; this prints the time per draw of each on `[B, V]` probabilities, and,
as a check that the fast one samples the right distribution, the total variation between
its empirical frequencies and `p` next to multinomial's (both should be at the Monte-Carlo
noise level for the number of draws).
"""

from __future__ import annotations

import argparse
import time

import torch

from opd.sampling.draw import draw_tokens


def best_ms(fn, repeats: int = 10) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def total_variation(tokens: torch.Tensor, p: torch.Tensor) -> float:
    freq = torch.bincount(tokens, minlength=p.numel()).double() / tokens.numel()
    return 0.5 * float((freq - p.double()).abs().sum())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--vocab", type=int, nargs="+", default=[49, 32000, 151936])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--draws", type=int, default=200_000, help="draws for the distribution check")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    print(f"B = {args.batch}, {args.threads} threads; ms per draw of B tokens (best of 10)")
    print(f"{'V':>8}{'multinomial':>13}{'draw_tokens':>13}{'speed-up':>10}")
    for V in args.vocab:
        probs = torch.softmax(2 * torch.randn(args.batch, V, generator=gen), -1)
        slow = best_ms(lambda probs=probs: torch.multinomial(probs, 1, generator=gen))
        fast = best_ms(
            lambda probs=probs: draw_tokens(
                probs, torch.rand(args.batch, generator=gen, dtype=torch.float64)
            )
        )
        print(f"{V:8d}{slow:13.3f}{fast:13.3f}{slow / fast:9.1f}x")
    V, n = 2000, args.draws
    probs = torch.softmax(2 * torch.randn(V, generator=gen), -1)
    rows = probs.expand(1000, V)
    ours = torch.cat(
        [
            draw_tokens(rows, torch.rand(1000, generator=gen, dtype=torch.float64), block=256)
            for _ in range(n // 1000)
        ]
    )
    ref = torch.cat(
        [torch.multinomial(rows, 1, generator=gen).squeeze(-1) for _ in range(n // 1000)]
    )
    print(
        f"\ndistribution check, V = {V}, {n} draws: total variation to p — draw_tokens "
        f"{total_variation(ours, probs):.4f}, multinomial {total_variation(ref, probs):.4f}"
    )


if __name__ == "__main__":
    main()
