"""The run's progress as one typed object: the step reached, consecutive skipped steps and the
running totals (tokens generated and scored, seconds per phase) that cost accounting reads.
It is what a checkpoint stores besides weights, optimizer, schedule and RNG."""

from __future__ import annotations

from dataclasses import dataclass, field

TOTAL_KEYS = ("student_tokens_generated", "teacher_tokens_generated", "teacher_tokens_scored")


def _empty_totals() -> dict:
    return {**dict.fromkeys(TOTAL_KEYS, 0), "seconds": {}}


@dataclass
class RunState:
    """Attributes:
    step: optimizer steps done (the next step is `step + 1`).
    bad_steps: consecutive steps skipped for a non-finite loss or gradient.
    totals: tokens generated/scored so far and seconds per phase (`time_*` keys); with
        several teachers (`teachers:`), `teachers: {name: {tokens_scored, seconds,
        failovers}}` too, each teacher's share of the cost.
    """

    step: int = 0
    bad_steps: int = 0
    totals: dict = field(default_factory=_empty_totals)

    @classmethod
    def from_trainer_state(cls, state: dict) -> RunState:
        return cls(step=state["step"], bad_steps=state["bad_steps"], totals=state["totals"])

    def checkpoint_fields(self) -> dict:
        return {"totals": self.totals, "bad_steps": self.bad_steps}

    def count_skip(self, record: dict) -> None:
        """A finished step: `step` advances; `bad_steps` counts consecutive skipped steps."""
        self.step = record["step"]
        if record.get("scale_overflow"):  # fp16 loss scale too high: the scaler's to handle
            return
        self.bad_steps = self.bad_steps + 1 if record["skipped"] else 0

    def add_totals(self, record: dict, seconds: dict[str, float]) -> None:
        """The step's tokens and phase times; the record gains the running `total_*` values."""
        for key in TOTAL_KEYS:
            self.totals[key] += record[key]
            record[f"total_{key}"] = self.totals[key]
        for key, value in seconds.items():
            self.totals["seconds"][key] = self.totals["seconds"].get(key, 0.0) + value
        for name in teacher_names(record):
            mine = self.totals.setdefault("teachers", {}).setdefault(name, _empty_teacher())
            for key, column in PER_TEACHER.items():
                mine[key] += record[f"teacher_{name}_{column}"]
                record[f"total_teacher_{name}_{key}"] = mine[key]


# a total per teacher of several (`opd.teachers.routing` step records): total key <- field
PER_TEACHER = {"tokens_scored": "tokens", "seconds": "seconds", "failovers": "failovers"}


def _empty_teacher() -> dict:
    return {"tokens_scored": 0, "seconds": 0.0, "failovers": 0}


def teacher_names(record: dict) -> list[str]:
    """The teachers of a several-teacher step record (each has a `teacher_<name>_share`)."""
    return [k[8:-6] for k in record if k.startswith("teacher_") and k.endswith("_share")]
