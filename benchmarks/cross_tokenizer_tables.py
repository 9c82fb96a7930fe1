"""What the boundary rule (`cross_tokenizer.boundary=marginal`) costs to set up at real
vocabulary sizes: `BoundaryMarginal`'s byte tables built for two random byte-level
vocabularies of Qwen's (151,936) and Llama 3's (128,256) sizes (token lengths ~ 1 + an
exponential of mean 5 bytes, capped at 16). Once per run; the per-step cost is in
`cross_tokenizer.py`'s step times.

    python benchmarks/cross_tokenizer_tables.py
"""

from __future__ import annotations

import random
import resource
import time

from opd.teachers.cross_tokenizer.align import ByteTable
from opd.teachers.cross_tokenizer.boundary import BoundaryMarginal

ALPHABET = b"abcdefghijklmnopqrstuvwxyz ETAOINSHRDLU0123456789.,"


def random_table(size: int, rng: random.Random) -> ByteTable:
    pieces: set[bytes] = set()
    while len(pieces) < size:
        n = min(16, max(1, int(rng.expovariate(1 / 5))))
        pieces.add(bytes(rng.choice(ALPHABET) for _ in range(n)))
    return ByteTable(tuple(sorted(pieces)), "byte_level")


def main() -> int:
    rng = random.Random(0)
    student, teacher = random_table(151_936, rng), random_table(128_256, rng)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    BoundaryMarginal(student, teacher)
    seconds = time.perf_counter() - start
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(f"BoundaryMarginal, student V=151,936, teacher V=128,256: {seconds:.2f} s, peak RSS +{grown:.0f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
