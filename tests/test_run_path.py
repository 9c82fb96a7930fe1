"""opd.run.path: one decision of the objective implementation, samplers and teacher, logged
and written beside the config; the run takes the path it names."""

from __future__ import annotations

import json
import logging

from opd.config.parse import config_from_dict
from opd.objectives import for_step
from opd.objectives.fused import FusedObjective
from opd.objectives.fused_tokens import FusedTokenObjective
from opd.objectives.plain import PlainObjective
from opd.run.loop import train
from opd.run.path import decide_path
from opd.run.setup import build_run


def _path(base_config, distributed=False, **overrides):
    run = build_run(config_from_dict(base_config(**overrides)))
    path = decide_path(run.config, distributed=distributed, student=run.student, teacher=run.teacher)
    return run, path


def test_each_decision_and_the_objective_the_step_builds(base_config):
    run, path = _path(base_config, preset="on_policy")
    assert (path.objective, path.sampler, path.other_sampler) == ("fused_tokens", "auto", "auto")
    # the tests' tiny Llama is one the lean forward covers: the student samples and trains
    # on it, the local teacher scores its sampled tokens from it
    assert path.decoders == "sampling lean (auto), forward: student lean, teacher lean (auto)"
    _, path = _path(base_config, preset="on_policy", sampling__engine="hf", loss__fused_forward="hf")
    assert path.decoders == ""
    assert path.teacher_need == ("token", 0) and path.teacher == "local"
    assert isinstance(for_step(run).distill, FusedTokenObjective)

    run, path = _path(base_config, preset="gkd", loss__estimator="full")
    assert path.objective == "fused_full" and path.teacher_need == ("logits", 0)
    assert path.decoders.endswith("forward: student lean, teacher lean (auto)")
    assert isinstance(for_step(run).distill, FusedObjective)

    run, path = _path(base_config, preset="on_policy", loss__fused=False)
    assert path.objective == "plain" and "loss.fused=false" in path.objective_why
    assert isinstance(for_step(run).distill, PlainObjective)

    # under DDP/FSDP the fused objectives run as the wrapper's forward
    _, path = _path(base_config, distributed=True, preset="on_policy")
    assert path.objective == "fused_tokens"
    _, path = _path(base_config, distributed=True, preset="gkd", loss__estimator="full")
    assert path.objective == "fused_full"

    run, path = _path(
        base_config, preset="on_policy", reward__function="exact_match", reward__normalize="none"
    )
    assert path.rewarded == "fused_tokens"
    assert isinstance(for_step(run).rewarded.distill, FusedTokenObjective)

    _, path = _path(base_config, preset="seqkd", source__off_policy="dataset")
    assert path.teacher == "none" and path.teacher_need == (None, 0)


def test_the_run_logs_its_path_in_one_line_and_writes_it(base_config, caplog, tmp_path):
    config = config_from_dict(base_config(preset="on_policy", steps=1))
    with caplog.at_level(logging.INFO, logger="opd"):
        train(config)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("path: ")]
    assert len(lines) == 1
    assert "objective: fused" in lines[0] and "sampler: auto" in lines[0]
    assert "decoders: sampling lean (auto)" in lines[0]
    assert "teacher: local, asked for sampled-token log-probs" in lines[0]
    written = json.loads((tmp_path / "run" / "run_path.json").read_text())
    assert written["objective"] == "fused_tokens" and written["sampler"] == "auto"
