"""End-to-end runs of the loop on tiny real models: presets, sources, resume, faults."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.conftest import save_model_with_tokenizer
from tokenizers import decoders
from transformers import AutoModelForCausalLM

import opd.objectives.plain as plain_mod
import opd.run.checkpoint as checkpoint_mod
from opd.config.parse import config_from_dict
from opd.data.batch import assemble
from opd.data.rows import Encoder, load_rows
from opd.losses import token_divergence
from opd.modeling.hf import completion_logits, load_causal_lm, load_tokenizer
from opd.run.checkpoint import latest_checkpoint
from opd.run.loop import train
from opd.run.metrics import read_metrics
from opd.run.setup import build_run

PRESETS = ["seqkd", "supervised_kd", "gkd", "on_policy", "minillm_like"]


def fixed_batch(student_dir, data_path):
    tok = load_tokenizer(str(student_dir))
    enc = Encoder(tok, config_from_dict({"student": {"path": "x"}, "data": {"train": "x"}}).data)
    rows = load_rows(data_path)[:8]
    return assemble(
        [enc.prompt_ids(r["prompt"]) for r in rows],
        [enc.completion_ids(r["completion"]) for r in rows],
        pad_id=tok.pad_token_id,
    )


def reverse_kl_on(model_dir, teacher_dir, batch):
    student, teacher = load_causal_lm(str(model_dir)), load_causal_lm(str(teacher_dir))
    with torch.no_grad():
        s, t = (
            completion_logits(student, batch, 100_000),
            completion_logits(teacher, batch, 100_000),
        )
    return token_divergence(s, t, "reverse_kl")[batch.loss_mask()].mean().item()


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_runs_and_lowers_its_loss(
    preset, base_config, tiny_pair, addition_data, tmp_path
):
    teacher, student = tiny_pair
    extra = {"sampling__temperature": 0.0} if preset == "seqkd" else {}  # learnable teacher text
    cfg = config_from_dict(base_config(preset=preset, steps=12, optim__lr=3e-3, **extra))
    result = train(cfg)
    records = read_metrics(cfg.output_dir)
    assert len(records) == 12 and all(not r["skipped"] for r in records)
    ckpt = latest_checkpoint(cfg.output_dir)
    assert ckpt.name == "step-0000012"
    batch = fixed_batch(student, addition_data)
    if preset == "seqkd":  # trained on teacher text: teacher samples must become likelier
        first, last = (sum(r["loss"] for r in part) / 3 for part in (records[:3], records[-3:]))
        assert last < first - 0.1
    else:  # every distillation objective moves the student toward the teacher
        assert reverse_kl_on(ckpt, teacher, batch) < reverse_kl_on(student, teacher, batch)
    assert result["totals"]["seconds"]["time_update"] > 0


@pytest.mark.parametrize("lmbda,expect", [(0.0, "dataset"), (1.0, "student")])
def test_lambda_draws_from_the_right_source(lmbda, expect, base_config):
    cfg = config_from_dict(base_config(preset="gkd", source__lmbda=lmbda, steps=3))
    train(cfg)
    for r in read_metrics(cfg.output_dir):
        assert r[f"sequences_from_{expect}"] == 4
        assert r["sequences_from_teacher"] == 0
        assert (r["student_tokens_generated"] > 0) == (expect == "student")


def test_lambda_half_mixes_and_teacher_off_policy_samples_teacher(base_config):
    cfg = config_from_dict(base_config(preset="gkd", steps=8, source__off_policy="teacher"))
    train(cfg)
    records = read_metrics(cfg.output_dir)
    assert sum(r["sequences_from_student"] for r in records) > 0
    assert sum(r["sequences_from_teacher"] for r in records) > 0
    assert sum(r["sequences_from_dataset"] for r in records) == 0
    assert all(r["teacher_tokens_generated"] > 0 for r in records if r["sequences_from_teacher"])


def _weights(ckpt):
    return load_file(str(Path(ckpt) / "model.safetensors"))


@pytest.mark.parametrize("preset", ["gkd", "on_policy"])
def test_resume_equals_uninterrupted(preset, base_config, tmp_path):
    full = config_from_dict(base_config(preset=preset, steps=4, output_dir=str(tmp_path / "a")))
    train(full)
    part = base_config(preset=preset, steps=2, output_dir=str(tmp_path / "b"))
    train(config_from_dict(part))
    part.update(steps=4, resume=True)
    train(config_from_dict(part))
    a, b = _weights(latest_checkpoint(tmp_path / "a")), _weights(latest_checkpoint(tmp_path / "b"))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ra, rb = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]


def test_existing_run_is_not_overwritten_without_resume(base_config):
    cfg = config_from_dict(base_config(steps=1))
    train(cfg)
    with pytest.raises(FileExistsError, match="resume=true"):
        train(cfg)


def test_killed_save_leaves_previous_checkpoint_loadable(base_config, monkeypatch):
    cfg = config_from_dict(base_config(preset="supervised_kd", steps=4, save_every=2))
    real_write = checkpoint_mod.write_trainer_state
    calls = {"n": 0}

    def dying_write(directory, state):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint dies half-written
            (Path(directory) / "trainer_state.safetensors").write_bytes(b"partial")
            raise KeyboardInterrupt("killed during save")
        return real_write(directory, state)

    monkeypatch.setattr(checkpoint_mod, "write_trainer_state", dying_write)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    ckpt = latest_checkpoint(cfg.output_dir)
    assert ckpt.name == "step-0000002"
    # what loads from it is the model of step 2: that of a clean 2-step run
    ref_dir = str(Path(cfg.output_dir).parent / "ref")
    ref = base_config(preset="supervised_kd", steps=2, output_dir=ref_dir)
    train(config_from_dict(ref))
    want = _weights(latest_checkpoint(ref["output_dir"]))
    loaded = AutoModelForCausalLM.from_pretrained(ckpt).state_dict()
    for key, value in want.items():
        assert torch.equal(loaded[key], value), key
    monkeypatch.setattr(checkpoint_mod, "write_trainer_state", real_write)
    train(config_from_dict(base_config(preset="supervised_kd", steps=4, save_every=2, resume=True)))
    assert latest_checkpoint(cfg.output_dir).name == "step-0000004"
    assert not list((Path(cfg.output_dir) / "checkpoints").glob(".tmp-*"))


def test_non_finite_steps_are_skipped_then_stop(base_config, monkeypatch):
    real = plain_mod.batch_loss

    def poisoned(logits, *a, **kw):
        loss, div = real(logits, *a, **kw)
        return loss * float("nan"), div

    monkeypatch.setattr(plain_mod, "batch_loss", poisoned)
    cfg = config_from_dict(
        base_config(preset="supervised_kd", steps=6, max_bad_steps=2, loss__fused=False)
    )
    before = _weights(Path(cfg.student.path))
    with pytest.raises(RuntimeError, match="2 consecutive non-finite steps"):
        train(cfg)
    after = _weights(latest_checkpoint(cfg.output_dir))
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_teacher_with_other_tokenizer_is_aligned_or_refused_with_the_reason(
    base_config, tmp_path
):
    # ids that mean other characters, and a chat template: scored by byte alignment
    other = save_model_with_tokenizer(tmp_path / "other", chat=True)
    cfg = config_from_dict(base_config(preset="supervised_kd", teacher__path=str(other), steps=2))
    train(cfg)
    records = read_metrics(cfg.output_dir)
    assert all(0 < r["xtok_aligned_frac"] <= 1 and not r["skipped"] for r in records)
    # a vocabulary without a byte reading (a WordPiece decoder) cannot be aligned
    tok = load_tokenizer(str(other))
    tok.backend_tokenizer.decoder = decoders.WordPiece()
    tok.save_pretrained(other)
    cfg = config_from_dict(
        base_config(
            preset="supervised_kd", teacher__path=str(other), output_dir=str(tmp_path / "b")
        )
    )
    with pytest.raises(
        ValueError,
        match=r"reads \d+ of the student.s token ids as other tokens \(id 3: student .0., teacher"
        r".*cannot be aligned by bytes",
    ):
        train(cfg)


def test_teacher_with_padded_embeddings_is_accepted(base_config, tiny_pair, tmp_path):
    padded = save_model_with_tokenizer(tmp_path / "padded", vocab_size=128, hidden=40)
    cfg = config_from_dict(base_config(preset="gkd", teacher__path=str(padded), steps=2))
    result = train(cfg)
    assert math.isfinite(result["loss"]) and result["loss"] > 0


def test_lora_trains_adapters_and_leaves_base_untouched(base_config, tiny_pair):
    _, student = tiny_pair
    before = _weights(student)
    cfg = config_from_dict(
        base_config(preset="supervised_kd", steps=3, lora__enabled=True, lora__r=4)
    )
    run = build_run(cfg)
    train(cfg, run)
    trained = {k: v for k, v in run.student.state_dict().items()}
    # The base weights the trained model runs on are the student's, unchanged ...
    base_q = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
    assert torch.equal(trained[base_q], before["model.layers.0.self_attn.q_proj.weight"])
    # ... training moved the adapters (lora_B starts at zero) ...
    lora_b = [v for k, v in trained.items() if "lora_B" in k]
    assert lora_b and any(float(v.abs().max()) > 0 for v in lora_b)
    # ... and the saved adapter over the original base is the trained model.
    ckpt = latest_checkpoint(cfg.output_dir)
    assert (ckpt / "adapter_model.safetensors").exists()
    from peft import AutoPeftModelForCausalLM

    reloaded = AutoPeftModelForCausalLM.from_pretrained(ckpt)
    ids = torch.tensor([[3, 4, 5, 6]])
    run.student.eval()
    torch.testing.assert_close(reloaded(ids).logits, run.student(ids).logits)


def test_eval_metric_and_jsonl_fields(base_config, tmp_path):
    eval_path = tmp_path / "eval.jsonl"
    eval_path.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    cfg = config_from_dict(
        base_config(preset="on_policy", steps=2, eval_every=1, data__eval=str(eval_path))
    )
    train(cfg)
    records = read_metrics(cfg.output_dir)
    for key in (
        "eval_accuracy",
        "time_generate",
        "time_teacher_score",
        "time_update",
        "student_tokens_generated",
        "teacher_tokens_scored",
        "divergence",
        "loss",
    ):
        assert key in records[-1], key


@pytest.mark.parametrize(
    "override,message",
    [
        ({"loss": {"divergence": "kl"}}, "loss.divergence='kl' is not allowed"),
        ({"loss": {"betta": 0.5}}, "unknown config key loss.betta"),
        ({"source": {"lmbda": 1.5}}, "source.lmbda=1.5 must be <= 1"),
        ({"steps": "many"}, "steps must be of type int"),
        ({"preset": "gkdd"}, "preset='gkdd' is not allowed"),
        ({"batch_size": 3}, "multiple of micro_batch_size"),
        ({"sampling": {"temperature": -1}}, "sampling.temperature"),
        ({"loss": {"divergence": "jsd", "beta": 0.0}}, "use kind='forward_kl'"),
    ],
)
def test_bad_configs_name_the_key(override, message, base_config):
    data = base_config()
    for key, value in override.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) and key in data else value
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_from_dict(data)


def test_cli_train_with_overrides(base_config, tmp_path, capsys):
    import yaml

    from opd.cli import main

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(base_config(preset="gkd")))
    assert main(["train", str(path), "steps=2", "loss.beta=0.3"]) == 0
    assert len(read_metrics(tmp_path / "run")) == 2
    assert main(["train", str(path), "loss.nope=1"]) == 2
    assert "unknown config key loss.nope" in capsys.readouterr().err


def test_bf16_on_cpu_says_it_trains_in_float32(base_config, caplog):
    cfg = config_from_dict(base_config(steps=1, bf16=True))
    with caplog.at_level("WARNING", logger="opd"):
        train(cfg)
    assert "autocast on CUDA only" in caplog.text


def test_tensorboard_mirror(base_config):
    pytest.importorskip("tensorboard")
    cfg = config_from_dict(base_config(preset="supervised_kd", steps=2, report_to=["tensorboard"]))
    train(cfg)
    assert list((Path(cfg.output_dir) / "tensorboard").glob("events.out.tfevents.*"))


def test_example_configs_parse():
    from opd.config.parse import load_config

    for path in sorted(Path(__file__).parents[1].joinpath("examples").glob("*.yaml")):
        if path.name.startswith("accelerate"):
            continue  # an accelerate launcher config, not an opd run config
        cfg = load_config(path, ["data.train=x.jsonl"])
        assert cfg.student.path, path
