"""The dtype a teacher server scores in, said in the log where the server tells it.

A float32 teacher served in bfloat16 scores differently, and a client cannot see it in the
scores. `opd serve` reports its weights' dtype in `/opd/v1/info`. vLLM's `/v1/models` has no
such field (its model card: id, object, created, owned_by, root, parent, max_model_len,
permission); its `/server_info` carries the whole engine config, but only on a server started
with VLLM_SERVER_DEV_MODE=1. Otherwise the run warns: vLLM's default `--dtype auto` runs a
float32 checkpoint in 16 bits.
"""

from __future__ import annotations

import logging

from opd.teachers.errors import BadAnswer, TeacherRequestError
from opd.teachers.replicas import ReplicaFailed

log = logging.getLogger("opd")


async def served_dtype(pool, protocol: str, info: dict) -> str | None:
    """The first replica's dtype, or None where the server does not say it."""
    if protocol != "vllm":
        return info.get("dtype")
    try:
        got = await pool.request(pool.replicas[0], "GET", "/server_info?config_format=json", ok404=True)
        dtype = (got or {})["vllm_config"]["model_config"]["dtype"]
    except (TeacherRequestError, ReplicaFailed, BadAnswer, KeyError, TypeError):
        return None
    return str(dtype).removeprefix("torch.")


def report_dtype(url: str, model: str, dtype: str | None) -> None:
    if dtype is not None:
        log.info("teacher %r at %s scores in %s (the server's --dtype)", model, url, dtype)
        return
    log.warning(
        "teacher %s does not report the dtype it runs in (vLLM's /v1/models has none; its "
        "/server_info needs VLLM_SERVER_DEV_MODE=1): vLLM's default --dtype auto runs a float32 "
        "checkpoint in 16 bits; start it with --dtype float32 (or the dtype you mean)",
        url,
    )
