"""Keep the demo's console to its own progress bars.

`from_pretrained` and `save_pretrained` of transformers 5 draw a progress bar per call
("Loading weights", "Writing model shards"); the demo loads and saves a dozen tiny models,
which printed dozens of such lines around its own phase bars.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from transformers.utils import logging as hf_logging


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """No transformers progress bars, only its errors, and not its deprecation notice for
    `past_key_values`, inside; restored on exit."""
    bars_were_on = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            # the reference sampler's HF forward call (opd generate) is deprecated in 5.x
            warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars_were_on:
            hf_logging.enable_progress_bar()
