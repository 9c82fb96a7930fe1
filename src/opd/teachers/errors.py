"""Failures of a teacher that lives elsewhere (no dependencies, so the CLI can catch them)."""

from __future__ import annotations


class TeacherUnavailable(RuntimeError):
    """The teacher server did not answer after every retry; the run stops here.

    Checkpoints are written atomically, so the last one stays intact: restart the server
    and run again with `resume=true`.
    """

    def __init__(self, url: str, attempts: int, seconds: float, last_error: str):
        self.url, self.attempts, self.seconds, self.last_error = url, attempts, seconds, last_error
        super().__init__(
            f"teacher server {url} is unavailable: {attempts} attempt(s) over {seconds:.1f} s "
            f"failed (last error: {last_error}). The run stopped and its last checkpoint is "
            "intact; once the server is back, rerun with resume=true."
        )


class TeacherRequestError(ValueError):
    """The teacher server refused a request (4xx); retrying would not help."""
