"""Sampling completions from a causal LM: one `sample()` over engines.

Engines (`sampling.engine`):
  `auto`  the default: `lean` for the architectures it supports once its start-up check
          passes; `hf` for every other model, and for a model whose check fails (logged);
  `hf`    the reference sampler (`reference`): the model's own Hugging Face forward with a
          `DynamicCache`, one token per step;
  `lean`  the fast sampler (`fast`): the same tokens and log q on a static KV cache
          through `opd.modeling.lean`'s hand-written decoder, for the architectures it
          supports (others get `hf`), checked against the HF forward on its first batch
          (a mismatch stops the run). `cuda_graphs=True` replays its decode steps as a CUDA
          graph on CUDA.
Both draw tokens with `draw.draw_tokens` and stop on EOS or a stop string (`stops`), and
record log q of each sampled token under the distribution actually sampled from.
  `vllm`  a colocated vLLM engine (`vllm.VllmSampler`, `pip install 'opd[vllm]'`) that holds
          its own copy of the student, kept current by a weight push after every optimizer
          step; the loop calls it directly (`opd.run.sources`), not through `sample()`.
"""

from __future__ import annotations

from opd.modeling.lean_check import LeanMismatch, fall_back, lean_applies
from opd.sampling.fast import sample_fast
from opd.sampling.reference import Rollout
from opd.sampling.reference import sample as sample_hf

ENGINES = ("auto", "hf", "lean")


def sample(
    model, prompts: list[list[int]], *, engine: str = "hf", cuda_graphs: bool = False, **kwargs
) -> Rollout:
    """Sample one completion per prompt with `engine` (keywords of `reference.sample`)."""
    if engine not in ENGINES:
        raise ValueError(f"sampling.engine={engine!r} is not one of {ENGINES}")
    if lean_applies(model, engine):
        try:
            return sample_fast(model, prompts, static=cuda_graphs, **kwargs)
        except LeanMismatch as err:  # raised by the check, before any token is drawn
            fall_back(model, engine, err)  # `lean` by name: re-raised
    return sample_hf(model, prompts, **kwargs)


__all__ = ["ENGINES", "Rollout", "sample"]
