"""Everything knowable before a model loads, checked in the first seconds of a run.

With 8B checkpoints every late failure costs minutes, so `build_run` calls `preflight`
first: paths and tokenizer files of the models, the device, installed extras, the data's
columns (prompts, completions the objective needs, the self-teacher's template fields, the
metric's answers), what a teacher cache or a teacher server can serve (its k, its
`max_seq_len` and top-k limit from `/opd/v1/info`), and the run directory (an existing
run without `resume=true`, a resume with nothing left to do). It returns the config with
derived values filled in (`loss.topk=0` -> the cache's or the server's k, logged) and the
rows it read, so they are read once.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from opd.config.checks import uses_teacher
from opd.config.extras import require
from opd.config.parse import TrainConfig, config_to_dict
from opd.config.paths import dir_problem
from opd.data.checks import check_data
from opd.modeling.checks import check_device, check_model_path
from opd.run.lock import hold_run_dir, is_main_process, release_run_dir
from opd.teachers.checks import check_teacher, check_teacher_model

log = logging.getLogger("opd")


@dataclass
class Checked:
    config: TrainConfig  # with derived values filled in
    train_rows: list[dict]
    eval_rows: list[dict]
    resume_from: Path | None


def check_extras(config: TrainConfig) -> None:
    kinds = {config.teacher.kind, *(t.kind for t in config.teachers.values())}
    if "remote" in kinds and uses_teacher(config):
        require("httpx", "teacher.kind=remote")
    if config.lora.enabled:
        require("peft", "lora.enabled=true")
    if config.sampling.engine == "vllm_server":
        require("httpx", "sampling.engine=vllm_server")
    for tracker in config.report_to:
        if tracker != "jsonl":
            require(tracker, f"report_to={tracker}")
    for key in ("train", "eval"):
        path = Path(getattr(config.data, key))
        if not getattr(config.data, key) or not path.exists():
            continue
        if path.suffix == ".parquet":
            require("pyarrow", f"data.{key}={path} (Parquet)")
        elif path.is_dir() and not (path / "manifest.json").is_file():
            require("datasets", f"data.{key}={path} (a datasets directory)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        require("accelerate", "a multi-process run (WORLD_SIZE > 1)")


def check_run_dir(config: TrainConfig) -> Path | None:
    """The checkpoint to resume from (None: a fresh run); refuses to overwrite a run.

    Takes the run directory's lock (`opd.run.lock`) first: a second run writing the same
    directory is refused here, before it could clean up the first one's save in progress.
    The lock is held until `opd.run.loop.train` returns."""
    out = Path(config.output_dir)
    problem = dir_problem(out)
    if problem:
        raise ValueError(f"output_dir={out}: {problem}; choose a directory")
    if is_main_process():  # rank 0 holds it for every rank of a multi-process run
        hold_run_dir(out, "opd train")
    # torch-free until here: `opd train` mistakes fail before torch is imported
    from opd.run.checkpoint import check_resume, clean_leftovers, latest_checkpoint

    clean_leftovers(out)  # of killed or failed saves; before `latest` is looked up
    existing = latest_checkpoint(out)
    if existing is None:
        if config.resume:
            log.info("resume=true but %s holds no checkpoint yet; starting from step 0", out)
        return None
    if not config.resume:
        raise FileExistsError(
            f"output_dir {out} already holds checkpoint {existing.name}; pass resume=true to "
            "continue it or choose another output_dir"
        )
    match = re.fullmatch(r"step-(\d+)", existing.name)
    if match and int(match.group(1)) >= config.steps:
        raise ValueError(
            f"resume=true: {existing} is at step {int(match.group(1))} and steps={config.steps}; "
            "nothing is left to train. Raise steps to train further"
        )
    check_resume(existing, config_to_dict(config), config.resume_allow_changes)
    return existing


def preflight(config: TrainConfig) -> Checked:
    """All checks that need no model, in order (each room checks its own section); the config
    with derived values, computed here once and never changed after, and the data rows. On
    success the run directory stays locked for the run (`check_run_dir`)."""
    try:
        return _preflight(config)
    except BaseException:
        release_run_dir(config.output_dir)
        raise


def _preflight(config: TrainConfig) -> Checked:
    check_extras(config)
    check_device(config.device)
    check_model_path("student.path", config.student.path)
    check_teacher_model(config)
    resume_from = check_run_dir(config)
    train_rows, eval_rows = check_data(config)
    config = check_teacher(config, train_rows)
    return Checked(config, train_rows, eval_rows, resume_from)
