"""Multi-process training: who am I, sum across ranks, rank-0 guards, wrapping.

    torchrun --nproc_per_node 8 -m opd.cli train cfg.yaml                       # DDP
    accelerate launch --config_file examples/accelerate_fsdp.yaml -m opd.cli train examples/fsdp_8gpu.yaml

`opd train` needs no flag for this: a launcher sets `WORLD_SIZE > 1` and `init_world` starts
an `accelerate.Accelerator`, which reads the rest (DDP, or FSDP when the accelerate config
says so) from the environment. Without a launcher nothing here touches `torch.distributed`
and every helper returns its input unchanged, so single-process runs are bit-identical.

How a step is split (the loss equals the single-process loss on the same global batch):
`batch_size` is the GLOBAL number of prompts per step and `micro_batch_size` the prompts per
forward on one process. Global micro-batch `m` of a step holds `micro_batch_size * W`
consecutive prompts of `PromptOrder`; rank `r` takes slice `r` of it, and all ranks draw the
same source for it (GKD's lambda is seeded by (seed, step, micro)), so a W-process run with
`micro_batch_size=m` sees the batches of a 1-process run with `micro_batch_size=m*W`.
Sampling seeds add the rank, so ranks sample different completions. The step's supervised
token count is summed over ranks before any backward; each rank divides its token sum by it,
and the loss is multiplied by W before `backward` because DDP and FSDP average gradients
over ranks where the single-process loss sums them.

FSDP: the student is sharded by accelerate's own `fsdp2_prepare_model` (the plugin's wrap
policy, mixed precision, resharding); `accelerator.prepare_model` refuses FSDP2 without an
optimizer, and opd builds its optimizer after wrapping. On CPU accelerate (1.15) never turns
FSDP on (`state.py` sets `DistributedType.FSDP` for MULTI_GPU/NPU/XPU/..., not MULTI_CPU),
so opd builds the plugin accelerate would have built from the same `FSDP_*` environment
and shards with it: CPU tests run the GPU code path over gloo. FSDP1 (`fsdp_version: 1`)
goes through `accelerator.prepare_model` on GPUs and needs `use_orig_params`.
"""

from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch

log = logging.getLogger("opd")


def _fsdp_classes() -> tuple[type, ...]:
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return (FSDPModule, FullyShardedDataParallel)


def is_sharded(model) -> bool:
    return isinstance(model, _fsdp_classes())


def shard_model(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2 in place: each transformer block (HF `_no_split_modules`) and the root."""
    from torch.distributed.fsdp import fully_shard

    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module)
    fully_shard(model)
    return model


def _clean_fqn(name: str) -> str:
    """Parameter names as `torch.distributed.checkpoint` writes them (FSDP1 adds wrappers)."""
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


def exit_rank(code: int) -> None:
    """A rank of a multi-process run ends here, skipping interpreter teardown: FSDP's device
    mesh and DDP's reducer keep the gloo group alive past `destroy_process_group`, and when
    finalization frees it while a gloo worker still holds a tensor, the rank aborts (SIGABRT,
    "terminate called without an active exception") after a finished run
    (pytorch/pytorch#179291). Output is flushed first; the run has nothing left to write."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import sys

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@dataclass
class World:
    """This process's place in the run. `World()` is the single-process run."""

    rank: int = 0
    size: int = 1
    device: torch.device | None = None
    accelerator: object | None = None
    kind: str = "single"  # single | ddp | fsdp (student sharded)

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.kind == "fsdp"

    # --- the step's split -------------------------------------------------------------
    def accumulation(self, config) -> int:
        """Micro-batches per step on each process."""
        if not self.distributed:
            return config.accumulation
        per_micro = config.micro_batch_size * self.size
        if config.batch_size % per_micro:
            raise ValueError(
                f"batch_size={config.batch_size} (global prompts per step) must be a multiple "
                f"of micro_batch_size x processes = {config.micro_batch_size} x {self.size}"
            )
        return config.batch_size // per_micro

    # --- collectives (identity in a single process) -------------------------------------
    def sum_all(self, values: list) -> list:
        """Each value summed over ranks (one all-reduce); ints stay ints (exact to 2**53)."""
        if not self.distributed:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return [
            round(x) if isinstance(v, int) and not isinstance(v, bool) else x
            for v, x in zip(values, t.tolist(), strict=True)
        ]

    def max_all(self, values: list) -> list:
        """Each value's maximum over ranks (one all-reduce)."""
        if not self.distributed:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def gather(self, value) -> list:
        """Every rank's `value` (a tree of tensors and plain values), in rank order."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        out = [None] * self.size
        dist.all_gather_object(out, value)
        return out

    def sum(self, value):
        return self.sum_all([value])[0] if self.distributed else value

    def all_finished(self, done: bool) -> bool:
        """True when every rank is done (sampling with a sharded model runs in lock-step)."""
        return self.sum(0 if done else 1) == 0

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        """End the process group once every rank is done. Left to interpreter exit, gloo's
        threads can be torn down while still joinable and abort one rank ("terminate called
        without an active exception", exit -6) after a run that finished."""
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.barrier()
                dist.destroy_process_group()

    # --- the student ------------------------------------------------------------------
    def wrap_student(self, model):
        """DDP or FSDP around the student (single process: the model itself)."""
        if not self.distributed:
            return model
        if self.kind == "fsdp" and self.accelerator.state.fsdp_plugin.fsdp_version == 2:
            from accelerate.utils import fsdp2_prepare_model

            model = fsdp2_prepare_model(self.accelerator, model)
            units = sum(isinstance(m, _fsdp_classes()) for m in model.modules())
            log.info("student sharded over %d processes in %d FSDP units", self.size, units)
            return model
        return self.accelerator.prepare_model(model)  # DDP, or FSDP1

    def unwrap(self, model):
        if not self.distributed:
            return model
        return self.accelerator.unwrap_model(model)

    def sampling_model(self, model):
        """The module to sample or evaluate with. DDP: the inner module (its forwards run no
        collectives, so ranks may stop at different lengths). Sharded: the model itself,
        whose forwards all-gather weights, so callers pass `lockstep(model)` to `sample`."""
        return model if is_sharded(model) else self.unwrap(model)

    def lockstep(self, model):
        """`all_finished` for `opd.sampling.reference.sample` when `model` is sharded, else None."""
        return self.all_finished if self.distributed and is_sharded(model) else None

    def grad_sync(self, model, last: bool):
        """DDP: all-reduce gradients only on the step's last micro-batch."""
        if self.kind == "ddp" and not last:
            return model.no_sync()
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        # DDP/FSDP average gradients over ranks; the step loss is their sum (module doc).
        (loss * self.size if self.distributed else loss).backward()

    def clip_grad_norm(self, model, params, max_norm: float) -> float:
        if self.sharded:
            from torch.distributed.fsdp import FullyShardedDataParallel

            if isinstance(model, FullyShardedDataParallel):  # FSDP1 (fsdp_version: 1)
                return float(model.clip_grad_norm_(max_norm))
        # torch's clip_grad_norm_ in its two halves, the second only when it changes anything:
        # it scales every gradient by min(1, coef) even at 1, a read and write of all of them
        # (a 0.6B float32 student: 5 GB of traffic a step). Same bits either way.
        # FSDP2: gradients are DTensors and the norm is reduced over ranks.
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        full = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        coef = float(max_norm / (full + 1e-6))  # torch's coefficient, in the norm's dtype
        if not coef >= 1.0:  # over the limit, or not finite (torch then scales by NaN too)
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return float(full)

    # --- checkpoints: full state on rank 0, loadable by a run of any world size ---------
    def model_state(self, model) -> dict | None:
        """Full weights for `save_pretrained` when sharded (collective; {} off rank 0);
        None otherwise (the unwrapped model's own state dict is complete)."""
        if not self.sharded:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=options)

    def _param_names(self, model, optimizer) -> list[str]:
        names = {id(p): _clean_fqn(n) for n, p in model.named_parameters()}
        return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]

    def optimizer_state(self, model, optimizer) -> dict | None:
        """`optimizer.state_dict()` in plain torch form (int-keyed, full tensors), so a
        checkpoint resumes under any world size; sharded: gathered (collective), None off
        rank 0."""
        if not self.sharded:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = get_optimizer_state_dict(model, optimizer, options=options)
        if not self.is_main:
            return None
        index = {name: i for i, name in enumerate(self._param_names(model, optimizer))}
        return {
            "state": {index[k]: v for k, v in full["state"].items()},
            "param_groups": [
                {**g, "params": [index[n] for n in g["params"]]} for g in full["param_groups"]
            ],
        }

    def load_optimizer_state(self, model, optimizer, state: dict) -> None:
        if not self.sharded:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        names = self._param_names(model, optimizer)
        by_name = {
            "state": {names[i]: v for i, v in state["state"].items()},
            "param_groups": [
                {**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]
            ],
        }
        options = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(model, optimizer, by_name, options=options)

    # --- the teacher ------------------------------------------------------------------
    def place_teacher(self, teacher, shard: bool):
        """A local teacher is replicated (one eval-mode copy per rank) unless `teacher.shard`:
        then its weights are sharded over the ranks with FSDP2 (forwards all-gather them)."""
        if not (shard and self.distributed):
            if shard:
                log.info("teacher.shard has no effect in a single-process run")
            return teacher
        model = getattr(teacher, "model", None)
        if model is None:
            raise ValueError("teacher.shard needs a local teacher model (teacher.kind=local)")
        shard_model(model)
        return teacher


class NullMetricsLog:
    """What ranks other than 0 log to: nothing."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def aggregate_step(world: World, record: dict) -> dict:
    """A step's JSONL record over all ranks: counts and normalized terms are summed, the
    mean reward weighted by samples. `loss`, `divergence` and `tokens` arrive global."""
    if not world.distributed:
        return record
    summed = [
        k
        for k in (
            "student_tokens_generated",
            "teacher_tokens_generated",
            "teacher_tokens_scored",
            "sequences_from_student",
            "sequences_from_teacher",
            "sequences_from_dataset",
            "reward_term",
            "distill_term",
            "reward_samples",
        )
        if k in record
    ]
    weighted = "reward_mean" in record
    local_reward = (record.get("reward_mean") or 0.0) * record.get("reward_samples", 0)
    values = world.sum_all([*(record[k] for k in summed), local_reward])
    out = {**record, **dict(zip(summed, values[: len(summed)], strict=True))}
    if weighted:
        n = out["reward_samples"]
        out["reward_mean"] = values[len(summed)] / n if n else None
    return out


def init_world(config) -> World:
    """The single-process `World()` unless launched with WORLD_SIZE > 1 (torchrun, accelerate
    launch); then an `accelerate.Accelerator` starts the process group."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    # cpu=True is what makes accelerate start gloo on a machine without GPUs (else it
    # silently runs W unconnected single-process copies).
    acc = Accelerator(cpu=config.device == "cpu" or not torch.cuda.is_available())
    if acc.num_processes != size:
        raise RuntimeError(
            f"WORLD_SIZE={size} but accelerate set up {acc.num_processes} process(es)"
        )
    want_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    kind = "fsdp" if acc.distributed_type == DistributedType.FSDP or want_fsdp else "ddp"
    if kind == "fsdp" and getattr(acc.state, "fsdp_plugin", None) is None:
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* environment (module doc)
        if plugin.fsdp_version != 2:
            raise ValueError("FSDP without GPUs needs FSDP2: accelerate launch --fsdp_version 2")
        acc.state.fsdp_plugin = plugin
    plugin = getattr(acc.state, "fsdp_plugin", None)
    if kind == "fsdp" and plugin.fsdp_version == 1 and not plugin.use_orig_params:
        raise ValueError("FSDP1 needs fsdp_use_orig_params: true (or use fsdp_version: 2)")
    if not acc.is_main_process:
        log.setLevel(logging.WARNING)
    world = World(acc.process_index, size, acc.device, acc, kind)
    if world.is_main:
        log.info("%d processes, %s student on %s", size, kind.upper(), acc.device.type)
    return world
