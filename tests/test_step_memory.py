"""Guards on what a training step holds in memory.

The previous micro-batch's teacher scores are released before the next is scored.
"""

import weakref

from opd.config import config_from_dict
from opd.run.loop import train_step
from opd.run.metrics import PhaseTimer
from opd.run.setup import build_run


def test_previous_scores_released_before_the_next_micro_batch_is_scored(base_config, monkeypatch):
    """Plain full-vocabulary kd: each micro-batch's teacher logits are [B, L, V]; two alive
    at once double the step's peak."""
    run = build_run(config_from_dict(base_config(loss__fused=False, steps=1)))
    assert run.config.accumulation >= 2
    refs, alive = [], []
    score = run.teacher.score

    def recording(*args, **kwargs):
        alive.append([r() is not None for r in refs])
        scores = score(*args, **kwargs)
        refs.append(weakref.ref(scores.logits))
        return scores

    monkeypatch.setattr(run.teacher, "score", recording)
    train_step(run, 0, PhaseTimer())
    assert len(alive) == run.config.accumulation
    assert not any(any(a) for a in alive)
