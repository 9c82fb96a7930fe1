"""`sampling.engine: vllm_server` against a real vLLM OpenAI server process on 127.0.0.1:
a weight push takes effect (the server's log q equals the updated student's), a skipped
push shows in `sampler_logprob_gap`, pipelined rollouts overlap it, and a server that goes
away stops the run with a message naming it and its checkpoint intact.

The server is vLLM's own, started as the README says (`VLLM_SERVER_DEV_MODE=1`,
`--logprobs-mode processed_logprobs`), once for this module (~30-60 s on 2 cores).
"""

import os
import re
import subprocess
import sys

import pytest
import torch

from opd.config import config_from_dict
from opd.data.batch import assemble
from opd.modeling.hf import load_causal_lm
from opd.run.checkpoint import latest_checkpoint
from opd.run.loop import train
from opd.run.metrics import read_metrics
from opd.run.rollouts import sampler_token_stats
from opd.sampling.vllm_server import RolloutServerError, VllmServerSampler
from test_vllm_train import config
from vllm_util import free_port, stop_server, vllm_or_skip, wait_for_server

vllm_or_skip()

START_TIMEOUT_S = 400
GAP = 1e-3  # float32 on both sides: the CPU kernels agree to ~1e-5


def serve_command(model, port: int) -> list[str]:
    """The README's `vllm serve` command for a rollout server, on 127.0.0.1 only."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--dtype", "float32"]
    cmd += ["--max-model-len", "128", "--logprobs-mode", "processed_logprobs"]
    cmd += ["--kv-cache-memory-bytes", str(1 << 28), "--compilation-config", '{"mode": 0}']
    return cmd


def start(model, port: int, log) -> subprocess.Popen:
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1"}
    return subprocess.Popen(
        serve_command(model, port), stdout=log, stderr=subprocess.STDOUT, env=env
    )


# The module's server process, replaced by the restart test (`restart`).
SERVER: dict = {}


@pytest.fixture(scope="module")
def server(vllm_pair, tmp_path_factory):
    port = free_port()
    log = (tmp_path_factory.mktemp("rollout_server") / "server.log").open("w")
    url = f"http://127.0.0.1:{port}"
    SERVER.update(proc=start(vllm_pair[1], port, log), model=vllm_pair[1], port=port, log=log)
    try:
        wait_for_server(SERVER["proc"], url, log.name, START_TIMEOUT_S)
        yield url
    finally:
        stop_server(SERVER["proc"])
        log.close()


def restart() -> None:
    """Stop the module's server and start it again on the same port (not waiting for it)."""
    stop_server(SERVER["proc"])
    SERVER["proc"] = start(SERVER["model"], SERVER["port"], SERVER["log"])


def server_gap(sampler, model, sampling_config) -> float:
    """Mean |log p - log q| of the server's samples under `model` (the loop's metric)."""
    prompts = [[5, 9, 12, 7], [3, 4, 5], [11, 6]] * 2
    out = sampler.sample(prompts, max_new_tokens=8, eos_ids=[1], temperature=1.0, seed=7)
    batch = assemble(
        prompts, out.completions, pad_id=0, completion_logprobs=out.logprobs, source="student"
    )
    gap, _, _, _, tokens = sampler_token_stats(model, batch, sampling_config, 10_000)
    assert tokens > 10
    return gap / tokens


def test_push_takes_effect_and_a_skipped_push_shows(server, vllm_pair, tmp_path):
    cfg = config_from_dict(config(vllm_pair, "x", tmp_path, sampling={"temperature": 1.0}))
    model = load_causal_lm(str(vllm_pair[1])).eval()
    sampler = VllmServerSampler(server, all_urls=[server], weights_dir=str(tmp_path / "w"))
    sampler.push_weights(model)
    assert server_gap(sampler, model, cfg) < GAP
    with torch.no_grad():  # as an optimizer step would
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert server_gap(sampler, model, cfg) > 10 * GAP  # not pushed yet: the gap shows it
    sampler.push_weights(model)
    assert server_gap(sampler, model, cfg) < GAP
    assert [p.name for p in (tmp_path / "w").iterdir()] == ["push-0000001"]  # older removed


def server_config(vllm_pair, addition_data, out, server, **over):
    cfg = config(vllm_pair, addition_data, out, preset="on_policy", steps=3, **over)
    cfg["sampling"].update(engine="vllm_server", server_urls=[server])
    return cfg


def test_training_pushes_every_step_and_pipelines_beside_it(
    server, vllm_pair, addition_data, tmp_path
):
    train(config_from_dict(server_config(vllm_pair, addition_data, tmp_path / "s", server)))
    serial = read_metrics(tmp_path / "s")
    assert all(r["sampler_logprob_gap"] < GAP for r in serial), serial
    cfg = server_config(
        vllm_pair, addition_data, tmp_path / "p", server, rollouts={"mode": "pipelined"}
    )
    train(config_from_dict(cfg))
    piped = read_metrics(tmp_path / "p")
    assert [r["staleness_max"] for r in piped] == [0, 1, 1]
    assert piped[0]["sampler_logprob_gap"] < GAP  # drawn with the weights it trains
    assert all(r["sampler_logprob_gap"] > GAP for r in piped[1:])  # one step behind


def test_queue_mode_draws_from_the_server_beside_training(
    server, vllm_pair, addition_data, tmp_path
):
    """A producer thread samples from the server; every batch carries the version that
    drew it (a push waits for the draw in progress), so its gap is 0 when it is fresh."""
    cfg = server_config(
        vllm_pair, addition_data, tmp_path, server, rollouts={"mode": "queue", "max_staleness": 1}
    )
    cfg["steps"] = 4
    train(config_from_dict(cfg))
    records = read_metrics(tmp_path)
    assert len(records) == 4
    for r in records:
        assert r["staleness_max"] <= 1 and r["dropped_samples"] % 4 == 0
        if r["staleness_max"] == 0:
            assert r["sampler_logprob_gap"] < GAP, r
        else:
            assert r["sampler_logprob_gap"] > GAP, r


def test_a_skipped_push_shows_in_the_run(server, vllm_pair, addition_data, tmp_path, monkeypatch):
    real = VllmServerSampler.push_weights

    def first_only(self, model):
        if self.pushes == 0:
            real(self, model)

    monkeypatch.setattr(VllmServerSampler, "push_weights", first_only)
    train(config_from_dict(server_config(vllm_pair, addition_data, tmp_path, server)))
    gaps = [r["sampler_logprob_gap"] for r in read_metrics(tmp_path)]
    assert gaps[0] < GAP and min(gaps[1:]) > 10 * GAP, gaps


def test_a_server_gone_mid_run_stops_with_its_name_and_a_checkpoint(
    server, vllm_pair, addition_data, tmp_path, monkeypatch
):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens here any more
    real_push = VllmServerSampler.push_weights

    def push_then_lose_server(self, model):
        real_push(self, model)
        if self.pushes == 2:  # after step 1: the server is gone
            self.url = self.all_urls[0] = dead

    monkeypatch.setattr(VllmServerSampler, "push_weights", push_then_lose_server)
    cfg = server_config(vllm_pair, addition_data, tmp_path, server, save_every=1)
    cfg["vllm"] = {**cfg["vllm"], "server_timeout_s": 20.0}  # how long a server is waited for
    with pytest.raises(RolloutServerError, match=re.escape(f"rollout server {dead} failed")):
        train(config_from_dict(cfg))
    assert latest_checkpoint(tmp_path).name == "step-0000001"
    monkeypatch.setattr(VllmServerSampler, "push_weights", real_push)
    result = train(config_from_dict({**cfg, "resume": True}))  # server back: it goes on
    assert result["step"] == 3 and read_metrics(tmp_path)[-1]["sampler_logprob_gap"] < GAP


def test_an_unreachable_server_is_named(tmp_path):
    with pytest.raises(RolloutServerError, match=re.escape("server http://127.0.0.1:9 failed")):
        VllmServerSampler("http://127.0.0.1:9", all_urls=[], weights_dir=str(tmp_path))


def test_two_processes_share_one_server_and_one_push(server, vllm_pair, addition_data, tmp_path):
    """torchrun, 2 CPU processes: each rank samples its own prompts from the server, rank 0
    alone writes and pushes the weights, and no rank samples before the push took effect
    (the gap is summed over both ranks' tokens)."""
    from test_distributed import launch

    cfg = server_config(vllm_pair, addition_data, tmp_path / "ddp", server, device="cpu")
    cfg["rollouts"] = {"mode": "pipelined", "lag": 0}
    out = launch(cfg, tmp_path)
    records = read_metrics(out)
    assert [r["sequences_from_student"] for r in records] == [4, 4, 4]  # 2 ranks x 2 prompts
    assert all(r["sampler_logprob_gap"] < GAP for r in records), records
    pushed = sorted(p.name for p in (out / "rollout_weights").iterdir())
    assert pushed == ["push-0000003"], pushed  # start + 3 steps, one directory kept


def test_a_server_restarted_mid_run_is_survived(
    server, vllm_pair, addition_data, tmp_path, monkeypatch
):
    """The server is stopped after step 1's push and started again: the next rollouts wait
    for it and give it the current weights first (a restarted server holds the model it
    loaded from disk, which the gap would show), and the run finishes."""
    real_push = VllmServerSampler.push_weights

    def push_then_restart(self, model):
        real_push(self, model)
        if self.pushes == 2:
            restart()

    monkeypatch.setattr(VllmServerSampler, "push_weights", push_then_restart)
    cfg = server_config(vllm_pair, addition_data, tmp_path, server)
    cfg["vllm"] = {**cfg["vllm"], "server_timeout_s": float(START_TIMEOUT_S)}
    result = train(config_from_dict(cfg))
    assert result["step"] == 3
    gaps = [r["sampler_logprob_gap"] for r in read_metrics(tmp_path)]
    assert max(gaps) < GAP, gaps  # step 2 sampled from the restarted server, re-pushed
