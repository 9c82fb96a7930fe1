"""The command line as a user drives it: subprocesses, exit codes, no tracebacks.

Exit codes (also in `opd --help`): 0 done; 2 a mistake in the command, config or data
(the message names the key or path and what to do); 3 the teacher server stayed down
(checkpoint intact); 130 / 143 stopped by Ctrl-C / SIGTERM after saving a checkpoint.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from opd.config.docs import key_docs

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "COLUMNS": "100"}
OPD = [sys.executable, "-c", "import sys; from opd.cli import main; sys.exit(main())"]


def opd(*args, cwd=None, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*OPD, *map(str, args)], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=timeout
    )


def opd_all(commands: list[list]) -> list[subprocess.CompletedProcess]:
    """Several commands at once (each starts Python and torch: seconds)."""
    procs = [
        subprocess.Popen(
            [*OPD, *map(str, c)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV
        )
        for c in commands
    ]
    out = []
    for cmd, proc in zip(commands, procs):
        stdout, stderr = proc.communicate(timeout=300)
        out.append(subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr))
    return out


def test_top_level_help_does_not_import_torch():
    code = (
        "import sys\nfrom opd.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO TORCH')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=60
    )
    assert "NO TORCH" in out.stdout, out.stdout + out.stderr
    for word in ("train", "eval", "config", "demo", "serve", "exit codes", "130"):
        assert word in out.stdout


def test_train_help_and_opd_config_list_every_key():
    train_help, config, loss = opd_all([["train", "--help"], ["config"], ["config", "loss"]])
    for out in (train_help, config):
        assert out.returncode == 0, out.stderr
        for doc in key_docs():
            assert f"  {doc.key} (" in out.stdout, doc.key
    assert "--print-config" in train_help.stdout
    assert "loss.beta" in loss.stdout and "optim.lr" not in loss.stdout


def test_print_config_resolves_preset_file_and_overrides(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("preset: gkd\nstudent: {path: s}\ndata: {train: t.jsonl}\noptim:\n  lr: 2e-5\n")
    out = opd(
        "train",
        path,
        "loss.beta=0.3",
        "--print-config",
        "data.system_prompt=Note: be brief",  # overrides may follow an option
    )
    assert out.returncode == 0, out.stderr
    printed = yaml.safe_load(out.stdout)
    assert printed["source"]["lmbda"] == 0.5 and printed["loss"]["divergence"] == "jsd"
    assert printed["loss"]["beta"] == 0.3 and printed["optim"]["lr"] == 2e-5
    assert printed["data"]["system_prompt"] == "Note: be brief"


@pytest.fixture
def bad_inputs(tiny_pair, addition_data, tmp_path):
    teacher, student = tiny_pair
    good = [f"student.path={student}", f"teacher.path={teacher}", f"data.train={addition_data}"]
    bare = tmp_path / "no_tokenizer"
    shutil.copytree(student, bare)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bare / name).unlink(missing_ok=True)
    broken = tmp_path / "broken.yaml"
    broken.write_text("student:\n  path: s\nloss: [kd\n")
    done = tmp_path / "done"
    (done / "checkpoints" / "step-0000003").mkdir(parents=True)
    (done / "checkpoints" / "step-0000003" / "trainer_state.json").write_text("{}")
    done_too = tmp_path / "done_too"  # the commands run at once: one run directory each
    shutil.copytree(done, done_too)
    cases = {
        "local path that does not exist": (
            ["train", *good, "student.path=/no/such/model"],
            "student.path=/no/such/model: no such directory",
        ),
        "model dir without tokenizer": (
            ["train", *good, f"student.path={bare}"],
            "has no tokenizer files",
        ),
        "config file that is a directory": (["train", tmp_path, *good], "is a directory"),
        "malformed config file": (["train", broken], f"{broken}:4:1: invalid YAML"),
        "unknown key": (["train", *good, "loss.betta=0.5"], "unknown config key loss.betta"),
        "value of the wrong type": (["train", *good, "optim.lr=fast"], "optim.lr must be of type"),
        "resume with nothing left": (
            ["train", *good, f"output_dir={done}", "resume=true", "steps=3"],
            "nothing is left to train",
        ),
        "existing run without resume": (
            ["train", *good, f"output_dir={done_too}"],
            "pass resume=true",
        ),
        "eval without eval rows": (["eval", *good], "opd eval needs data.eval"),
    }
    if not torch.cuda.is_available():
        cases["device=cuda without CUDA"] = (["train", *good, "device=cuda"], "no CUDA device")
    return cases


def test_bad_inputs_fail_in_one_line_without_traceback(bad_inputs):
    results = opd_all([command for command, _ in bad_inputs.values()])
    for (name, (_, message)), out in zip(bad_inputs.items(), results):
        assert out.returncode == 2, (name, out.returncode, out.stderr)
        assert "Traceback" not in out.stderr, (name, out.stderr)
        assert "opd: error:" in out.stderr and message in out.stderr, (name, out.stderr)


def test_missing_extra_says_what_to_install(base_config, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(base_config(lora={"enabled": True})))
    # sys.modules[name] = None is how Python spells "not installed" for one process
    block = "import sys\nsys.modules['peft'] = None\nfrom opd.cli import main\nsys.exit(main())"
    out = subprocess.run(
        [sys.executable, "-c", block, "train", str(cfg)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr
    assert (
        "lora.enabled=true needs the Python package 'peft': pip install 'opd[lora]'" in out.stderr
    )
    assert "Traceback" not in out.stderr


def test_train_run_log_progress_summary_and_config(base_config, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(base_config(preset="gkd", steps=4, log_every=2)))
    out = opd("train", cfg)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)  # stdout is the JSON summary, nothing else
    assert summary["step"] == 4 and summary["output_dir"] == str(tmp_path / "run")
    progress = [line for line in out.stderr.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in progress] == ["2/4", "4/4"], out.stderr
    assert all(" loss " in line and " tok/s " in line and " eta " in line for line in progress)
    for noise in ("Loading weights", "Writing model shards", "HTTP Request", "Traceback", "it/s]"):
        assert noise not in out.stderr, noise
    written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert written["source"]["lmbda"] == 0.5 and written["steps"] == 4


def test_ctrl_c_saves_a_checkpoint_and_prints_the_resume_command(base_config, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(base_config(preset="supervised_kd", steps=500)))
    proc = subprocess.Popen(
        [*OPD, "train", str(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    lines = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait until training has started
        line = proc.stderr.readline()
        lines.append(line)
        if line.startswith("step "):
            break
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    stderr = "".join(lines) + stderr
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "saved checkpoint" in stderr and "resume=true" in stderr, stderr
    resume = next(line for line in stderr.splitlines() if "resume=true" in line and "opd" in line)
    ckpts = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1
    step = int(ckpts[0].name.split("-")[1])
    assert 1 <= step < 500
    assert str(cfg) in resume
    again = opd("train", cfg, "resume=true", f"steps={step + 1}")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["step"] == step + 1


def _heldout_ce(model_dir, data_path, n: int) -> float:
    from opd.config.sections import DataConfig
    from opd.data.encoding import Encoder
    from opd.data.rows import load_rows
    from opd.modeling.hf import load_causal_lm, load_tokenizer

    tok = load_tokenizer(str(model_dir))
    model, enc = load_causal_lm(str(model_dir)).double().eval(), Encoder(tok, DataConfig())
    total, count = 0.0, 0
    for row in load_rows(str(data_path))[:n]:
        prompt, completion = enc.prompt_ids(row["prompt"]), enc.completion_ids(row["completion"])
        with torch.no_grad():
            logits = model(torch.tensor([prompt + completion])).logits[0, :, : len(tok)]
        logp = torch.log_softmax(logits[len(prompt) - 1 : -1], -1)
        total -= float(logp.gather(-1, torch.tensor(completion)[:, None]).sum())
        count += len(completion)
    return total / count


def test_eval_scores_a_model_against_its_teacher(tiny_pair, addition_data):
    teacher, student = tiny_pair
    common = [
        f"student.path={student}",
        f"teacher.path={teacher}",
        f"data.eval={addition_data}",
        "eval_size=8",
        "sampling.max_new_tokens=4",
    ]
    out, alone = opd_all([["eval", *common], ["eval", *common, f"--model={teacher}"]])
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["rows"] == 8 and 0.0 <= result["accuracy"] <= 1.0
    # held-out loss: the mean token cross-entropy of the 8 completions, row by row in float64
    assert result["heldout_loss"] == pytest.approx(_heldout_ce(student, addition_data, 8), rel=1e-6)
    probe = result["divergence_to_teacher"]["reverse_kl"]
    own, theirs = probe["div_on_student"], probe["div_on_teacher"]
    assert own > 0 and theirs > 0 and abs(probe["exposure_gap"] - (own - theirs)) < 1e-9
    # The teacher scored on its own: no probe against itself, and the data are its kind of
    # text (peaked, trained-looking head) so its held-out loss differs from the student's.
    assert alone.returncode == 0, alone.stderr
    alone = json.loads(alone.stdout)
    assert "divergence_to_teacher" not in alone and alone["model"] == str(teacher)
    assert alone["heldout_loss"] != result["heldout_loss"]
