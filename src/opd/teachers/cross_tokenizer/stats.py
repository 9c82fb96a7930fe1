"""How well a student batch aligned: per-step metrics and a warning on a poor first batch."""

from __future__ import annotations

import logging

from opd.teachers.cross_tokenizer.render import CUT_REASONS, RowAlignment

log = logging.getLogger("opd")
WARN_BELOW = 0.5  # aligned fraction (pg) or one-to-one fraction (kd) below which to warn
MOVED_NATS = 0.1  # a span end counts as moved (`xtok_boundary_moved_frac`) above this


class AlignmentStats:
    def __init__(self):
        self.counts = self._zero()
        self.checked = False  # the first batch was checked (a warning if it aligns poorly)

    @staticmethod
    def _zero() -> dict:
        return {"tokens": 0, "aligned": 0, "one_to_one": 0, "spans": 0, "rows": 0,
                "ends": 0, "ends_moved": 0, "moved_nats": 0.0,
                **{f"cut_{r}": 0 for r in CUT_REASONS}}  # fmt: skip

    def add_boundary(self, leaks, ends) -> None:
        """The boundary terms moved to the next span (`boundary.BoundaryMarginal.scores`):
        `leaks` `[B, Lt]` (<= 0) at the span ends `ends` `[B, Lt]` bool."""
        moved = -leaks[ends.to(leaks.device)]
        self.counts["ends"] += int(moved.numel())
        self.counts["ends_moved"] += int((moved > MOVED_NATS).sum())
        self.counts["moved_nats"] += float(moved.sum())

    def add(self, rows: list[RowAlignment], need: str) -> None:
        c = self.counts
        for row in rows:
            two = [s for s in row.alignment.spans if s.two_sided]
            c["rows"] += 1
            c["tokens"] += row.student_len
            c["aligned"] += row.aligned_tokens
            c["spans"] += len(two)
            c["one_to_one"] += sum(s.one_to_one for s in two)
            if row.cut is not None:
                c[f"cut_{row.cut}"] += 1
        if not self.checked:
            self.checked = True
            warn_if_poor(rows, need)

    def record(self) -> dict:
        """Fields since the last call: the aligned fraction of completion tokens (pg scores
        them), the one-to-one fraction (kd compares distributions there), the mean span
        length in student tokens, rows whose tail was masked (and why); with the boundary
        rule, the fraction of span ends whose "no merge" term moved more than `MOVED_NATS`
        to the next span, and the nats moved per span end."""
        c, self.counts = self.counts, self._zero()
        out = {
            "xtok_aligned_frac": c["aligned"] / max(c["tokens"], 1),
            "xtok_one_to_one_frac": c["one_to_one"] / max(c["tokens"], 1),
            "xtok_mean_span_len": c["aligned"] / max(c["spans"], 1),
            "xtok_rows_masked": sum(c[f"cut_{r}"] for r in CUT_REASONS),
        }
        if c["ends"]:  # cross_tokenizer.boundary=marginal, pg
            out["xtok_boundary_moved_frac"] = c["ends_moved"] / c["ends"]
            out["xtok_boundary_nats_per_end"] = c["moved_nats"] / c["ends"]
        out.update({f"xtok_rows_cut_{r}": c[f"cut_{r}"] for r in CUT_REASONS if c[f"cut_{r}"]})
        return out


def warn_if_poor(rows: list[RowAlignment], need: str) -> None:
    tokens = max(sum(r.student_len for r in rows), 1)
    aligned = sum(r.aligned_tokens for r in rows) / tokens
    ones = sum(s.one_to_one for r in rows for s in r.alignment.spans) / tokens
    masked = sum(r.cut is not None for r in rows)
    if need == "token" and (aligned < WARN_BELOW or masked):
        log.warning(
            "teacher with another tokenizer: %.0f%% of the first batch's completion tokens "
            "align (%d of %d rows masked from a cut): the rest add nothing to the loss",
            100 * aligned, masked, len(rows),
        )  # fmt: skip
    elif need != "token" and ones < WARN_BELOW:
        log.warning(
            "teacher with another tokenizer: only %.0f%% of the first batch's completion "
            "tokens are one-to-one with a teacher token, the positions kd compares "
            "distributions at; loss.objective=pg compares every aligned span exactly",
            100 * ones,
        )
