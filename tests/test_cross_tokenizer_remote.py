"""A teacher with another tokenizer behind `opd serve` (both client protocols)."""

from __future__ import annotations

import json
import math
import threading

import pytest
import torch

from opd.config.parse import config_from_dict
from opd.config.sections import DataConfig
from opd.data.batch import assemble
from opd.data.encoding import Encoder
from opd.modeling.hf import load_tokenizer
from opd.run.lock import release_run_dir
from opd.run.loop import train
from opd.run.metrics import read_metrics
from opd.run.preflight import preflight
from opd.teachers.cross_tokenizer.teacher import CrossTokenizerTeacher
from opd.teachers.local import LocalTeacher
from opd.teachers.remote import RemoteTeacher
from opd.teachers.server.protocol import Limits
from real_format import write_data
from serve_util import LIMITS, TOKEN, start_server
from sp_format import save_cross_pair, tiny_model

WIDE = Limits(**{**LIMITS.__dict__, "max_seq_len": 256, "max_batch_tokens": 4096})


@pytest.fixture(scope="module")
def served_sp(tmp_path_factory):
    root = tmp_path_factory.mktemp("cross_remote")
    teacher, student = save_cross_pair(root)
    server, _ = start_server(teacher, limits=WIDE)
    yield server, teacher, student, write_data(root, "plain", "jsonl")
    server.stop()


def remote_config(served_sp, tmp_path, loss, teacher_tokenizer=""):
    server, _teacher_dir, student, data = served_sp
    return config_from_dict(
        {
            "student": {"path": str(student)},
            "teacher": {"kind": "remote", "url": server.url, "max_retries": 0},
            "cross_tokenizer": {"teacher_tokenizer": teacher_tokenizer},
            "data": {"train": str(data), "max_prompt_tokens": 64},
            "loss": loss,
            "source": {"lmbda": 1.0},
            "steps": 3,
            "batch_size": 4,
            "micro_batch_size": 2,
            "sampling": {"max_new_tokens": 12},
            "output_dir": str(tmp_path / "run"),
        }
    )


@pytest.mark.parametrize(
    "loss", [{"objective": "pg"}, {"objective": "kd", "estimator": "topk", "topk": 8}]
)
def test_three_steps_with_a_served_teacher_of_another_tokenizer(
    served_sp, tmp_path, monkeypatch, loss
):
    monkeypatch.setenv("OPD_TEACHER_TOKEN", TOKEN)
    _, teacher_dir, _, _ = served_sp
    cfg = remote_config(served_sp, tmp_path, loss, str(teacher_dir))
    train(cfg)
    records = read_metrics(cfg.output_dir)
    assert len(records) == 3 and not any(r["skipped"] for r in records)
    for r in records:
        assert math.isfinite(r["loss"]) and r["divergence"] != 0
        assert 0 < r["xtok_aligned_frac"] <= 1 and r["teacher_tokens_scored"] > 0


def test_the_server_tokenizer_is_checked(served_sp, tmp_path, monkeypatch):
    monkeypatch.setenv("OPD_TEACHER_TOKEN", TOKEN)
    server, teacher_dir, student, _ = served_sp
    cfg = remote_config(served_sp, tmp_path, {"objective": "pg"})  # no teacher_tokenizer
    with pytest.raises(ValueError, match=r"set cross_tokenizer\.teacher_tokenizer to the server's"):
        train(cfg)
    # spoken to as a vLLM server: /tokenize of a probe text tells the tokenizers apart
    with pytest.raises(ValueError, match="tokenizes a probe text"):
        RemoteTeacher(
            server.url, token=TOKEN, protocol="vllm", tokenizer=load_tokenizer(str(student))
        ).close()
    ok = RemoteTeacher(
        server.url, token=TOKEN, protocol="vllm", tokenizer=load_tokenizer(str(teacher_dir))
    )
    ok.close()


def test_preflight_counts_a_row_in_the_teachers_tokens(served_sp, tmp_path, monkeypatch):
    """A row that fits the student's limits (and the server's max_seq_len in student tokens)
    but not in the SentencePiece teacher's byte-fallback tokens is refused before the run,
    by its index; without the teacher's tokenizer named only the student bound applies."""
    monkeypatch.setenv("OPD_TEACHER_TOKEN", TOKEN)
    _, teacher_dir, student, _ = served_sp
    rows = [{"prompt": f"What is {i} plus 2?", "completion": f"It is {i + 2}."} for i in range(4)]
    rows[2]["prompt"] = "日本語 " * 25  # 28 student tokens, 250 teacher tokens
    data = tmp_path / "cjk.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = remote_config(served_sp, tmp_path, {"objective": "pg"}, str(teacher_dir))
    cfg.data.train = str(data)
    s_tok = load_tokenizer(str(student))
    assert len(Encoder(s_tok, cfg.data).prompt_ids(rows[2]["prompt"])) <= 64  # kept by the run
    with pytest.raises(ValueError, match=r"row 2 of data\.train=.* takes \d+ in the teacher's") as err:
        preflight(cfg)
    release_run_dir(cfg.output_dir)
    assert "for its prompt as the teacher renders it" in str(err.value)
    cfg.cross_tokenizer.teacher_tokenizer = ""  # tokenizer unknown: the student-token bound
    preflight(cfg)
    release_run_dir(cfg.output_dir)
    cfg.cross_tokenizer.teacher_tokenizer = str(teacher_dir)
    rows[2]["prompt"] = "日本語 " * 5
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    checked = preflight(cfg)  # every row fits in the teacher's tokens too
    release_run_dir(cfg.output_dir)
    assert checked.config.teacher.kind == "remote"


def test_overlap_on_and_off_give_identical_losses(served_sp, tmp_path, monkeypatch):
    """The wrapper says it `overlaps` as its remote teacher does: the loop scores one
    micro-batch ahead on its worker thread, with the same losses as scoring serially."""
    monkeypatch.setenv("OPD_TEACHER_TOKEN", TOKEN)
    _, teacher_dir, _, _ = served_sp
    threads, real = [], RemoteTeacher.score

    def score(self, *args, **kw):
        threads.append(threading.current_thread().name)
        return real(self, *args, **kw)

    monkeypatch.setattr(RemoteTeacher, "score", score)
    got = {}
    for overlap in (False, True):
        threads.clear()
        loss = {"objective": "kd", "estimator": "topk", "topk": 8}
        cfg = remote_config(served_sp, tmp_path / f"o{overlap}", loss, str(teacher_dir))
        cfg.teacher.overlap = overlap
        train(cfg)
        got[overlap] = [r["loss"] for r in read_metrics(cfg.output_dir)]
        # serial: scored by the loop's thread; overlapped: by the worker, one micro-batch ahead
        assert threads and {t.startswith("opd-score") for t in threads} == {overlap}
    assert got[True] == got[False]


def test_submit_is_offered_where_the_inner_teacher_has_it(served_sp, monkeypatch):
    server, teacher_dir, student, _ = served_sp
    s_tok, t_tok = load_tokenizer(str(student)), load_tokenizer(str(teacher_dir))
    s_enc, t_enc = Encoder(s_tok, DataConfig()), Encoder(t_tok, DataConfig())
    remote = RemoteTeacher(server.url, token=TOKEN, tokenizer=t_tok)
    try:
        kw = {"student_tokenizer": s_tok, "teacher_tokenizer": t_tok,
              "student_encoder": s_enc, "teacher_encoder": t_enc}  # fmt: skip
        cross = CrossTokenizerTeacher(remote, **kw, span_kd="span")
        local = CrossTokenizerTeacher(LocalTeacher(tiny_model(t_tok, seed=1), len(t_tok)), **kw)
        assert cross.overlaps and hasattr(cross, "submit")
        assert not local.overlaps and not hasattr(local, "submit")
        rows = [{"prompt": "What is 1 plus 2?"}, {"prompt": "Say 2024 日本語"}]
        comps = [[*s_tok("It is 3. 🙂", add_special_tokens=False).input_ids, s_enc.stop_id],
                 s_tok("2024 日本語", add_special_tokens=False).input_ids]  # fmt: skip
        prompts = [s_enc.prompt_ids(r["prompt"]) for r in rows]
        batch = assemble(prompts, comps, pad_id=s_tok.pad_token_id, rows=rows)
        for need, k in (("token", 0), ("topk", 8)):
            want, got = cross.score(batch, need, k), cross.submit(batch, need, k).result()
            for field in ("token_logprobs", "span_end", "aligned", "topk_ids", "topk_logprobs"):
                a, b = getattr(want, field), getattr(got, field)
                assert (a is None and b is None) or torch.equal(a, b), (need, field)
    finally:
        remote.close()
