"""The teacher section checked before any model loads: the teacher's model files, what a teacher
cache or a teacher server can serve (its k, its `max_seq_len` and top-k limit from
`/opd/v1/info`). `check_teacher` returns the config with the derived `loss.topk` filled in:
this is the one place a value is derived, and nothing after preflight changes the config."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from opd.config.checks import dataset_batches, teacher_need, uses_teacher
from opd.config.parse import TrainConfig
from opd.config.sections import DEFAULT_TOPK
from opd.config.teachers import teacher_configs
from opd.data.cache_format import is_cache, is_token_level, read_manifest
from opd.modeling.checks import check_model_path
from opd.teachers.answer_checks import check_info
from opd.teachers.errors import BadAnswer

log = logging.getLogger("opd")


def check_teacher_model(config: TrainConfig) -> None:
    """A local teacher (or one that samples) names a model directory that holds one."""
    teacher = config.teacher
    samples_teacher = config.source.lmbda < 1 and config.source.off_policy == "teacher"
    if (uses_teacher(config) and teacher.kind == "local") or samples_teacher:
        if not teacher.path:
            raise ValueError("teacher.kind=local needs teacher.path (a model directory or hub id)")
        check_model_path("teacher.path", teacher.path)


def check_teacher(config: TrainConfig, rows: list[dict] = ()) -> TrainConfig:
    """What the teacher can serve; the config with `loss.topk=0` resolved. `rows`: the
    training rows, each of which a `routing.key` must route to a teacher."""
    teacher = config.teacher
    if uses_teacher(config) and teacher.kind == "cached":
        return check_cache(config)
    if uses_teacher(config) and teacher.kind == "remote":
        return check_remote(config, rows)
    if uses_teacher(config) and teacher.kind == "routed":
        return check_teachers(config, rows)
    return _default_topk(config, None)


def check_cache(config: TrainConfig) -> TrainConfig:
    """teacher.kind=cached: what the cache can serve; loss.topk=0 becomes the cache's k."""
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
    if not is_token_level(manifest):
        raise ValueError(
            f"teacher.kind=cached needs token log-probs but cache {cache_dir} holds text "
            f"({manifest['tokenizer']['check']}); train SeqKD on it with loss.objective=ce "
            "(no teacher is asked), or rebuild it with a --tokenizer the server shares"
        )
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
    """`/opd/v1/info` of a teacher server; None for a vLLM server or one not up yet (or one
    whose answer is unusable: connecting checks it again, with retries). The answer is read
    within a byte bound and a deadline, and checked (`opd.teachers.answer_checks`)."""
    import httpx  # opd[serve]: imported only when a remote teacher is used

    from opd.teachers.bounded_http import INFO_BYTES, get_sync, parse_json

    headers = {}
    if os.environ.get(token_env):
        headers["Authorization"] = f"Bearer {os.environ[token_env]}"
    path = "/opd/v1/info"
    try:
        status, raw = get_sync(
            url.rstrip("/") + path,
            server=url,
            headers=headers,
            max_bytes=INFO_BYTES,
            deadline_s=timeout_s,
        )
        if status == 200:
            return check_info(url, parse_json(url, path, raw))
    except (httpx.HTTPError, BadAnswer) as err:
        log.warning(
            "teacher server %s did not answer usably (%s); it is checked again at connect",
            url,
            err,
        )
        return None
    if status in (401, 403):
        raise ValueError(
            f"teacher server {url} refused the bearer token (HTTP {status}); set the "
            f"environment variable {token_env} (teacher.api_key_env) to the server's token"
        )
    return None


def other_tokenizers(config: TrainConfig):
    """(student's, teacher's) tokenizer when `cross_tokenizer.teacher_tokenizer` names a
    teacher tokenizer that needs alignment, else None."""
    if not config.cross_tokenizer.teacher_tokenizer:
        return None
    # transformers and torch: after the run directory check (opd.run.preflight)
    from opd.modeling.hf import load_tokenizer
    from opd.teachers.cross_tokenizer.build import needs_alignment

    student = load_tokenizer(config.student.path)
    teacher = load_tokenizer(config.cross_tokenizer.teacher_tokenizer)
    return (student, teacher) if needs_alignment(config, student, teacher) else None


def check_remote(config: TrainConfig, rows: list[dict] = ()) -> TrainConfig:
    """teacher.kind=remote: what the server's info endpoint says it accepts. With a teacher
    of another tokenizer each row is counted in the teacher's tokens (`rows`: data.train)."""
    check_remote_config(config)
    t = config.teacher
    # Replicas must agree on their limits (checked at connect): the first that answers speaks.
    url, info = next(
        ((u, i) for u in t.servers if (i := server_info(u, t.api_key_env)) is not None),
        (t.servers[0], None),
    )
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
    pair = other_tokenizers(config) if rows else None
    if pair is not None:  # the teacher's own token counts, row by row
        from opd.teachers.cross_tokenizer.limits import longest_teacher_row, too_long_message

        worst = longest_teacher_row(
            config, list(rows), *pair, sampled=sampled, dataset=dataset_batches(config)
        )
        if worst is not None and worst.total > limits["max_seq_len"]:
            raise ValueError(too_long_message(url, limits["max_seq_len"], worst, config))
    elif longest > limits["max_seq_len"]:
        raise ValueError(
            f"teacher server {url} scores sequences of at most {limits['max_seq_len']} tokens "
            f"(its --max-seq-len) but one here can reach {longest} (data.max_prompt_tokens="
            f"{data.max_prompt_tokens} + {key}={completion_keys[key]}); lower those or restart "
            "the server with a larger --max-seq-len"
        )
    return _default_topk(config, limits["max_topk"], url)


def _default_topk(config: TrainConfig, server_max: int | None, url: str = "") -> TrainConfig:
    loss = config.loss
    if loss.objective != "kd" or loss.estimator != "topk":
        return config
    if loss.topk == 0:
        k = DEFAULT_TOPK if server_max is None else min(DEFAULT_TOPK, server_max)
        log.info("loss.topk=0: using %d", k)
        return _with_loss(config, topk=k)
    if server_max is not None and loss.topk > server_max:
        raise ValueError(
            f"loss.topk={loss.topk} but teacher server {url} allows at most "
            f"{server_max} (its --max-topk); set loss.topk <= {server_max}"
        )
    return config


def check_teachers(config: TrainConfig, rows: list[dict]) -> TrainConfig:
    """Several teachers: each one's checks, a top-k all can serve, every row routed."""
    topk = []
    for name, one in teacher_configs(config).items():
        t = one.teacher
        if t.kind == "local":
            check_model_path(f"teachers.{name}.path", t.path)
        elif t.kind == "cached":
            raise ValueError(
                f"teachers.{name}: kind=cached is not available among several teachers"
            )
        elif t.kind == "remote":
            try:
                topk.append(check_remote(one, rows).loss.topk)
            except ValueError as err:
                raise ValueError(f"teachers.{name}: {err}") from None
    config = _default_topk(config, None)
    if topk and config.loss.topk:
        config = _with_loss(config, topk=min(config.loss.topk, *topk))
    routing = config.routing
    if routing.key and not routing.default:
        for i, row in enumerate(rows):
            value = row.get(routing.key)
            if value is None or str(value) not in routing.map:
                raise ValueError(
                    f"data.train={config.data.train} row {i + 1}: routing.key={routing.key!r} "
                    f"value {value!r} names no teacher; routing.map knows "
                    f"{', '.join(map(repr, routing.map))} (teachers: "
                    f"{', '.join(config.teachers)}); add it or set routing.default"
                )
    return config


def _with_loss(config: TrainConfig, **changes) -> TrainConfig:
    return dataclasses.replace(config, loss=dataclasses.replace(config.loss, **changes))


def check_remote_config(config) -> None:
    """What a run config must say for any remote teacher (no server contact)."""
    if not config.teacher.servers:
        raise ValueError(
            "teacher.url (or teacher.urls, for replicas) is required for teacher.kind='remote' "
            "(e.g. http://127.0.0.1:8000)"
        )
    if teacher_need(config.loss)[0] == "logits":
        raise ValueError(
            "teacher.kind='remote' returns token and top-k log-probs, not full logits: set "
            "loss.estimator=topk (with loss.topk within the server's --max-topk) or "
            "loss.objective=pg"
        )
