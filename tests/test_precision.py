"""Training precision: gradient checkpointing, float32 master weights, the fp16 loss scaler.

Each variant is checked against the plain run on the same data: checkpointing recomputes
the same activations, and a power-of-two loss scale is exact in float32, so both leave the
weights where the plain run leaves them.
"""

import pytest
import torch
from safetensors.torch import load_file

from opd.config.parse import config_from_dict
from opd.run.checkpoint import latest_checkpoint, load_trainer_state
from opd.run.loop import train
from opd.run.metrics import read_metrics
from opd.run.setup import build_run


def _weights(run_dir) -> dict:
    ckpt = latest_checkpoint(run_dir)
    name = "adapter_model.safetensors" if (ckpt / "adapter_model.safetensors").exists() else None
    return load_file(str(ckpt / (name or "model.safetensors")))


def _max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _saved_tensors(run) -> int:
    """Tensors the student's training forward keeps for backward, on one batch."""
    ids = torch.tensor([list(range(5, 21))])
    count = [0]

    def pack(t):
        count[0] += 1
        return t

    run.student.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run.student(input_ids=ids).logits.sum().backward()
    run.student.zero_grad(set_to_none=True)
    return count[0]


@pytest.mark.parametrize(
    "extra",
    [
        {"preset": "supervised_kd"},  # the default (fused) objective path
        {"preset": "supervised_kd", "loss__fused": False},  # full logits
        {"preset": "on_policy", "lora__enabled": True},
    ],
    ids=["fused", "plain", "lora"],
)
def test_gradient_checkpointing_steps_equal_the_plain_ones(base_config, tmp_path, extra):
    plain = base_config(steps=2, output_dir=str(tmp_path / "plain"), **extra)
    ckpt = base_config(steps=2, output_dir=str(tmp_path / "ckpt"), **extra)
    ckpt["student"]["gradient_checkpointing"] = True
    on = build_run(config_from_dict(ckpt))
    model = on.student.get_base_model() if "lora__enabled" in extra else on.student
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    off = build_run(config_from_dict(plain))
    # really recomputing: the layers keep only their inputs for backward
    assert _saved_tensors(on) < _saved_tensors(off) / 2
    train(config_from_dict(plain))
    train(config_from_dict(ckpt))
    assert _max_diff(_weights(tmp_path / "plain"), _weights(tmp_path / "ckpt")) < 1e-6
    a, b = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "ckpt")
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-6)


@pytest.mark.parametrize("dtype,flag", [("bfloat16", "bf16"), ("float16", "fp16")])
def test_full_training_in_16_bits_is_refused_naming_the_keys(base_config, dtype, flag):
    with pytest.raises(ValueError, match=rf"student\.dtype={dtype} with full fine-tuning: .*no "
                       rf"float32 master copy.*Set student\.dtype=float32 and {flag}=true"):
        config_from_dict(base_config(student__dtype=dtype))
    with pytest.raises(ValueError, match="choose one autocast dtype"):
        config_from_dict(base_config(bf16=True, fp16=True))
    with pytest.raises(ValueError, match=r"set loss\.fused_forward=hf"):
        config_from_dict(base_config(student__gradient_checkpointing=True, loss__fused_forward="lean"))


def test_lora_on_a_16_bit_base_trains_float32_adapters(base_config):
    run = build_run(config_from_dict(base_config(student__dtype="bfloat16", lora__enabled=True)))
    trained = [p for p in run.student.parameters() if p.requires_grad]
    frozen = [p for p in run.student.parameters() if not p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert run.scaler is None  # bfloat16 has float32's range: nothing to scale


def test_fp16_loss_scaler_is_exact_skips_overflows_and_resumes(base_config, tmp_path):
    """fp16=true on CPU: autocast applies on CUDA only, the scaler runs anyway, so the run
    must equal the float32 run (a power-of-two scale is exact); a scale that overflows skips
    the update, halves, and is no bad step; the scale is checkpointed."""
    plain = base_config(preset="supervised_kd", steps=2, output_dir=str(tmp_path / "p"))
    scaled = {**plain, "fp16": True, "output_dir": str(tmp_path / "s")}
    train(config_from_dict(plain))
    train(config_from_dict(scaled))
    assert _max_diff(_weights(tmp_path / "p"), _weights(tmp_path / "s")) == 0.0
    assert [r["loss_scale"] for r in read_metrics(tmp_path / "s")] == [2.0**16] * 2
    assert load_trainer_state(latest_checkpoint(tmp_path / "s"))["scaler"]["scale"] == 2.0**16

    huge = {**scaled, "output_dir": str(tmp_path / "h"), "steps": 3, "max_bad_steps": 1}
    run = build_run(config_from_dict(huge))
    # loss x 2**127 is inf in float32; after it the scale drops to 2**27, which is exact
    run.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, backoff_factor=2.0**-100)
    train(run.config, run)  # max_bad_steps=1: an overflow counted as bad would stop the run
    records = read_metrics(tmp_path / "h")
    assert records[0]["skipped"] and records[0]["scale_overflow"]
    assert records[0]["loss_scale"] == 2.0**27
    assert len(records) == 3 and not any(r["skipped"] for r in records[1:])
    scale = load_trainer_state(latest_checkpoint(tmp_path / "h"))["scaler"]["scale"]
    assert scale == records[-1]["loss_scale"]
