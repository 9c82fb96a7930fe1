"""Teacher scoring one micro-batch ahead: micro-batch i+1 is scored while i is back-propagated.

A remote teacher spends a step waiting on the network; the student's backward does not
need it. With `teacher.overlap` (on by default) and a teacher that says it `overlaps`
(remote, replicas included; several teachers if all of them do), `objective.score(batch
i+1)` runs in a worker thread as soon as the scores of micro-batch i are handed over, so
each wait hides behind a backward. Scores
do not depend on the student, so the losses equal the serial order's bit for bit (tested);
only `time_teacher_score` shrinks: it is the time the loop waited, not the time scoring took.

Local and self teachers run serially: their forward would compete with the student's on the
same device (and a live self teacher reads the weights being back-propagated). With overlap
two micro-batches' scores exist at once; a remote teacher's are top-k or token log-probs.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch


def overlaps(config, teacher) -> bool:
    return bool(config.teacher.overlap and getattr(teacher, "overlaps", False))


class ScoreAhead:
    """Iterates the micro-batches (on the device); `scored(i)` is micro-batch i's scores."""

    def __init__(self, objectives, batches: list, device: torch.device, ahead: bool):
        self.objectives, self.batches, self.device = objectives, batches, device
        self._on_device: dict[int, object] = {}
        self._futures: dict[int, Future] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="opd-score") if ahead else None

    def batch(self, i: int):
        if i not in self._on_device:
            self._on_device[i] = self.batches[i].to(self.device)
        return self._on_device[i]

    def _score(self, i: int):
        batch = self.batch(i)
        with torch.no_grad():  # grad mode is per thread: the worker's own, off
            return self.objectives.for_batch(batch).score(batch)

    def scored(self, i: int):
        """Micro-batch i's scores; with overlap, starts scoring i+1 before returning."""
        if self._pool is None:
            result = self._score(i)
        else:
            future = self._futures.pop(i, None) or self._pool.submit(self._score, i)
            result = future.result()
            if i + 1 < len(self.batches):
                self.batch(i + 1)  # moved by this thread, before the worker reads it
                self._futures[i + 1] = self._pool.submit(self._score, i + 1)
        self._on_device.pop(i, None)  # the loop holds it while it needs it
        return result

    def __iter__(self):
        try:
            for i in range(len(self.batches)):
                yield self.batch(i)
        finally:  # the step ended (or a backward raised): no scoring is left to wait for
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
