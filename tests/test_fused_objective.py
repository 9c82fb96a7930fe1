"""The loop's fused kd path equals the plain full-logits path."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opd.batch import assemble
from opd.checkpoint import latest_checkpoint
from opd.config import LossConfig, config_from_dict
from opd.loop import train
from opd.modeling.hf import completion_logits, load_causal_lm, load_tokenizer
from opd.objectives.fused import fused_applies, fused_batch_loss, teacher_hidden
from opd.objectives.plain import batch_loss
from opd.run_setup import build_run
from opd.teachers.local import LocalTeacher


@pytest.mark.parametrize(
    "kind,beta", [("forward_kl", None), ("reverse_kl", None), ("jsd", 0.3), ("tvd", None)]
)
def test_fused_batch_loss_equals_plain(kind, beta, tiny_pair):
    teacher_dir, student_dir = tiny_pair
    tok = load_tokenizer(str(student_dir))
    student = load_causal_lm(str(student_dir))
    teacher = LocalTeacher(load_causal_lm(str(teacher_dir)), len(tok))
    batch = assemble(
        [tok("12+3=").input_ids, tok("7=").input_ids],
        [[*tok("15").input_ids, 1], [9, 9, 1]],
        pad_id=tok.pad_token_id,
    )
    loss_cfg = LossConfig(objective="kd", divergence=kind, beta=beta or 0.5, kd_temperature=1.5)
    assert fused_applies(loss_cfg, student, teacher)
    n = batch.num_target_tokens() + 3  # a step count larger than this micro-batch's
    plain, div_plain = batch_loss(
        completion_logits(student, batch, len(tok)),
        batch,
        teacher.score(batch, "logits"),
        loss_cfg,
        n,
    )
    g_plain = torch.autograd.grad(plain, list(student.parameters()))
    fused, div_fused = fused_batch_loss(
        student, teacher, teacher_hidden(teacher, batch), batch, loss_cfg, n, len(tok)
    )
    g_fused = torch.autograd.grad(fused, list(student.parameters()), allow_unused=True)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-7)
    assert div_fused == pytest.approx(div_plain, rel=1e-5)
    for a, b in zip(g_fused, g_plain, strict=True):
        torch.testing.assert_close(
            a if a is not None else torch.zeros_like(b), b, rtol=1e-4, atol=1e-6
        )


def test_loop_uses_fused_path_and_matches_plain_run(base_config, tmp_path):
    fused_cfg = config_from_dict(base_config(preset="gkd", steps=3, output_dir=str(tmp_path / "f")))
    assert build_run(fused_cfg).fused
    train(fused_cfg)
    plain_cfg = config_from_dict(
        base_config(preset="gkd", steps=3, loss__fused=False, output_dir=str(tmp_path / "p"))
    )
    assert not build_run(plain_cfg).fused
    train(plain_cfg)
    a = load_file(str(Path(latest_checkpoint(tmp_path / "f")) / "model.safetensors"))
    b = load_file(str(Path(latest_checkpoint(tmp_path / "p")) / "model.safetensors"))
    for key in a:
        # Adam divides by sqrt(v): float32 rounding in near-zero gradients shows up at ~1e-6.
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=2e-5)
