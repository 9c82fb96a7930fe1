"""Offline distillation: cache generation, review, faults, training without the teacher."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import opd.run.setup as setup_mod
import opd.teachers.cache.generate as generate_mod
from opd.cli import main as cli_main
from opd.cli.demo.tiny import build_char_tokenizer, save_tiny_pair, tiny_causal_lm
from opd.config.parse import config_from_dict
from opd.data.batch import assemble
from opd.data.cache_format import CacheError, CacheReader, read_manifest
from opd.data.rows import load_run_data
from opd.modeling.hf import load_causal_lm, load_tokenizer
from opd.run.loop import train
from opd.run.metrics import read_metrics
from opd.teachers.cache.generate import CacheSpec, build_cache
from opd.teachers.cache.inspect import cache_report, inspect_cache
from opd.teachers.cached import CachedTeacher
from opd.teachers.local import LocalTeacher

torch.set_num_threads(2)
N_PROMPTS = 10


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(teacher_dir, student_dir) with a chat template, so prompts go through it."""
    return save_tiny_pair(tmp_path_factory.mktemp("cache_models"), chat=True)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache_data") / "pairs.jsonl"
    rng = random.Random(0)
    with path.open("w") as fh:
        for _ in range(N_PROMPTS):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            fh.write(
                json.dumps({"prompt": f"{a}+{b}=", "completion": f"{a + b}", "answer": str(a + b)})
                + "\n"
            )
    return path


def small_spec(**kw):
    base = {"topk": 8, "max_new_tokens": 6, "shard_size": 3, "n": 2, "seed": 3}
    return CacheSpec(**{**base, **kw})


def train_config(student, cache, out, **over):
    data = {
        "student": {"path": str(student)},
        "teacher": {"kind": "cached", "cache_dir": str(cache), "path": "/nonexistent/teacher"},
        "data": {"train": str(cache)},
        "loss": {"objective": "kd", "estimator": "topk", "topk": 8},
        "steps": 2,
        "batch_size": 4,
        "micro_batch_size": 2,
        "optim": {"lr": 1e-3},
        "output_dir": str(out),
    }
    for key, value in over.items():
        node = data
        *parents, last = key.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return config_from_dict(data)


def cache_content(root):
    """Every stored array and text row, keyed by row id: equal caches compare equal."""
    reader = CacheReader(root)
    rows = {r["cache_row"]: r for r in reader.rows()}
    arrays = {
        rid: {k: v.tolist() for k, v in reader.token_arrays(rid).items()}
        for rid in reader.row_ids()
    }
    return rows, arrays


def test_round_trip_generate_inspect_train(models, pairs, tmp_path, monkeypatch, capsys):
    teacher_src, student = models
    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_src, teacher)
    cache = tmp_path / "cache"
    rc = cli_main(
        [
            "generate",
            "--teacher",
            str(teacher),
            "--prompts",
            str(pairs),
            "--out",
            str(cache),
            "--topk",
            "8",
            "--max-new-tokens",
            "6",
            "--n",
            "2",
            "--shard-size",
            "3",
            "--batch-size",
            "4",
            "--seed",
            "1",
            "--temperature",
            "0.8",
        ]
    )
    assert rc == 0
    m = read_manifest(cache)
    assert m["complete"] and m["num_shards"] == 4 and len(m["shards"]) == 4
    assert m["counts"]["rows"] == 2 * N_PROMPTS and m["counts"]["prompts"] == N_PROMPTS
    assert m["spec"]["temperature"] == 0.8 and m["logprob_temperature"] == 1.0
    assert m["bytes"]["layout_per_completion_token"] == 8 * 6 + 12 <= 8 * 6 + 16
    assert m["bytes"]["dense_float32_per_token"] == 4 * len(load_tokenizer(str(teacher)))

    rows = CacheReader(cache).rows()
    assert sorted(r["cache_row"] for r in rows) == list(range(2 * N_PROMPTS))
    tok = load_tokenizer(str(teacher))
    from opd.config.parse import DataConfig
    from opd.data.rows import Encoder

    enc = Encoder(tok, DataConfig())
    for r in rows:  # prompts tokenized exactly as the training loop does, chat template on
        assert r["prompt_ids"] == enc.prompt_ids(r["prompt"])
        assert tok.decode(r["completion_ids"]).startswith(r["completion"])
        assert r["answer"]  # source columns travel with the row

    capsys.readouterr()
    assert cli_main(["inspect", str(cache), "--samples", "2"]) == 0
    text = capsys.readouterr().out
    assert f"{2 * N_PROMPTS} rows" in text and "per completion token" in text
    assert "truncated completions" in text and "--- row 1" in text and "<|assistant|>" in text
    report = cache_report(str(cache))
    assert len(report["truncated"]) == 2 * N_PROMPTS - m["counts"]["finished"]

    # Train with the teacher gone: SeqKD (ce) and sparse KD (kd/topk) from the cache only.
    shutil.rmtree(teacher)
    loaded = []
    real_load = setup_mod.load_causal_lm
    monkeypatch.setattr(
        setup_mod, "load_causal_lm", lambda p, **kw: loaded.append(p) or real_load(p, **kw)
    )
    for name, over in (("seqkd", {"loss__objective": "ce"}), ("sparse_kd", {})):
        cfg = train_config(student, cache, tmp_path / name, **over)
        result = train(cfg)
        records = read_metrics(cfg.output_dir)
        assert len(records) == 2 and all(np.isfinite(r["loss"]) for r in records)
        assert result["totals"]["teacher_tokens_scored"] == 0
    assert loaded == [str(student), str(student)]  # never the teacher


def test_stored_ids_are_used_and_align_with_teacher(models, pairs, tmp_path, monkeypatch):
    """Decoded text need not re-tokenize to the sampled ids; training uses the stored ones."""
    teacher, student = models
    cache = tmp_path / "cache"
    build_cache(str(teacher), pairs, cache, small_spec())
    cfg = train_config(student, cache, tmp_path / "run", steps=1)
    run = setup_mod.build_run(cfg)
    for r in run.train_rows:  # make the text useless: only the ids can give the right batch
        r["completion"] = "#"
    from opd.run.metrics import PhaseTimer
    from opd.run.sources import make_micro_batch

    batch = make_micro_batch(run, 0, 0, PhaseTimer())
    scores = run.teacher.score(batch, "topk", 8)
    for i, row in enumerate(batch.rows):
        n = len(row["completion_ids"])
        assert batch.completion_ids()[i, :n].tolist() == row["completion_ids"]
    # The cache holds what the live teacher says at the stored ids: the same top-8 ids and
    # log-probs, the same log-prob of each completion token (stored in float16, the default
    # logprob_dtype: rounded to 2**-11 relative).
    live = LocalTeacher(load_causal_lm(str(teacher)), run.vocab_size)
    _assert_same_scores(scores, live.score(batch, "topk", 8), batch.loss_mask())
    # data.max_completion_tokens cuts stored completions; the teacher serves the prefix.
    short = train_config(student, cache, tmp_path / "short", steps=1, data__max_completion_tokens=3)
    run_short = setup_mod.build_run(short)
    batch = make_micro_batch(run_short, 0, 0, PhaseTimer())
    assert batch.completion_width <= 3
    got = run_short.teacher.score(batch, "topk", 8)
    _assert_same_scores(got, live.score(batch, "topk", 8), batch.loss_mask())
    bad = assemble(
        [r["prompt_ids"] for r in batch.rows], [[5, 1]] * batch.size, pad_id=0, rows=batch.rows
    )
    with pytest.raises(CacheError, match="does not hold the cached completion"):
        run.teacher.score(bad, "topk", 8)


def _assert_same_scores(got, want, mask) -> None:
    assert mask.any()  # (a cache scores no teacher tokens: tokens_scored is 0 by design)
    assert torch.equal(got.topk_ids[mask], want.topk_ids[mask])
    for a, b in ((got.topk_logprobs, want.topk_logprobs), (got.token_logprobs, want.token_logprobs)):
        torch.testing.assert_close(a[mask], b[mask], atol=1e-5, rtol=2**-11)


def test_kill_and_resume_is_exactly_once(models, pairs, tmp_path, monkeypatch):
    teacher, _ = models
    whole = tmp_path / "whole"
    build_cache(str(teacher), pairs, whole, small_spec())

    # Kill 1: after two shards were committed.
    killed = tmp_path / "killed"

    def die_after_two(index):
        if index == 1:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        build_cache(str(teacher), pairs, killed, small_spec(), on_shard=die_after_two)
    m = read_manifest(killed)
    assert not m["complete"] and [s["index"] for s in m["shards"]] == [0, 1]
    with pytest.raises(CacheError, match="incomplete"):
        CacheReader(killed)

    # Kill 2: shard 2's files are in place but the manifest update never happened.
    real_write = generate_mod.write_manifest
    calls = []

    def die_in_window(root, manifest):
        calls.append(1)
        if len(calls) == 2:  # the 1st rewrites the manifest at start, the 2nd lists shard 2
            raise KeyboardInterrupt("killed between shard files and manifest")
        real_write(root, manifest)

    monkeypatch.setattr(generate_mod, "write_manifest", die_in_window)
    with pytest.raises(KeyboardInterrupt):
        build_cache(str(teacher), pairs, killed, small_spec())
    monkeypatch.setattr(generate_mod, "write_manifest", real_write)
    assert (killed / "shard-00002.safetensors").exists()
    assert [s["index"] for s in read_manifest(killed)["shards"]] == [0, 1]

    m = build_cache(str(teacher), pairs, killed, small_spec())
    assert m["complete"] and [s["index"] for s in m["shards"]] == [0, 1, 2, 3]
    reader = CacheReader(killed)
    assert reader.row_ids() == list(range(2 * N_PROMPTS))  # no row missing, none twice
    assert len(reader.rows()) == 2 * N_PROMPTS
    assert cache_content(killed) == cache_content(whole)  # same as a run never killed

    # A finished cache rerun is a no-op; other arguments are refused, naming the key.
    assert build_cache(str(teacher), pairs, killed, small_spec())["shards"] == m["shards"]
    with pytest.raises(CacheError, match=r"spec\.topk"):
        build_cache(str(teacher), pairs, killed, small_spec(topk=4))


@pytest.mark.slow
def test_sigkill_during_generate_then_resume(models, pairs, tmp_path):
    """A real SIGKILL at an arbitrary moment of a CLI run; the rerun finishes exactly once."""
    teacher, _ = models
    out = tmp_path / "cache"
    cmd = [
        sys.executable,
        "-m",
        "opd.cli",
        "generate",
        "--teacher",
        str(teacher),
        "--prompts",
        str(pairs),
        "--out",
        str(out),
        "--topk",
        "8",
        "--max-new-tokens",
        "6",
        "--n",
        "2",
        "--shard-size",
        "1",
        "--batch-size",
        "2",
        "--seed",
        "3",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if len(read_manifest(out)["shards"]) >= 2:
                break
        except (FileNotFoundError, CacheError, KeyError):
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(read_manifest(out)["shards"])
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    reader = CacheReader(out)
    assert reader.manifest["complete"] and done_before <= N_PROMPTS
    assert reader.row_ids() == list(range(2 * N_PROMPTS))
    assert not list(out.glob(".*.tmp-*"))


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_corrupted_shard_is_named(models, pairs, tmp_path, damage):
    teacher, student = models
    cache = tmp_path / "cache"
    build_cache(str(teacher), pairs, cache, small_spec())
    shard = cache / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif damage == "truncate":
        shard.write_bytes(bytes(data[:-7]))
    else:
        shard.unlink()
    for attempt in (
        lambda: CacheReader(cache),
        lambda: inspect_cache(str(cache)),
        lambda: setup_mod.build_run(train_config(student, cache, tmp_path / "run")),
    ):
        with pytest.raises(CacheError, match=r"shard-00001\.safetensors"):
            attempt()
    # `opd generate` rerun repairs it: the bad shard is written again.
    m = build_cache(str(teacher), pairs, cache, small_spec())
    assert m["complete"] and CacheReader(cache).row_ids() == list(range(2 * N_PROMPTS))


def test_cache_from_another_tokenizer_needs_that_tokenizer(models, pairs, tmp_path):
    """A cache in another tokenizer is re-tokenized for the student when its tokenizer is at
    hand (opd.teachers.cross_tokenizer.cache), and refused, saying what to set, when not."""
    import shutil

    teacher, _ = models
    gone = tmp_path / "teacher_copy"
    shutil.copytree(teacher, gone)
    cache = tmp_path / "cache"
    build_cache(str(gone), pairs, cache, small_spec())
    shutil.rmtree(gone)  # the manifest's teacher directory is no longer there
    other = tmp_path / "other_student"
    tok = build_char_tokenizer("0123456789+=abc", chat=True)
    tiny_causal_lm(
        len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id
    ).save_pretrained(other)
    tok.save_pretrained(other)
    for objective in ("ce", "kd"):  # as a dataset (SeqKD) and as a teacher
        cfg = train_config(other, cache, tmp_path / f"run_{objective}", loss__objective=objective)
        with pytest.raises(CacheError, match=r"another tokenizer.*cross_tokenizer\.teacher_tok"):
            setup_mod.build_run(cfg)
    with pytest.raises(CacheError, match="another tokenizer"):
        CachedTeacher(cache, load_tokenizer(str(other)))
    cfg = train_config(
        other, cache, tmp_path / "run_named", cross_tokenizer__teacher_tokenizer=str(teacher)
    )
    run = setup_mod.build_run(cfg)  # SeqKD: the stored text in the student's tokens
    stored = {r["cache_row"]: r for r in CacheReader(cache).rows()}
    for row in run.train_rows:
        assert row["teacher_completion_ids"] == stored[row["cache_row"]]["completion_ids"]
        ids = row["completion_ids"]
        text = tok.decode(ids[:-1] if ids and ids[-1] == run.encoder.stop_id else ids)
        assert row["completion"].startswith(text)  # cut where the student lacks a character


def test_missing_columns_and_bad_settings_are_named(models, pairs, tmp_path):
    teacher, student = models
    prompts_only = tmp_path / "prompts.jsonl"
    prompts_only.write_text('{"question": "1+1="}\n')
    with pytest.raises(ValueError, match="'completion'"):
        spec = small_spec(mode="score", n=1, prompt_field="question")
        build_cache(str(teacher), prompts_only, tmp_path / "a", spec)
    with pytest.raises(ValueError, match="'prompt'"):
        build_cache(str(teacher), prompts_only, tmp_path / "b", small_spec())
    cache = tmp_path / "cache"
    build_cache(str(teacher), prompts_only, cache, small_spec(prompt_field="question"))
    cfg = train_config(student, cache, tmp_path / "run", loss__objective="ce")
    # Cache rows carry their token ids: no text column is needed to train on them.
    rows = load_run_data(cfg, load_tokenizer(str(student))).train_rows
    assert all(r["prompt_ids"] and r["completion_ids"] for r in rows)
    for over, match in (  # refused by the config itself, before anything loads
        ({"loss__estimator": "full"}, "loss.estimator=topk"),
        ({"source__lmbda": 0.5}, "source.lmbda=0"),
        ({"loss__kd_temperature": 2.0}, "temperature"),
    ):
        with pytest.raises(ValueError, match=match):
            train_config(student, cache, tmp_path / "run2", data__prompt_field="question", **over)
    cfg = train_config(
        student, cache, tmp_path / "run2", data__prompt_field="question", loss__topk=16
    )
    with pytest.raises(ValueError, match="top-8"):
        setup_mod.build_teacher(cfg, load_tokenizer(str(student)), torch.device("cpu"))


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("float16", 5e-4)])
def test_topk_equal_to_vocab_matches_live_full_kd(models, pairs, tmp_path, dtype, tol):
    """Same batches, same student: cached top-V sparse KD == live full-vocabulary KD."""
    teacher_src, student = models
    # A peaked teacher, so a misaligned position or id would change the loss visibly.
    teacher = tmp_path / "sharp_teacher"
    model = AutoModelForCausalLM.from_pretrained(teacher_src)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    model.save_pretrained(teacher)
    load_tokenizer(str(teacher_src)).save_pretrained(teacher)
    V = len(load_tokenizer(str(teacher)))
    cache = tmp_path / "cache"
    spec = CacheSpec(mode="score", topk=V, logprob_dtype=dtype, shard_size=4)
    m = build_cache(str(teacher), pairs, cache, spec)
    assert m["spec"]["topk"] == V
    live = train_config(
        student,
        cache,
        tmp_path / "live",
        steps=1,
        teacher={"kind": "local", "path": str(teacher)},
        loss={"objective": "kd", "estimator": "full"},
    )
    cached = train_config(student, cache, tmp_path / "cached", steps=1, loss__topk=V)
    a, b = train(live), train(cached)
    assert a["tokens"] == b["tokens"] > 0 and a["loss"] > 0.5
    assert b["loss"] == pytest.approx(a["loss"], rel=tol)
    assert b["divergence"] == pytest.approx(a["divergence"], rel=tol)


def test_inspect_flags_empty_completions(models, tmp_path):
    teacher, _ = models
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "1+1=", "completion": ""}\n{"prompt": "2+2=", "completion": "4"}\n')
    cache = tmp_path / "cache"
    build_cache(str(teacher), data, cache, CacheSpec(mode="score", topk=4))
    report = cache_report(str(cache))
    assert report["empty"] == [0] and report["truncated"] == []
    assert "WARNING     1 empty completions" in inspect_cache(str(cache))


def test_a_second_writer_is_refused(models, pairs, tmp_path):
    import fcntl

    teacher, _ = models
    out = tmp_path / "cache"
    out.mkdir()
    with (out / ".lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a live `opd generate` on the same --out holds it
        with pytest.raises(CacheError, match="another"):
            build_cache(str(teacher), pairs, out, small_spec())
    assert build_cache(str(teacher), pairs, out, small_spec(n=1))["complete"]
