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

import dataclasses
import logging
import os
import re
import string
from dataclasses import dataclass
from pathlib import Path

from opd.config import DEFAULT_TOPK, TrainConfig
from opd.extras import require
from opd.rewards import metric_reads_answer

log = logging.getLogger("opd")

# Any one of these makes a directory loadable with AutoTokenizer.from_pretrained.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
MODEL_FILES = ("config.json", "adapter_config.json")


@dataclass
class Checked:
    config: TrainConfig  # with derived values filled in
    train_rows: list[dict]
    eval_rows: list[dict]
    resume_from: Path | None


def looks_local(path: str) -> bool:
    """A path (not a hub id such as `Qwen/Qwen3-1.7B`): absolute, relative, `~`, or deeper."""
    return path.startswith(("/", ".", "~")) or path.count("/") > 1 or "\\" in path


def check_model_path(key: str, path: str, *, tokenizer: bool = True) -> None:
    """A local model directory exists and holds a config and (if asked) tokenizer files."""
    local = Path(path).expanduser()
    if not local.exists():
        if looks_local(path):
            raise FileNotFoundError(
                f"{key}={path}: no such directory; give a model directory (config.json, "
                "weights, tokenizer files) or a hub id such as Qwen/Qwen3-1.7B"
            )
        return  # a hub id: resolved (or refused) by transformers when it loads
    if not local.is_dir():
        raise ValueError(f"{key}={path} is a file; give the model's directory")
    if not any((local / name).is_file() for name in MODEL_FILES):
        raise ValueError(
            f"{key}={path} has no config.json: not a saved model (save it with "
            "model.save_pretrained(dir))"
        )
    if tokenizer and not any((local / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(
            f"{key}={path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); save the "
            "tokenizer next to the weights with tokenizer.save_pretrained(dir)"
        )


def check_device(name: str) -> None:
    if name in ("auto", "cpu"):
        return
    import torch

    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(
                f"device={name} but this machine has no CUDA device (or this torch build has "
                "no CUDA); use device=cpu or device=auto"
            )
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= count:
            raise ValueError(f"device={name} but this machine has {count} CUDA device(s)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device=mps but MPS is not available here; use device=cpu")


def uses_teacher(config: TrainConfig) -> bool:
    """Whether the run asks a teacher anything (SFT on fixed text and pure RL do not)."""
    if config.loss.objective == "ce" and (
        config.source.lmbda == 1.0 or config.source.off_policy == "dataset"
    ):
        return False
    reward = config.reward
    return not (reward.function and reward.distill_weight == 0 and config.source.lmbda == 1)


def dataset_batches(config: TrainConfig) -> bool:
    return config.source.lmbda < 1.0 and config.source.off_policy == "dataset"


def check_extras(config: TrainConfig) -> None:
    if config.teacher.kind == "remote" and uses_teacher(config):
        require("httpx", "teacher.kind=remote")
    if config.lora.enabled:
        require("peft", "lora.enabled=true")
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


def template_fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def check_columns(rows: list[dict], where: str, fields: list[str]) -> None:
    from opd.data import require_fields

    if not rows:
        raise ValueError(f"{where} has no rows")
    require_fields(rows, fields, where)


def train_fields(config: TrainConfig, rows: list[dict] | None = None) -> list[str]:
    data, fields = config.data, [config.data.prompt_field]
    # A `messages` row carries its completion as the last assistant turn (opd.data).
    chat = bool(rows) and isinstance(rows[0].get(data.prompt_field), list)
    if dataset_batches(config) and not chat:
        fields.append(data.completion_field)
    if config.teacher.kind == "self" and uses_teacher(config):
        fields += [f for f in template_fields(config.teacher.privileged_template) if f != "prompt"]
    if config.reward.function and metric_reads_answer(config.reward.function):
        fields.append(data.answer_field)
    return list(dict.fromkeys(fields))


def _needs_answers(metric: str) -> bool:
    return metric_reads_answer(metric)


def check_run_dir(config: TrainConfig) -> Path | None:
    """The checkpoint to resume from (None: a fresh run); refuses to overwrite a run."""
    from opd.checkpoint import check_resume, clean_leftovers, latest_checkpoint
    from opd.config import config_to_dict

    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir={out} is a file; choose a directory")
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


def check_cache(config: TrainConfig) -> TrainConfig:
    """teacher.kind=cached: what the cache can serve; loss.topk=0 becomes the cache's k."""
    from opd.cache.format import is_cache, read_manifest

    train = config.data.train
    cache_dir = config.teacher.cache_dir or (train if train and is_cache(train) else "")
    if not cache_dir:
        raise ValueError(
            "teacher.kind=cached needs the cache: set data.train (or teacher.cache_dir) to a "
            "directory written by `opd generate` / `opd score`"
        )
    if not train or Path(train).resolve() != Path(cache_dir).resolve():
        raise ValueError(
            f"teacher.kind=cached scores only the cache's own rows: set data.train={cache_dir} "
            f"(it is {train!r})"
        )
    if config.source.lmbda > 0:
        raise ValueError(
            f"teacher.kind=cached cannot score student samples but source.lmbda="
            f"{config.source.lmbda}: set source.lmbda=0 (use a local or remote teacher for "
            "on-policy distillation)"
        )
    loss = config.loss
    if loss.objective == "kd" and loss.estimator != "topk":
        raise ValueError(
            "teacher.kind=cached holds top-k log-probs, not full logits: set "
            "loss.estimator=topk (loss.topk defaults to the cache's k)"
        )
    manifest = read_manifest(cache_dir)
    k, temperature = int(manifest["spec"]["topk"]), float(manifest["logprob_temperature"])
    if loss.objective != "kd":
        return config
    if loss.kd_temperature != temperature:
        raise ValueError(
            f"loss.kd_temperature={loss.kd_temperature} but cache {cache_dir} holds teacher "
            f"log-probs at temperature {temperature}"
        )
    if loss.topk > k:
        raise ValueError(
            f"loss.topk={loss.topk} but cache {cache_dir} stores top-{k} log-probs; set "
            f"loss.topk <= {k} (or 0 for the cache's k)"
        )
    if loss.topk == 0:
        log.info("loss.topk=0: using the cache's k, %d", k)
        return _with_loss(config, topk=k)
    return config


def server_info(url: str, token_env: str, timeout_s: float = 5.0) -> dict | None:
    """`/opd/v1/info` of a teacher server; None for a vLLM server or one not up yet."""
    import httpx

    headers = {}
    if os.environ.get(token_env):
        headers["Authorization"] = f"Bearer {os.environ[token_env]}"
    try:
        resp = httpx.get(
            url.rstrip("/") + "/opd/v1/info", headers=headers, timeout=timeout_s, trust_env=False
        )
    except httpx.HTTPError as err:
        log.warning(
            "teacher server %s did not answer (%s); it is checked again at connect", url, err
        )
        return None
    if resp.status_code in (401, 403):
        raise ValueError(
            f"teacher server {url} refused the bearer token (HTTP {resp.status_code}); set the "
            f"environment variable {token_env} (teacher.api_key_env) to the server's token"
        )
    return resp.json() if resp.status_code == 200 else None


def check_remote(config: TrainConfig) -> TrainConfig:
    """teacher.kind=remote: what the server's info endpoint says it accepts."""
    from opd.teachers.remote import check_remote_config

    check_remote_config(config)
    t = config.teacher
    info = server_info(t.url, t.api_key_env)
    if info is None:
        return _default_topk(config, None)
    limits = info["limits"]
    data, sampled = config.data, config.source.lmbda > 0 or not dataset_batches(config)
    completion_keys = {
        "sampling.max_new_tokens": config.sampling.max_new_tokens if sampled else 0,
        "data.max_completion_tokens": data.max_completion_tokens if dataset_batches(config) else 0,
    }
    key = max(completion_keys, key=completion_keys.get)
    longest = data.max_prompt_tokens + completion_keys[key]
    if longest > limits["max_seq_len"]:
        raise ValueError(
            f"teacher server {t.url} scores sequences of at most {limits['max_seq_len']} tokens "
            f"(its --max-seq-len) but one here can reach {longest} (data.max_prompt_tokens="
            f"{data.max_prompt_tokens} + {key}={completion_keys[key]}); lower those or restart "
            "the server with a larger --max-seq-len"
        )
    return _default_topk(config, limits["max_topk"])


def _default_topk(config: TrainConfig, server_max: int | None) -> TrainConfig:
    loss = config.loss
    if loss.objective != "kd" or loss.estimator != "topk":
        return config
    if loss.topk == 0:
        k = DEFAULT_TOPK if server_max is None else min(DEFAULT_TOPK, server_max)
        log.info("loss.topk=0: using %d", k)
        return _with_loss(config, topk=k)
    if server_max is not None and loss.topk > server_max:
        raise ValueError(
            f"loss.topk={loss.topk} but teacher server {config.teacher.url} allows at most "
            f"{server_max} (its --max-topk); set loss.topk <= {server_max}"
        )
    return config


def _with_loss(config: TrainConfig, **changes) -> TrainConfig:
    return dataclasses.replace(config, loss=dataclasses.replace(config.loss, **changes))


def preflight(config: TrainConfig) -> Checked:
    """All checks that need no model; the config with derived values and the data rows."""
    from opd.data import load_rows

    check_extras(config)
    check_device(config.device)
    check_model_path("student.path", config.student.path)
    teacher = config.teacher
    samples_teacher = config.source.lmbda < 1 and config.source.off_policy == "teacher"
    if (uses_teacher(config) and teacher.kind == "local") or samples_teacher:
        if not teacher.path:
            raise ValueError("teacher.kind=local needs teacher.path (a model directory or hub id)")
        check_model_path("teacher.path", teacher.path)
    resume_from = check_run_dir(config)
    if not config.data.train:
        raise ValueError("data.train is required: it provides the prompts (and completions)")
    for key in ("train", "eval"):
        path = getattr(config.data, key)
        if path and not Path(path).exists():
            raise FileNotFoundError(
                f"data.{key}={path}: no such file or directory (JSONL, JSON, Parquet, a "
                "`datasets` directory or an opd cache)"
            )
    train_rows = load_rows(config.data.train, config.data.split)
    fields = train_fields(config, train_rows)
    check_columns(train_rows, f"data.train={config.data.train}", fields)
    eval_rows = []
    if config.data.eval:
        eval_rows = load_rows(config.data.eval, config.data.eval_split)[: config.eval_size]
        fields = [config.data.prompt_field]
        if _needs_answers(config.eval_metric):
            fields.append(config.data.answer_field)
        check_columns(eval_rows, f"data.eval={config.data.eval}", fields)
    if uses_teacher(config) and teacher.kind == "cached":
        config = check_cache(config)
    elif uses_teacher(config) and teacher.kind == "remote":
        config = check_remote(config)
    else:
        config = _default_topk(config, None)
    return Checked(config, train_rows, eval_rows, resume_from)
