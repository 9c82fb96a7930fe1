"""A SentencePiece-style teacher behind a real vLLM server, a byte-level BPE student: the
client checks the server's tokenizer by vLLM's /tokenize, then distills across them."""

from __future__ import annotations

import math

import pytest

from opd.config.parse import config_from_dict
from opd.modeling.hf import load_tokenizer
from opd.run.loop import train
from opd.run.metrics import read_metrics
from opd.teachers.remote import RemoteTeacher
from real_format import write_data
from sp_format import save_cross_pair
from vllm_util import vllm_or_skip, vllm_server

vllm_or_skip()


@pytest.fixture(scope="module")
def sp_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("cross_vllm")
    teacher, student = save_cross_pair(root, heads=2)
    with vllm_server(teacher, root / "server.log") as url:
        yield url, teacher, student, write_data(root, "plain", "jsonl")


def test_vllm_tokenize_check_and_three_pg_steps(sp_server, tmp_path):
    url, teacher, student, data = sp_server
    with pytest.raises(ValueError, match="tokenizes a probe text"):
        RemoteTeacher(url, max_retries=0, tokenizer=load_tokenizer(str(student))).close()
    for loss in ({"objective": "pg"}, {"objective": "kd", "estimator": "topk", "topk": 8}):
        run_three_steps(url, teacher, student, data, tmp_path / loss["objective"], loss)


def run_three_steps(url, teacher, student, data, out, loss):
    cfg = config_from_dict(
        {
            "student": {"path": str(student)},
            "teacher": {"kind": "remote", "url": url},
            "cross_tokenizer": {"teacher_tokenizer": str(teacher)},
            "data": {"train": str(data), "max_prompt_tokens": 64},
            "loss": loss,
            "source": {"lmbda": 1.0},
            "steps": 3,
            "batch_size": 4,
            "micro_batch_size": 2,
            "sampling": {"max_new_tokens": 12},
            "output_dir": str(out),
        }
    )
    train(cfg)
    records = read_metrics(cfg.output_dir)
    assert len(records) == 3 and not any(r["skipped"] for r in records)
    for r in records:
        assert math.isfinite(r["loss"]) and r["divergence"] != 0
        assert 0 < r["xtok_aligned_frac"] <= 1 and r["teacher_tokens_scored"] > 0
