"""A cache written by `opd generate` in a SentencePiece-style teacher's tokens, trained on
by a byte-level BPE student: SeqKD re-tokenizes its text, top-k kd aligns to it."""

from __future__ import annotations

import math

import pytest

from opd.config.parse import config_from_dict
from opd.data.cache_format import CacheError, CacheReader
from opd.modeling.hf import load_tokenizer
from opd.run.loop import train
from opd.run.metrics import read_metrics
from opd.run.setup import build_run
from opd.teachers.cache.generate import CacheSpec, build_cache
from opd.teachers.cross_tokenizer.align import ByteTable, valid_utf8_prefix
from opd.teachers.cross_tokenizer.teacher import CrossTokenizerTeacher
from real_format import write_data
from sp_format import save_cross_pair


@pytest.fixture(scope="module")
def sp_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cross_cache")
    teacher, student = save_cross_pair(root)
    prompts = write_data(root, "plain", "jsonl", n=8)
    # `opd score`: the rows' completions in the teacher's tokens; `opd generate`: samples of
    # the random teacher, whose byte tokens often form no valid UTF-8.
    spec = CacheSpec(mode="score", topk=8, shard_size=4)
    build_cache(str(teacher), prompts, root / "cache", spec, batch_size=4, device="cpu")
    spec = CacheSpec(topk=8, max_new_tokens=16, shard_size=4)
    build_cache(str(teacher), prompts, root / "sampled", spec, batch_size=4, device="cpu")
    return teacher, student, root / "cache"


def cache_config(sp_cache, tmp_path, loss, teacher_tokenizer="", **teacher):
    _, student, cache = sp_cache
    return config_from_dict(
        {
            "student": {"path": str(student)},
            "teacher": teacher,
            "cross_tokenizer": {"teacher_tokenizer": teacher_tokenizer},
            "data": {"train": str(cache)},
            "loss": loss,
            "source": {"lmbda": 0.0, "off_policy": "dataset"},
            "steps": 3,
            "batch_size": 4,
            "micro_batch_size": 2,
            "output_dir": str(tmp_path / "run"),
        }
    )


def test_seqkd_retokenizes_the_stored_text(sp_cache, tmp_path):
    teacher, student, cache = sp_cache
    cfg = cache_config(sp_cache, tmp_path, {"objective": "ce"})
    run = build_run(cfg)
    s_tok, t_tok = load_tokenizer(str(student)), load_tokenizer(str(teacher))
    stop = run.encoder.stop_id
    stored = {r["cache_row"]: r for r in CacheReader(cache).rows()}
    finished = 0
    for row in run.train_rows:
        t_ids = stored[row["cache_row"]]["completion_ids"]
        assert row["teacher_completion_ids"] == t_ids
        ids = row["completion_ids"]
        ends = t_ids[-1] == t_tok.convert_tokens_to_ids("<|eot_id|>")
        assert (ids[-1] == stop) == ends
        text = s_tok.decode(ids[:-1] if ends else ids)
        assert text == t_tok.decode(t_ids[:-1] if ends else t_ids)
        finished += ends
    assert finished == len(run.train_rows)  # every scored completion ended its turn
    train(cfg)
    records = read_metrics(cfg.output_dir)
    assert len(records) == 3 and all(math.isfinite(r["loss"]) for r in records)


def test_topk_kd_from_the_cache_aligns_to_the_retokenized_rows(sp_cache, tmp_path):
    cfg = cache_config(
        sp_cache, tmp_path, {"objective": "kd", "estimator": "topk", "topk": 8}, kind="cached"
    )
    run = build_run(cfg)
    assert isinstance(run.teacher, CrossTokenizerTeacher)
    train(cfg)
    records = read_metrics(cfg.output_dir)
    assert len(records) == 3 and not any(r["skipped"] for r in records)
    for r in records:
        assert math.isfinite(r["loss"]) and r["divergence"] > 0
        assert 0 < r["xtok_one_to_one_frac"] <= r["xtok_aligned_frac"] <= 1
        assert r["xtok_rows_masked"] == 0  # the student's text is the cache's, byte for byte


def test_a_wrong_teacher_tokenizer_is_refused(sp_cache, tmp_path):
    _, student, _ = sp_cache
    cfg = cache_config(sp_cache, tmp_path, {"objective": "ce"}, str(student))
    with pytest.raises(CacheError, match="is not the tokenizer cache"):
        build_run(cfg)


def test_sampled_text_is_cut_at_its_first_invalid_byte(sp_cache, tmp_path):
    teacher, student, cache = sp_cache
    cfg = cache_config(sp_cache, tmp_path, {"objective": "ce"})
    cfg.data.train = str(cache.parent / "sampled")
    run = build_run(cfg)
    s_tok, t_tok = load_tokenizer(str(student)), load_tokenizer(str(teacher))
    table = ByteTable.of(t_tok)
    t_end = {t_tok.convert_tokens_to_ids("<|eot_id|>"), t_tok.eos_token_id}
    cuts = 0
    for row in run.train_rows:
        t_ids = row["teacher_completion_ids"]
        finished = t_ids[-1] in t_end
        body = t_ids[:-1] if finished else t_ids
        raw = b""
        for i in body:
            if table.get(i) is None:
                break
            raw += table.get(i)
        text = valid_utf8_prefix(raw).decode()
        whole = len(text.encode()) == len(b"".join(table.get(i) or b"?" for i in body))
        ids = row["completion_ids"]
        ends = bool(ids) and ids[-1] == run.encoder.stop_id
        assert s_tok.decode(ids[:-1] if ends else ids) == text == row["completion"]
        assert ends == (finished and whole)
        cuts += not whole
    assert cuts > 0  # the random teacher's bytes do break UTF-8 here
