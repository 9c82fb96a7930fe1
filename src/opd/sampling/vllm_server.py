"""Student rollouts from separate `vllm serve` processes, kept current by weight pushes.

    opd train cfg.yaml sampling.engine=vllm_server sampling.server_urls=[http://127.0.0.1:8001]

Each server is vLLM's own OpenAI server, started by the user (README, "Rollout servers"):
`VLLM_SERVER_DEV_MODE=1` opens the routes a push needs, and `--logprobs-mode
processed_logprobs` makes the returned log q that of the distribution sampled from (after
temperature, top-k, top-p), as the colocated engine's. Completions are asked for one prompt
per request, each with its own seed, token ids in and out (`return_tokens_as_token_ids`).

After every optimizer step `push_weights` hands the student's weights to every server
through one of vLLM 0.32's supported paths (`vllm.weight_sync`):

* `filesystem` (the default; CPU, and any machine where the servers see a shared disk):
  the weights are written once as safetensors into a fresh directory (a temporary name,
  renamed into place: a server never reads a half-written file), then each server is told
  to reload from it (`POST /collective_rpc` with vLLM's worker method `reload_weights`
  and `weights_path`, the in-place reload the colocated engine uses) and to drop its
  prefix cache. PRIME-RL's default is this path too (its own worker extension).
* `nccl` (GPU): vLLM's NCCL weight-transfer engine (`NCCLTrainerWeightTransferEngine`
  over the `/init_weight_transfer_engine`, `/start_weight_update`, `/update_weights`,
  `/finish_weight_update` routes), the path TRL's async trainer calls; servers started
  with `--weight-transfer-config '{"backend": "nccl"}'`, one GPU worker each.

A server that stops answering while rollouts are drawn (a restart) is waited for, up to
`vllm.server_timeout_s`, and given the current weights again (filesystem pushes: the last
push directory) before the request is retried; one that stays away, or fails a push, stops
the run (`RolloutServerError`) with its checkpoint intact, and `resume=true` pushes the
checkpoint's weights first.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from opd.sampling.reference import Rollout
from opd.sampling.vllm import vllm_weights

log = logging.getLogger("opd")


class RolloutServerError(RuntimeError):
    """A rollout server failed or could not be reached; the message names it."""


class ServerUnreachable(RolloutServerError):
    """The server did not answer at all: down, or restarting."""


class VllmServerSampler:
    """Rollouts from vLLM servers; `sample` has the colocated engine's contract."""

    @classmethod
    def for_run(cls, config, student, world) -> VllmServerSampler:
        urls = list(config.sampling.server_urls)
        weights_dir = config.vllm.weights_dir or str(Path(config.output_dir) / "rollout_weights")
        sampler = cls(
            urls[world.rank % len(urls)],
            all_urls=urls if world.is_main else [],  # rank 0 alone pushes, to every server
            weight_sync=config.vllm.weight_sync,
            weights_dir=weights_dir,
            timeout_s=config.vllm.server_timeout_s,
            world=world,
        )
        sampler.push_weights(student)  # resumed weights, LoRA deltas: not what it loaded
        return sampler

    def __init__(
        self,
        url: str,
        *,
        all_urls: list[str],
        weight_sync: str = "filesystem",
        weights_dir: str,
        timeout_s: float = 300.0,
        world=None,
    ):
        import httpx

        self.url, self.all_urls = url.rstrip("/"), [u.rstrip("/") for u in all_urls]
        self.weight_sync, self.weights_dir = weight_sync, Path(weights_dir)
        self.world, self.pushes, self._nccl = world, 0, {}
        self.client = httpx.Client(timeout=timeout_s)
        self.model_name = self._get(self.url, "/v1/models")["data"][0]["id"]
        self._pool = ThreadPoolExecutor(16, thread_name_prefix="opd-vllm-server")
        self._recover_lock, self._epoch = threading.Lock(), 0

    # -- HTTP -------------------------------------------------------------------------
    def _request(self, method: str, url: str, path: str, **kw):
        import httpx

        try:
            response = self.client.request(method, url + path, **kw)
        except httpx.TransportError as err:
            raise ServerUnreachable(
                f"rollout server {url} failed on {path}: {type(err).__name__}: {err}. Is it "
                "running (see the README's `vllm serve` command)? The run's last checkpoint "
                "is intact: restart the server and resume with resume=true"
            ) from None
        except httpx.HTTPError as err:
            raise RolloutServerError(
                f"rollout server {url} failed on {path}: {type(err).__name__}: {err}. Is it "
                "running (see the README's `vllm serve` command)? The run's last checkpoint "
                "is intact: restart the server and resume with resume=true"
            ) from None
        if response.status_code == 404 and path in ("/collective_rpc", "/reset_prefix_cache"):
            raise RolloutServerError(
                f"rollout server {url} has no {path} route: start it with "
                "VLLM_SERVER_DEV_MODE=1 (weight pushes need vLLM's development routes)"
            )
        if response.status_code != 200:
            raise RolloutServerError(
                f"rollout server {url} answered {path} with HTTP {response.status_code}: "
                f"{response.text[:300]}"
            )
        return response.json() if response.content else None

    def _get(self, url: str, path: str):
        return self._request("GET", url, path)

    def _post(self, url: str, path: str, body: dict | None = None):
        return self._request("POST", url, path, json=body)

    # -- sampling -----------------------------------------------------------------------
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
        """One completion per prompt, each request with its own seed derived from `seed`."""
        seeds = np.random.default_rng(seed).integers(0, 2**31 - 1, size=len(prompts))
        base = {
            "model": self.model_name,
            "max_tokens": max_new_tokens,
            "temperature": temperature,
            "top_k": top_k or -1,
            "top_p": top_p,
            "stop_token_ids": list(eos_ids),
            "stop": list(stop) or None,
            "include_stop_str_in_output": True,
            "skip_special_tokens": False,
            "logprobs": 0,
            "return_tokens_as_token_ids": True,
        }

        def one(i: int):
            body = {**base, "prompt": list(prompts[i]), "seed": int(seeds[i])}
            epoch = self._epoch
            try:
                return self._post(self.url, "/v1/completions", body)["choices"][0]
            except ServerUnreachable:  # a restart: wait for it, give it the weights, retry
                self._recover(epoch)
                return self._post(self.url, "/v1/completions", body)["choices"][0]

        completions, logprobs, finished = [], [], []
        for choice in self._pool.map(one, range(len(prompts))):
            lp = choice["logprobs"]
            tokens = [int(t.removeprefix("token_id:")) for t in lp["tokens"]]
            completions.append(tokens)
            if temperature > 0:
                logprobs.append([float(x) for x in lp["token_logprobs"]])
            else:  # greedy: the policy is deterministic, log q = 0 as in the built-in sampler
                logprobs.append([0.0] * len(tokens))
            finished.append(choice["finish_reason"] == "stop")
        return Rollout(completions=completions, logprobs=logprobs, finished=finished)

    def _recover(self, epoch: int) -> None:
        """The server stopped answering: wait (up to the request timeout) until it answers
        again, then reload the current weights into it, since a restarted server holds the
        model it loaded from disk. Once per outage (`epoch`), whichever request saw it."""
        with self._recover_lock:
            if epoch != self._epoch:
                return  # another request already waited for it and reloaded
            deadline = time.monotonic() + self.client.timeout.read
            while True:
                try:
                    self._get(self.url, "/v1/models")
                    break
                except ServerUnreachable:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(1.0)
            if self.pushes and self.weight_sync == "filesystem":
                current = self.weights_dir / f"push-{self.pushes - 1:07d}"
                reload = {"method": "reload_weights", "kwargs": {"weights_path": str(current)}}
                self._post(self.url, "/collective_rpc", reload)
                self._post(self.url, "/reset_prefix_cache")
            elif self.pushes:
                raise RolloutServerError(
                    f"rollout server {self.url} restarted; with vllm.weight_sync=nccl its weights "
                    "cannot be sent again mid-step. Resume with resume=true"
                )
            self._epoch += 1
            log.warning(
                "rollout server %s answered again; push %d reloaded", self.url, self.pushes - 1
            )

    # -- weight pushes --------------------------------------------------------------------
    @torch.no_grad()
    def push_weights(self, model) -> None:
        """The student's current weights into every server (rank 0 sends; every rank
        waits for it, so no rank samples before the push took effect)."""
        if self.all_urls:
            if self.weight_sync == "nccl":
                self._push_nccl(model)
            else:
                self._push_files(model)
        if self.world is not None:
            self.world.barrier()
        self.pushes += 1

    def _push_files(self, model) -> None:
        weights = {name: t.detach().contiguous().cpu() for name, t in vllm_weights(model)}
        self.weights_dir.mkdir(parents=True, exist_ok=True)
        final = self.weights_dir / f"push-{self.pushes:07d}"
        tmp = self.weights_dir / f".tmp-push-{self.pushes:07d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(_untied(weights), str(tmp / "model.safetensors"))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for url in self.all_urls:
            kwargs = {"weights_path": str(final.resolve())}
            self._post(url, "/collective_rpc", {"method": "reload_weights", "kwargs": kwargs})
            self._post(url, "/reset_prefix_cache")
        for old in self.weights_dir.glob("push-*"):  # every server now holds `final`
            if old != final:
                shutil.rmtree(old, ignore_errors=True)

    def _push_nccl(self, model) -> None:
        for url in self.all_urls:
            if url not in self._nccl:
                self._nccl[url] = _nccl_engine(url, self.client.timeout.read)
            engine = self._nccl[url]
            engine.source.model = model
            engine.send_weights()

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self.client.close()


def _untied(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory (tied embeddings): copy the repeats."""
    seen, out = set(), {}
    for name, t in weights.items():
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        out[name] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out


def _nccl_engine(url: str, timeout: float):
    """vLLM's trainer-side NCCL engine joined to the server at `url` (one GPU worker)."""
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource
    from vllm.distributed.weight_transfer.clients import HTTPVLLMWeightSyncClient
    from vllm.distributed.weight_transfer.nccl_engine import (
        NCCLTrainerInitInfo,
        NCCLTrainerWeightTransferEngine,
    )
    from vllm.utils.network_utils import get_ip, get_open_port

    class StudentSource(WeightSource):
        """The student's weights under Hugging Face names (LoRA deltas added)."""

        model = None

        def metadata(self):
            return [ParamMeta(n, t.dtype, tuple(t.shape)) for n, t in vllm_weights(self.model)]

        def __iter__(self):
            for name, t in vllm_weights(self.model):
                yield name, t.detach().contiguous()

    info = NCCLTrainerInitInfo(
        master_address=get_ip(), master_port=get_open_port(), world_size=2, rank=0
    )
    return NCCLTrainerWeightTransferEngine.trainer_init(
        info, client=HTTPVLLMWeightSyncClient(url, timeout=timeout), source=StudentSource()
    )
