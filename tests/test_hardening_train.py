"""Run directories under attack or bad luck: planted pickles, non-finite runs, changed
configs at resume, leftovers of killed saves, a full disk, a torn metrics rewrite."""

import errno
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file

import opd.config.parse
import opd.teachers.local as local_teacher
from opd.cli import main
from opd.config.parse import config_from_dict
from opd.run.checkpoint import (
    STATE_FILE,
    CheckpointError,
    OutOfSpace,
    TrainingStopped,
    clean_leftovers,
    latest_checkpoint,
    load_trainer_state,
    rng_state,
    write_trainer_state,
)
from opd.run.loop import train
from opd.run.metrics import read_metrics


class _Planted:
    """Unpickling this makes a directory: stands for any command a planted file could run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_planted_pickle_is_refused_not_run(base_config, tmp_path):
    cfg = base_config(preset="supervised_kd", steps=1)
    train(config_from_dict(cfg))
    ckpt = latest_checkpoint(cfg["output_dir"])
    for name in ("trainer_state.json", "trainer_state.safetensors", "trainer_state.pt"):
        (ckpt / name).unlink(missing_ok=True)
    marker = tmp_path / "code-ran"
    torch.save({"optimizer": _Planted(marker), "step": 1}, ckpt / "trainer_state.pt")
    with pytest.raises(CheckpointError, match="pickle format of older opd versions"):
        train(config_from_dict({**cfg, "steps": 2, "resume": True}))
    assert not marker.exists()


def test_trainer_state_round_trips_without_pickle(tmp_path):
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3, 2))], lr=1e-3, betas=(0.8, 0.9))
    opt.param_groups[0]["params"][0].grad = torch.ones(3, 2)
    opt.step()
    state = {"optimizer": opt.state_dict(), "rng": rng_state(), "totals": {"seconds": {}}, "n": 7}
    write_trainer_state(tmp_path, state)
    back = load_trainer_state(tmp_path)
    assert back["n"] == 7 and back["totals"] == {"seconds": {}}
    assert back["rng"]["python"] == state["rng"]["python"]  # tuples, ints > 2**31
    assert np.array_equal(back["rng"]["numpy"][1], state["rng"]["numpy"][1])
    assert back["rng"]["numpy"][1].dtype == np.uint32
    assert torch.equal(back["rng"]["torch"], state["rng"]["torch"])
    assert set(back["optimizer"]["state"]) == {0}  # int keys stay ints
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.9)
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(back["optimizer"]["state"][0][key], opt.state_dict()["state"][0][key])
    assert "pickle" not in (tmp_path / STATE_FILE).read_text()


@pytest.mark.parametrize("lr", [math.inf, math.nan, 0.0, -1e-3])
def test_non_finite_or_non_positive_lr_is_refused(lr, base_config):
    with pytest.raises(ValueError, match=r"optim\.lr=.* must be a finite number > 0"):
        config_from_dict(base_config(optim__lr=lr))


def test_overflowing_update_is_never_checkpointed(base_config, capsys, tmp_path, monkeypatch):
    """The issue's run: optim.lr=inf (now refused by the config, so set on the object as an
    API user could): step 1 has a finite loss and makes every weight inf."""
    cfg = config_from_dict(base_config(preset="supervised_kd", steps=3, save_every=1))
    cfg.optim.lr = math.inf
    monkeypatch.setattr(opd.config.parse, "load_config", lambda *a, **kw: cfg)
    assert main(["train"]) == 4
    err = capsys.readouterr().err
    assert "weights are non-finite after step 1" in err and "Traceback" not in err
    assert "no checkpoint to resume from" in err
    assert latest_checkpoint(cfg.output_dir) is None


def test_stop_points_at_the_last_finite_checkpoint(base_config, monkeypatch):
    """Steps 1-2 are fine and saved; the update of step 3 overflows every weight."""
    real_step, calls = torch.optim.AdamW.step, {"n": 0}

    def overflowing_third_step(self, *a, **kw):
        out = real_step(self, *a, **kw)
        calls["n"] += 1
        if calls["n"] == 3:
            with torch.no_grad():
                for group in self.param_groups:
                    for p in group["params"]:
                        p.fill_(math.inf)
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing_third_step)
    cfg = base_config(preset="supervised_kd", steps=4, save_every=1)
    root = Path(cfg["output_dir"]) / "checkpoints"
    with pytest.raises(TrainingStopped, match=f"last finite checkpoint is {root / 'step-0000002'}"):
        train(config_from_dict(cfg))
    assert latest_checkpoint(cfg["output_dir"]).name == "step-0000002"
    assert sorted(p.name for p in root.glob("step-*")) == ["step-0000001", "step-0000002"]
    weights = load_file(str(root / "step-0000002" / "model.safetensors"))
    assert all(bool(torch.isfinite(w).all()) for w in weights.values())


def test_resume_applies_an_allowed_lr_change(base_config):
    """Without this, the checkpoint's optimizer state would silently keep the old lr."""
    cfg = base_config(preset="supervised_kd", steps=1)
    train(config_from_dict(cfg))
    over = {**cfg, "steps": 2, "resume": True, "resume_allow_changes": ["optim.lr"]}
    over["optim"] = {"lr": 5e-4}
    assert train(config_from_dict(over))["lr"] == 5e-4


def test_nan_teacher_on_the_topk_path_skips_the_step(base_config, monkeypatch):
    """A NaN teacher (cached, remote) used to become a zero forward-KL loss."""
    real = local_teacher.LocalTeacher.score

    def nan_rows(self, batch, need, topk=0, *rest, **kw):
        scores = real(self, batch, need, topk, *rest, **kw)
        scores.topk_logprobs[0, 0] = math.nan  # one entry of one supervised position
        return scores

    monkeypatch.setattr(local_teacher.LocalTeacher, "score", nan_rows)
    cfg = base_config(
        preset="supervised_kd", steps=2, max_bad_steps=5, loss__estimator="topk", loss__topk=4
    )
    train(config_from_dict(cfg))
    assert [r["skipped"] for r in read_metrics(cfg["output_dir"])] == [True, True]


# -- resume with a changed config ------------------------------------------------------------


@pytest.mark.parametrize(
    "change,keys",
    [
        ({"batch_size": 2}, "batch_size: 4 -> 2"),
        ({"seed": 5, "optim": {"lr": 2e-3}}, "optim.lr: 0.001 -> 0.002; seed: 0 -> 5"),
        ({"preset": "gkd"}, "preset: 'supervised_kd' -> 'gkd'"),
        ({"data": {"train": "other.jsonl"}}, "data.train: "),
    ],
)
def test_resume_with_changed_config_is_refused(change, keys, base_config):
    cfg = base_config(preset="supervised_kd", steps=1)
    train(config_from_dict(cfg))
    changed = {**cfg, **change, "steps": 2, "resume": True}
    with pytest.raises(CheckpointError, match=keys.replace("(", r"\(")) as info:
        train(config_from_dict(changed))
    assert "resume_allow_changes=[" in str(info.value)


def test_resume_allow_changes_accepts_the_named_keys(base_config):
    cfg = base_config(preset="supervised_kd", steps=1)
    train(config_from_dict(cfg))
    changed = {**cfg, "batch_size": 2, "steps": 2, "resume": True, "save_every": 1}
    with pytest.raises(CheckpointError, match="batch_size"):
        train(config_from_dict({**changed, "resume_allow_changes": ["seed"]}))
    train(config_from_dict({**changed, "resume_allow_changes": ["batch_size"]}))
    assert latest_checkpoint(cfg["output_dir"]).name == "step-0000002"


# -- leftovers and a full disk -------------------------------------------------------------


def test_leftovers_of_killed_saves_are_cleaned_at_start(base_config):
    cfg = base_config(preset="supervised_kd", steps=2, save_every=1)
    train(config_from_dict(cfg))
    root = Path(cfg["output_dir"]) / "checkpoints"
    step2 = root / "step-0000002"
    # a kill between the two renames of a re-save: the complete copy is only `.old-step-*`
    os.replace(step2, root / ".old-step-0000002-4242")
    shutil.copytree(root / "step-0000001", root / ".tmp-step-0000003-4242")
    (root / ".latest.tmp-4242").write_text("step-0000003")
    (root / ".old-step-0000001-77").mkdir()  # a stale copy of a step that exists
    train(config_from_dict({**cfg, "steps": 3, "resume": True}))
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000002", "step-0000003"]
    assert load_trainer_state(root / "step-0000003")["step"] == 3
    records = read_metrics(cfg["output_dir"])
    assert [r["step"] for r in records] == [1, 2, 3]  # resumed from the restored step 2


def test_clean_leftovers_restores_an_interrupted_resave(tmp_path):
    root = tmp_path / "checkpoints"
    old = root / ".old-step-0000004-1"
    old.mkdir(parents=True)
    (old / STATE_FILE).write_text("{}")
    assert clean_leftovers(tmp_path) == []
    assert (root / "step-0000004" / STATE_FILE).exists() and not old.exists()


def test_full_disk_during_save_names_the_directory_and_leaves_nothing(base_config, monkeypatch):
    cfg = base_config(preset="supervised_kd", steps=3, save_every=1)
    real = transformers.PreTrainedModel.save_pretrained
    calls = {"n": 0}

    def full_disk(self, directory, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # the second save: half a weights file, then ENOSPC
            Path(directory).mkdir(parents=True, exist_ok=True)
            (Path(directory) / "model.safetensors").write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, directory, *a, **kw)

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", full_disk)
    root = Path(cfg["output_dir"]) / "checkpoints"
    with pytest.raises(OutOfSpace, match=f"no space left on device in {root}"):
        train(config_from_dict(cfg))
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000001"]


# -- metrics.jsonl rewrite at resume ---------------------------------------------------------


def test_metrics_rewrite_that_fails_midway_keeps_the_history(tmp_path):
    """The resume rewrite hits a file-size limit (as a full disk would) after a few KB."""
    history = "".join(
        f'{{"step": {i}, "loss": {i / 7:.12f}, "pad": "{"x" * 200}"}}\n' for i in range(1, 200)
    )
    (tmp_path / "metrics.jsonl").write_text(history)
    script = textwrap.dedent(
        f"""
        import resource, signal
        from opd.run.metrics import MetricsLog
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            MetricsLog({str(tmp_path)!r}, resume_step=150)
        except OSError as err:
            print("failed:", err)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert "failed:" in out.stdout, out.stderr
    assert (tmp_path / "metrics.jsonl").read_text() == history
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]
