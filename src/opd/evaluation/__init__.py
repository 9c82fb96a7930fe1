"""Evaluation: sampling and task accuracy (`generation`), divergences to the teacher and the
exposure-bias gap (`divergence`), answer metrics and reward functions (`rewards`)."""
