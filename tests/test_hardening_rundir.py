"""One writer per run directory; path mistakes and a full disk as one-line errors."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

import opd.data.cache_format as cache_format
from opd.cli import main as cli_main
from opd.run.checkpoint import latest_checkpoint
from opd.run.lock import LOCK_FILE
from opd.run.metrics import read_metrics

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
OPD = [sys.executable, "-c", "import sys; from opd.cli import main; sys.exit(main())"]


def _config_file(base_config, tmp_path, **kw) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(base_config(**kw)))
    return path


def _wait_for_lock(run_dir: Path, proc: subprocess.Popen, timeout_s: float = 180) -> dict:
    lock, end = run_dir / LOCK_FILE, time.monotonic() + timeout_s
    while time.monotonic() < end:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        text = lock.read_text() if lock.exists() else ""
        if text.strip() and json.loads(text)["pid"] == proc.pid:
            return json.loads(text)
        time.sleep(0.2)
    raise AssertionError("the first run never took the lock")


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("opd: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_second_train_on_a_run_directory_is_refused_and_a_killed_ones_lock_taken_over(
    base_config, tmp_path, capsys, caplog
):
    run_dir = tmp_path / "run"
    config = _config_file(base_config, tmp_path, steps=1000, save_every=2)
    first = subprocess.Popen(
        [*OPD, "train", str(config)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        holder = _wait_for_lock(run_dir, first)
        assert holder["host"] == socket.gethostname() and holder["command"] == "opd train"
        for extra in ([], ["resume=true"]):
            t0 = time.monotonic()
            assert cli_main(["train", str(config), *extra]) == 2
            line = _error_line(capsys)
            assert f"PID {first.pid} on host {socket.gethostname()}" in line, line
            assert str(run_dir) in line and time.monotonic() - t0 < 30
    finally:
        first.send_signal(signal.SIGKILL)  # no cleanup of any kind: the kernel drops its lock
        first.communicate(timeout=60)
    caplog.set_level(logging.INFO, logger="opd")
    last = latest_checkpoint(run_dir)
    done = int(last.name.split("-")[1]) if last else 0
    assert cli_main(["train", str(config), "resume=true", f"steps={done + 2}"]) == 0
    assert f"taking over the lock left by PID {first.pid}" in caplog.text
    steps = [r["step"] for r in read_metrics(run_dir)]
    assert steps == sorted(set(steps)) and steps[-1] == done + 2  # no step twice
    # released when the run ends: the next one starts
    assert cli_main(["train", str(config), "resume=true", f"steps={done + 3}"]) == 0


HOLD = textwrap.dedent(
    """
    import fcntl, json, os, socket, sys, time
    fh = open(sys.argv[1], "a+")
    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": "x"}))
    fh.flush()
    print("held", flush=True)
    time.sleep(120)
    """
)


def test_eval_writing_into_a_locked_run_directory_is_refused(base_config, tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir / LOCK_FILE)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        config = _config_file(base_config, tmp_path, data__eval=base_config()["data"]["train"])
        assert cli_main(["eval", str(config), "--out", str(run_dir / "eval.json")]) == 2
        assert f"PID {holder.pid}" in _error_line(capsys)
        assert not (run_dir / "eval.json").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: eval takes the lock, writes, and lets it go
    assert cli_main(["eval", str(config), "--out", str(run_dir / "eval.json")]) == 0
    assert json.loads((run_dir / "eval.json").read_text())["rows"] > 0


def _broken_paths(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """name -> (path, words the error must hold)."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    return {
        "under_a_file": (str(afile / "sub"), f"{afile} is a file, not a directory"),
        "a_file": (str(afile), f"{afile} is a file, not a directory"),
        "dangling_link": (str(dangling), f"{dangling} is a symbolic link to {tmp_path}/nowhere, which does not exist"),
        "looping_link": (str(loop), f"{loop} is a symbolic link that loops"),
        "dev_null": ("/dev/null", "/dev/null is a character device, not a directory"),
    }


@pytest.mark.parametrize(
    "name", ["under_a_file", "a_file", "dangling_link", "looping_link", "dev_null"]
)
def test_train_output_dir_path_errors_are_one_line(base_config, tmp_path, capsys, name):
    path, words = _broken_paths(tmp_path)[name]
    config = _config_file(base_config, tmp_path)
    assert cli_main(["train", str(config), f"output_dir={path}"]) == 2
    line = _error_line(capsys)
    assert f"output_dir={path}" in line and words in line, line


@pytest.mark.parametrize(
    "name", ["under_a_file", "a_file", "dangling_link", "looping_link", "dev_null"]
)
def test_generate_out_path_errors_are_one_line(tiny_pair, addition_data, tmp_path, capsys, name):
    path, words = _broken_paths(tmp_path)[name]
    argv = ["generate", "--teacher", str(tiny_pair[0]), "--prompts", str(addition_data)]
    assert cli_main([*argv, "--out", path]) == 2
    line = _error_line(capsys)
    assert f"--out={path}" in line and words in line, line


def test_eval_out_that_is_a_directory_is_refused_before_the_work(base_config, tmp_path, capsys):
    config = _config_file(base_config, tmp_path, data__eval=base_config()["data"]["train"])
    assert cli_main(["eval", str(config), "--out", str(tmp_path)]) == 2
    assert f"--out={tmp_path} is a directory" in _error_line(capsys)


def test_generate_on_a_full_disk_exits_4_naming_the_space_needed_then_resumes(
    tiny_pair, addition_data, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "cache"
    argv = ["generate", "--teacher", str(tiny_pair[0]), "--prompts", str(addition_data)]
    argv += ["--out", str(out), "--shard-size", "8", "--max-new-tokens", "4", "--topk", "4"]
    real, calls = cache_format.atomic_write, {"n": 0}

    def disk_fills(path, data):
        calls["n"] += 1
        if calls["n"] == 5:  # manifest, shard 0 (two files), manifest, then shard 1's first
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            tmp.write_bytes(data[: len(data) // 2])  # half written, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(cache_format, "atomic_write", disk_fills)
    assert cli_main(argv) == 4
    line = _error_line(capsys)
    assert f"no space left on device in --out {out} (about " in line
    assert "more are needed; " in line and " free now)" in line, line
    assert "The 1 shard(s) written are intact" in line and "(3 shard(s) left)" in line
    assert not list(out.glob(".*.tmp-*"))  # nothing half-written is left
    monkeypatch.setattr(cache_format, "atomic_write", real)
    assert cli_main(argv) == 0  # resumes: the written shard is verified and kept
    summary = json.loads(capsys.readouterr().out)
    assert summary["counts"]["prompts"] == 32


def test_generate_from_an_endpoint_on_a_full_disk_exits_4_too(tmp_path, capsys, monkeypatch):
    from endpoint_fake import KEY, FakeAPI

    monkeypatch.setenv("OPD_TEST_ENDPOINT_KEY", KEY)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{i}+1="}) + "\n" for i in range(6)))
    out = tmp_path / "cache"
    real, calls = cache_format.atomic_write, {"n": 0}

    def disk_fills(path, data):
        calls["n"] += 1
        if calls["n"] == 5:  # manifest, shard 0 (two files), manifest, then shard 1's first
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(cache_format, "atomic_write", disk_fills)
    with FakeAPI() as api:
        argv = ["generate", "--endpoint", api.url, "--model", "fake-model", "--prompts"]
        argv += [str(prompts), "--out", str(out), "--api-key-env", "OPD_TEST_ENDPOINT_KEY"]
        argv += ["--shard-size", "2", "--max-new-tokens", "8", "--topk", "0"]
        assert cli_main(argv) == 4
        line = _error_line(capsys)
        assert f"no space left on device in --out {out} (about " in line, line
        assert "The 1 shard(s) written are intact" in line and "(2 shard(s) left)" in line
        monkeypatch.setattr(cache_format, "atomic_write", real)
        assert cli_main(argv) == 0  # resumes
    assert cache_format.read_manifest(out)["complete"]
