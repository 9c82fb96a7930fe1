"""opd: distil a teacher language model into a student, offline or on-policy, in one loop."""

__version__ = "0.1.0"

from opd.config import TrainConfig, load_config
from opd.loop import train

__all__ = ["TrainConfig", "__version__", "load_config", "train"]
