"""Library noise kept out of a run's log, and nothing else (opd.modeling.quiet)."""

import logging

from opd.modeling.quiet import VLLM_RELOAD_LOGGER, vllm_rotary_reload_notes_off


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_only_rotary_reload_warnings_are_dropped_and_only_during_a_push():
    """The records vLLM's reload makes (`logger.warning("%s: Failed to load weights", name)`
    on its own logger): rotary layers' are dropped inside the context, every other layer's
    and every other message pass, and outside the context all pass."""
    logger, seen = logging.getLogger(VLLM_RELOAD_LOGGER), Records()
    logger.addHandler(seen)
    try:
        with vllm_rotary_reload_notes_off() as notes:
            for layer in ("RotaryEmbedding", "Llama3RotaryEmbedding", "QKVParallelLinear"):
                logger.warning("%s: Failed to load weights", layer)
            logger.warning("%s: something else", "RotaryEmbedding")
        logger.warning("%s: Failed to load weights", "RotaryEmbedding")
    finally:
        logger.removeHandler(seen)
    assert notes.dropped == 2
    assert seen.messages == [
        "QKVParallelLinear: Failed to load weights",
        "RotaryEmbedding: something else",
        "RotaryEmbedding: Failed to load weights",  # after the push: not filtered
    ]
