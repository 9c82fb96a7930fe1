"""`teacher.urls`: one teacher served by several servers; failover, refusals, overlap.

Replicas that must die are real `opd serve` processes on 127.0.0.1, killed with SIGKILL;
the rest are in-process servers (`serve_util.start_server`), cheaper to start.
"""

from __future__ import annotations

import random
import signal
import socket
import threading
import time
from dataclasses import replace

import pytest
import torch
import yaml

from opd.cli import main as cli_main
from opd.config.parse import config_from_dict
from opd.data.batch import assemble
from opd.modeling.hf import load_causal_lm
from opd.run.checkpoint import latest_checkpoint, load_trainer_state
from opd.run.loop import train
from opd.run.metrics import read_metrics
from opd.teachers.remote import RemoteTeacher
from opd.teachers.routing import RoutedTeacher, column_route
from serve_util import TOKEN, close, random_seqs, start_serve_processes, start_server


@pytest.fixture(scope="module")
def servers(tiny_pair):
    """Three in-process servers of the teacher (one model object shared)."""
    model = load_causal_lm(str(tiny_pair[0]))
    started = [start_server(tiny_pair[0], model=model)[0] for _ in range(3)]
    yield [s.url for s in started]
    for s in started:
        s.stop()


@pytest.fixture(scope="module")
def processes(tiny_pair, tmp_path_factory):
    """Two `opd serve` processes of the teacher, for the tests that kill them."""
    started = start_serve_processes(tiny_pair[0], tmp_path_factory.mktemp("serve_logs"), 2)
    yield started
    for proc, _ in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def remote(urls, **kw) -> RemoteTeacher:
    return RemoteTeacher(urls, token=TOKEN, max_retries=kw.pop("max_retries", 0), **kw)


def a_batch(vocab: int, rows: int = 12, seed: int = 0):
    rng = random.Random(seed)
    prompts = random_seqs(rng, rows, vocab, 1, 9)
    completions = random_seqs(rng, rows, vocab, 0, 12)
    completions[2] = []  # a row with nothing to score
    return assemble(prompts, completions, pad_id=0)


def test_replicas_score_as_one_server(servers):
    with remote(servers[0]) as one:
        batch = a_batch(one.vocab_size)
        want = [one.score(batch, "token"), one.score(batch, "topk", 5)]
    mask = batch.loss_mask()
    for n in (2, 3):
        with remote(servers[:n]) as pool:
            got = [pool.score(batch, "token"), pool.score(batch, "topk", 5)]
            served = [r.served for r in pool.pool.replicas]
        assert all(s >= 2 for s in served), served  # each replica took part of each batch
        for g, w in zip(got, want):
            close(g.token_logprobs[mask], w.token_logprobs[mask])
        assert torch.equal(got[1].topk_ids[mask], want[1].topk_ids[mask])
        close(got[1].topk_logprobs[mask], want[1].topk_logprobs[mask])


def test_replica_serving_another_model_is_refused(tiny_pair, servers):
    other, _ = start_server(tiny_pair[1])  # same tokenizer and name, the student's weights
    renamed, _ = start_server(tiny_pair[0], name="another-teacher")
    try:
        with pytest.raises(ValueError, match=rf"replica {other.url} scores a probe"):
            remote([servers[0], other.url])
        with pytest.raises(ValueError, match=rf"{renamed.url} serves model='another-teacher'"):
            remote([servers[0], renamed.url])
    finally:
        other.stop()
        renamed.stop()


def test_replica_down_at_connect_joins_when_a_health_check_reaches_it(tiny_pair, servers):
    with socket.socket() as s:  # a port nothing listens on (reserved, then released)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    late = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    with remote([servers[0], late], max_retries=3, backoff_s=2.0, probe_interval_s=0.2) as pool:
        assert time.monotonic() - t0 < 2.0  # started on the live one, no backoff waited
        first, second = pool.pool.replicas
        assert (first.healthy, second.healthy) == (True, False)
        batch = a_batch(pool.vocab_size)
        pool.score(batch, "token")
        assert second.served == 0
        back, _ = start_server(tiny_pair[0], port=port)
        try:
            deadline = time.monotonic() + 20
            while not second.healthy and time.monotonic() < deadline:
                pool.score(batch, "token")  # requests start the due probes
                time.sleep(0.1)
            assert second.healthy
            pool.score(batch, "token")
            assert second.served > 0
        finally:
            back.stop()


def a_config(base_config, tmp_path, name: str, teacher: dict, **kw):
    return config_from_dict(
        base_config(
            preset="on_policy",
            teacher={"kind": "remote", "max_retries": 1, "timeout_s": 10.0, **teacher},
            data__max_prompt_tokens=32,  # within the servers' max_seq_len (64)
            data__max_completion_tokens=16,
            batch_size=6,
            micro_batch_size=3,
            output_dir=str(tmp_path / name),
            **kw,
        )
    )


def losses(config) -> list[float]:
    return [r["loss"] for r in read_metrics(config.output_dir)]


def test_training_over_replicas_equals_one_server(servers, base_config, tmp_path, monkeypatch):
    monkeypatch.setenv("OPD_TEACHER_TOKEN", TOKEN)
    one = a_config(base_config, tmp_path, "one", {"url": servers[0]})
    three = a_config(base_config, tmp_path, "three", {"urls": servers})
    train(one)
    train(three)
    assert losses(three) == pytest.approx(losses(one), rel=1e-5, abs=1e-6)
    assert all(r["teacher_failovers"] == 0 for r in read_metrics(three.output_dir))
    assert all(r["teacher_replicas_healthy"] == 3 for r in read_metrics(three.output_dir))


def test_overlap_on_and_off_give_identical_losses(servers, base_config, tmp_path, monkeypatch):
    monkeypatch.setenv("OPD_TEACHER_TOKEN", TOKEN)
    threads = []
    real = RemoteTeacher.score

    def score(self, *args, **kw):
        threads.append(threading.current_thread().name)
        return real(self, *args, **kw)

    monkeypatch.setattr(RemoteTeacher, "score", score)
    got = {}
    for overlap in (False, True):
        threads.clear()
        config = a_config(
            base_config, tmp_path, f"o{overlap}", {"url": servers[0], "overlap": overlap}
        )
        train(config)
        got[overlap] = losses(config)
        # serial: scored by the loop's thread; overlapped: by the worker, one micro-batch ahead
        assert {t.startswith("opd-score") for t in threads} == {overlap}
    assert got[True] == got[False]


def kill_on_call(monkeypatch, call: int, procs) -> None:
    """SIGKILL `procs` just before the `call`-th teacher request of the run (1-based)."""
    real, calls = RemoteTeacher.score, {"n": 0}

    def score(self, *args, **kw):
        calls["n"] += 1
        if calls["n"] == call:
            for proc in procs:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
        return real(self, *args, **kw)

    monkeypatch.setattr(RemoteTeacher, "score", score)


def test_sigkill_one_replica_mid_step(processes, base_config, tmp_path, monkeypatch):
    monkeypatch.setenv("OPD_TEACHER_TOKEN", TOKEN)
    urls = [url for _, url in processes]
    reference = a_config(base_config, tmp_path, "ref", {"urls": urls}, steps=4)
    train(reference)
    # second micro-batch of step 2: the step has begun when the replica dies
    kill_on_call(monkeypatch, 4, [processes[1][0]])
    config = a_config(base_config, tmp_path, "killed", {"urls": urls}, steps=4)
    result = train(config)
    assert result["step"] == 4
    assert losses(config) == pytest.approx(losses(reference), rel=1e-5, abs=1e-6)
    records = read_metrics(config.output_dir)
    assert sum(r["teacher_failovers"] for r in records) >= 1
    assert records[-1]["teacher_replicas_healthy"] == 1


def test_all_replicas_killed_exit_3_then_resume(
    processes, tiny_pair, base_config, tmp_path, monkeypatch, capsys
):
    """Runs after the test above: one replica left, killed at step 3; resume on a new one."""
    monkeypatch.setenv("OPD_TEACHER_TOKEN", TOKEN)
    urls = [url for _, url in processes]
    live = [proc for proc, _ in processes if proc.poll() is None]
    data = base_config(
        preset="on_policy",
        teacher={"kind": "remote", "urls": urls, "max_retries": 1, "timeout_s": 10.0},
        data__max_prompt_tokens=32,
        data__max_completion_tokens=16,
        steps=4,
        save_every=1,
    )
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(data))
    kill_on_call(monkeypatch, 2 * 2 + 1, live)  # the first request of step 3
    assert cli_main(["train", str(path)]) == 3
    err = capsys.readouterr().err
    assert all(url in err for url in urls) and "resume=true" in err
    ckpt = latest_checkpoint(data["output_dir"])
    assert ckpt.name == "step-0000002" and load_trainer_state(ckpt)["step"] == 2

    monkeypatch.undo()
    monkeypatch.setenv("OPD_TEACHER_TOKEN", TOKEN)
    port = int(urls[0].rsplit(":", 1)[1])  # the first replica comes back on its port
    back, _ = start_server(tiny_pair[0], port=port)
    try:
        assert cli_main(["train", str(path), "resume=true"]) == 0
    finally:
        back.stop()
    assert [r["step"] for r in read_metrics(data["output_dir"])] == [1, 2, 3, 4]


def test_a_routed_teachers_failovers_are_counted_as_its_own(tiny_pair, servers):
    """Several teachers, one with replicas: a replica that dies after connect costs that
    teacher a failover in the step record (the other none), and its rows are still scored
    as the live replica scores them."""
    spare, _ = start_server(tiny_pair[0], model=load_causal_lm(str(tiny_pair[0])))
    far, near = remote([servers[0], spare.url], max_retries=1), remote([servers[1]])
    try:
        route = column_route("d", {"x": "far"}, "near", ["far", "near"])
        routed = RoutedTeacher({"far": far, "near": near}, route)
        plain = a_batch(far.vocab_size)
        rows = [{"d": "x" if r % 3 else "y"} for r in range(plain.size)]
        batch = replace(plain, rows=rows)
        spare.stop()  # dies after connect: its share of far's rows fails over
        got = routed.score(batch, "token")
        record = routed.step_record()
        assert record["teacher_far_failovers"] >= 1 and record["teacher_near_failovers"] == 0
        with remote([servers[2]]) as other:  # every replica serves the same model
            want = other.score(batch, "token")
        mask = batch.loss_mask()
        close(got.token_logprobs[mask], want.token_logprobs[mask])
    finally:
        far.close()
        near.close()
