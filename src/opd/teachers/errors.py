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


class BadAnswer(RuntimeError):
    """A teacher server answered something unusable (wrong shape, ids outside the
    vocabulary, impossible log-probs, not JSON, too large, too slow). Retryable: another
    attempt, or another replica, may answer well; nothing of this answer is used."""

    def __init__(self, server: str, problem: str):
        self.server, self.problem = server, problem
        super().__init__(f"teacher server {server} sent an unusable answer: {problem}")
