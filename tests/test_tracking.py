"""Experiment tracking (`report_to`) in offline modes, progress lines, and the stop flag."""

import io
import os
import signal
import time
from pathlib import Path

import pytest

from opd.config.parse import config_from_dict
from opd.run.interrupt import Interrupted, StopFlag
from opd.run.loop import train
from opd.run.progress import Progress


def test_wandb_offline_run_holds_the_metrics(base_config, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = config_from_dict(base_config(preset="supervised_kd", steps=2, report_to=["wandb"]))
    result = train(cfg)
    runs = list((Path(cfg.output_dir) / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    # W&B's own service process writes the file; on a loaded machine it may still be
    # flushing when `finish()` has returned (seen in CI: the header alone), so wait a little.
    deadline = time.monotonic() + 60
    while b"grad_norm" not in runs[0].read_bytes() and time.monotonic() < deadline:
        time.sleep(0.5)
    data = runs[0].read_bytes()  # protobuf records; keys and JSON values are stored as text
    assert b"divergence" in data and b"grad_norm" in data
    assert repr(result["loss"]).encode() in data


def test_trackio_local_run(base_config, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))  # read when trackio loads
    pytest.importorskip("trackio")
    cfg = config_from_dict(base_config(preset="supervised_kd", steps=2, report_to=["trackio"]))
    result = train(cfg)
    assert "Trackio" not in capsys.readouterr().out  # stdout is kept for opd's summary
    dbs = list((tmp_path / "trackio").rglob("*.db"))
    assert dbs, "no trackio database under TRACKIO_DIR"
    data = b"".join(db.read_bytes() for db in dbs)
    assert b"divergence" in data and repr(result["loss"]).encode() in data


def test_progress_lines_without_a_terminal():
    out = io.StringIO()  # not a TTY
    progress = Progress(6, 0, log_every=3, stream=out)
    for step in range(1, 7):
        progress.update({"step": step, "loss": 1.0 / step, "divergence": 0.5, "tokens": 100})
    lines = out.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["3/6", "6/6"]
    assert lines[0].startswith("step 3/6  loss 0.3333  div 0.5000  tok/s ")
    assert lines[-1].endswith("eta 0s")


def test_sigterm_sets_the_stop_flag_then_a_second_one_aborts():
    stop = StopFlag().install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert Interrupted(signal.SIGTERM, 3, None).exit_code == 143


def test_interrupt_saves_at_the_end_of_the_step(base_config, monkeypatch):
    import opd.run.loop as loop

    cfg = config_from_dict(base_config(preset="supervised_kd", steps=50))
    real_step = loop.train_step

    def step_then_signal(run, step, timer):
        out = real_step(run, step, timer)
        if step == 1:  # as if Ctrl-C came during the second step
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(loop, "train_step", step_then_signal)
    # what the process had before (Python's default_int_handler; SIG_IGN where the test
    # process was started in the background, as `nohup ... &` starts it)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(Interrupted) as err:
        train(cfg)
    assert err.value.step == 2 and err.value.exit_code == 130
    assert err.value.checkpoint.name == "step-0000002" and err.value.checkpoint.is_dir()
    assert signal.getsignal(signal.SIGINT) is before  # restored
