"""The sections that say how student rollouts are drawn: `sampling` (temperature, engine,
rollout servers), `vllm` (each vLLM engine or server push) and `rollouts` (when they are
drawn relative to training). `opd.config.sections` holds the others."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from opd.config.sections import _check_choices, _in_range


@dataclass
class SamplingConfig:
    """Rollout sampling. Its temperature is never the loss temperature (`loss.kd_temperature`).

    Attributes:
        temperature: sampling temperature of student (and teacher) rollouts; 0 is greedy
        top_p: nucleus sampling mass (1: off)
        top_k: sample among the k most likely tokens (0: off)
        max_new_tokens: longest sampled completion
        n: samples per prompt in a student-sampled batch
        stop: strings that end a sampled completion (besides EOS)
        eos_token_ids: token ids that end a completion, besides the student's
            generation_config, its tokenizer's EOS and the chat template's turn end
        engine: auto (lean for the models it supports once its start-up check passes, hf
            for the others and on a failed check, logged) | hf (the reference sampler, plain
            HF forward) | vllm (a colocated vLLM engine holding the student, weights pushed
            after every optimizer step) | lean (opd.modeling.lean's Llama/Qwen decoder on a
            static KV cache, checked against hf on the first batch; a mismatch stops) |
            vllm_server (separate `vllm serve` processes at server_urls, weights pushed
            after every optimizer step through vllm.weight_sync)
        server_urls: engine=vllm_server: base URLs of the rollout servers (rank r of a
            multi-process run samples from server r mod their number)
        cuda_graphs: lean on CUDA: replay decode steps as a CUDA graph (opt-in; never yet
            checked on a GPU)
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 128
    n: int = 1
    stop: list[str] = field(default_factory=list)
    engine: Literal["auto", "hf", "lean", "vllm", "vllm_server"] = "auto"
    server_urls: list[str] = field(default_factory=list)
    cuda_graphs: bool = False
    eos_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self):
        _check_choices(self)
        _in_range("sampling.temperature", self.temperature, 0.0)
        _in_range("sampling.top_p", self.top_p, 0.0, 1.0, lo_open=True)
        _in_range("sampling.top_k", self.top_k, 0)
        _in_range("sampling.max_new_tokens", self.max_new_tokens, 1)
        _in_range("sampling.n", self.n, 1)
        for i, token_id in enumerate(self.eos_token_ids):
            if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
                raise ValueError(
                    f"sampling.eos_token_ids[{i}]={token_id!r} must be a token id (int >= 0)"
                )
        if (self.engine == "vllm_server") != bool(self.server_urls):
            raise ValueError(
                "sampling.engine=vllm_server samples from the servers at sampling.server_urls "
                "(both or neither): set sampling.server_urls=[http://host:port, ...]"
                if self.engine == "vllm_server"
                else f"sampling.server_urls is used by sampling.engine=vllm_server only, "
                f"not {self.engine!r}"
            )


@dataclass
class VllmConfig:
    """Each vLLM engine a run starts (sampling.engine=vllm, teacher.kind=vllm).

    Attributes:
        gpu_memory_utilization: GPU: share of its memory each engine may hold
        kv_cache_gb: KV cache per engine in GiB; 0: sized by gpu_memory_utilization on GPU,
            1 GiB on CPU (where vLLM's share would mean a share of all RAM)
        weight_sync: sampling.engine=vllm_server: how new weights reach the servers:
            filesystem (safetensors written atomically under weights_dir, each server told
            to reload them; servers must see that directory) | nccl (vLLM's NCCL weight
            transfer; GPU, servers started with --weight-transfer-config)
        weights_dir: weight_sync=filesystem: where pushed weights are written ('':
            output_dir/rollout_weights)
        server_timeout_s: sampling.engine=vllm_server: seconds per request (and per
            reload) before the run stops with its checkpoint
    """

    gpu_memory_utilization: float = 0.3
    kv_cache_gb: float = 0.0
    weight_sync: Literal["filesystem", "nccl"] = "filesystem"
    weights_dir: str = ""
    server_timeout_s: float = 300.0

    def __post_init__(self):
        _check_choices(self)
        _in_range(
            "vllm.gpu_memory_utilization", self.gpu_memory_utilization, 0.0, 1.0, lo_open=True
        )
        _in_range("vllm.kv_cache_gb", self.kv_cache_gb, 0.0)
        _in_range("vllm.server_timeout_s", self.server_timeout_s, 0.0, lo_open=True)


@dataclass
class RolloutsConfig:
    """Asynchronous rollouts: when student samples are drawn relative to training.

    (The section is `rollouts`, not `async`, a word Python reserves.)

    Attributes:
        mode: off (sample, then train, in series) | pipelined (the batch of step s is
            sampled with the weights of step s - lag: deterministic, resumable exactly) |
            queue (a producer thread samples freely; batches older than max_staleness
            versions are dropped and counted)
        lag: pipelined: k, the steps between the weights that sample and those that train
        max_staleness: queue: oldest accepted batch, in optimizer steps behind the trained
            weights
    """

    mode: Literal["off", "pipelined", "queue"] = "off"
    lag: int = 1
    max_staleness: int = 1

    def __post_init__(self):
        if self.mode is False:  # YAML 1.1 reads a bare `off` as false
            self.mode = "off"
        _check_choices(self)
        _in_range("rollouts.lag", self.lag, 0)
        _in_range("rollouts.max_staleness", self.max_staleness, 0)
