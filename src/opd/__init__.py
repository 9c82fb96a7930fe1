"""opd: distil a teacher language model into a student, offline or on-policy, in one loop."""

__version__ = "0.1.0"
