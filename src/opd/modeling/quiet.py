"""Library output that drowns a run's own: transformers' per-load bars, httpx request lines.

transformers draws a "Loading weights" bar on every `from_pretrained` and a "Writing model
shards" bar on every `save_pretrained`; under opd's own progress bar they garble the
terminal, and an error printed after them is glued to the bar's last line. Downloads from
the hub keep their bars: only loads from a local directory and saves are silenced.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager


@contextmanager
def transformers_bars_off():
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def quiet_http_logs() -> None:
    """One `INFO httpx: HTTP Request` line per request is noise at a CLI's INFO level."""
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)


# vLLM's in-place reload warns "<Layer>: Failed to load weights" for each layer that has
# tensors but received none. Rotary embeddings hold only a cos/sin table computed from the
# config, never a checkpoint weight, so every weight push (one per optimizer step) printed
# one such line per layer (108 lines for 3 steps), though vLLM puts the table back and the
# pushed model matches the student to ~1e-7. Those lines alone are dropped during a push;
# the same warning about any other layer (a projection that really got no weights) stays.
VLLM_RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


class _RotaryReloadNote(logging.Filter):
    def __init__(self):
        super().__init__()
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        layer = record.args[0] if isinstance(record.args, tuple) and record.args else ""
        benign = record.msg == "%s: Failed to load weights" and str(layer).endswith(
            "RotaryEmbedding"
        )
        self.dropped += benign
        return not benign


@contextmanager
def vllm_rotary_reload_notes_off():
    """While pushing weights into vLLM: its warnings about rotary layers that got no weights
    are dropped (yields the filter; `.dropped` counts them)."""
    logger, note = logging.getLogger(VLLM_RELOAD_LOGGER), _RotaryReloadNote()
    logger.addFilter(note)
    try:
        yield note
    finally:
        logger.removeFilter(note)
