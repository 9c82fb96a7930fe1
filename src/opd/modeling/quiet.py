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
