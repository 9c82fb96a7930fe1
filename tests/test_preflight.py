"""What a run can know before loading a model fails in its first seconds, naming the key."""

import json
import shutil

import pytest
import torch

import opd.config.extras
from opd.config.parse import config_from_dict
from opd.run.preflight import preflight


def check(data: dict):
    return preflight(config_from_dict(data))


def test_a_good_config_passes_and_returns_its_rows(base_config, addition_data):
    checked = check(base_config())
    assert len(checked.train_rows) == 32 and checked.resume_from is None
    assert checked.config.loss.topk == 0  # full-vocabulary kd: no k to resolve


@pytest.mark.parametrize("key", ["student", "teacher"])
def test_missing_local_model_path_names_key(key, base_config):
    with pytest.raises(FileNotFoundError, match=rf"{key}\.path=/no/such/model: no such directory"):
        check(base_config(**{f"{key}__path": "/no/such/model"}))


def test_model_dir_without_tokenizer_or_config(base_config, tiny_pair, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(tiny_pair[1], bare)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bare / name).unlink(missing_ok=True)
    with pytest.raises(ValueError, match=r"student\.path=.*bare has no tokenizer files"):
        check(base_config(student__path=str(bare)))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"teacher\.path=.*empty has no config\.json"):
        check(base_config(teacher__path=str(empty)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_device_without_cuda(base_config):
    with pytest.raises(ValueError, match="device=cuda but this machine has no CUDA device"):
        check(base_config(device="cuda"))


def test_completions_needed_but_absent(base_config, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "1+1="}) + "\n")
    with pytest.raises(ValueError, match=r"data\.train=.*row 0 has no column 'completion'"):
        check(base_config(data__train=str(prompts), preset="supervised_kd"))
    check(base_config(data__train=str(prompts), preset="on_policy"))  # samples its own


def test_privileged_template_column_the_data_lacks(base_config):
    data = base_config(preset="opsd", teacher__privileged_template="{prompt} Ref: {solution}")
    with pytest.raises(ValueError, match="row 0 has no column 'solution'"):
        check(data)
    check(base_config(preset="opsd", teacher__privileged_template="{prompt} Ref: {answer}"))


def test_eval_metric_needs_answers(base_config, tmp_path):
    rows = tmp_path / "eval.jsonl"
    rows.write_text(json.dumps({"prompt": "1+1="}) + "\n")
    with pytest.raises(ValueError, match=r"data\.eval=.*has no column 'answer'"):
        check(base_config(data__eval=str(rows)))


def test_resume_with_nothing_left_and_existing_run(base_config, tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "step-0000003"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text("{}")
    with pytest.raises(FileExistsError, match="already holds checkpoint step-0000003"):
        check(base_config())
    with pytest.raises(ValueError, match="is at step 3 and steps=3; nothing is left to train"):
        check(base_config(resume=True))
    assert check(base_config(resume=True, steps=5)).resume_from == ckpt


def test_missing_extra_says_what_to_install(base_config, monkeypatch):
    real = opd.config.extras.importlib.util.find_spec
    monkeypatch.setattr(
        opd.config.extras.importlib.util,
        "find_spec",
        lambda name: None if name == "peft" else real(name),
    )
    with pytest.raises(opd.config.extras.MissingExtra, match=r"pip install 'opd\[lora\]'"):
        check(base_config(lora__enabled=True))


def test_remote_server_limits_from_its_info(base_config, tiny_pair, monkeypatch):
    from serve_util import TOKEN, start_server

    server, _ = start_server(tiny_pair[0])  # max_seq_len 64, max_topk 16
    monkeypatch.setenv("OPD_TEACHER_TOKEN", TOKEN)
    try:
        remote = {"teacher__kind": "remote", "teacher__url": server.url}
        topk = {"loss__estimator": "topk", "data__max_prompt_tokens": 16}
        with pytest.raises(ValueError, match=r"at most 64 tokens .*can reach 1024 .*max_compl"):
            check(base_config(**remote, loss__estimator="topk"))
        with pytest.raises(ValueError, match=r"can reach 528 .*sampling\.max_new_tokens=16"):
            check(base_config(**remote, preset="on_policy", sampling__max_new_tokens=16))
        with pytest.raises(ValueError, match=r"loss\.topk=32 but .*allows at most 16"):
            check(base_config(**remote, **topk, data__max_completion_tokens=8, loss__topk=32))
        checked = check(base_config(**remote, **topk, data__max_completion_tokens=8))
        assert checked.config.loss.topk == 16  # the default 64, capped at the server's limit
    finally:
        server.stop()


def test_cached_teacher_checks_and_topk_default(tiny_pair, addition_data, tmp_path):
    from opd.teachers.cache.generate import CacheSpec, build_cache

    cache = tmp_path / "cache"
    spec = CacheSpec(topk=8, max_new_tokens=4, shard_size=16, n=1, seed=0)
    build_cache(str(tiny_pair[0]), addition_data, cache, spec)
    data = {
        "student": {"path": str(tiny_pair[1])},
        "teacher": {"kind": "cached"},
        "data": {"train": str(cache)},
        "loss": {"objective": "kd", "estimator": "topk"},
        "output_dir": str(tmp_path / "run"),
    }
    assert check(data).config.loss.topk == 8  # loss.topk=0: the cache's k
    with pytest.raises(
        ValueError, match=r"teacher\.kind=cached scores only the completions it stored"
    ):
        check({**data, "source": {"lmbda": 0.5}})
    with pytest.raises(ValueError, match=r"loss\.topk=16 but cache .* stores top-8"):
        check({**data, "loss": {**data["loss"], "topk": 16}})


def test_sequences_longer_than_the_models_positions_fail_before_loading(
    base_config, tmp_path, monkeypatch
):
    """The tiny models have 512 positions (config.json): a 400-token prompt with a 200-token
    completion, or a 510-token prompt sampled for 6 tokens, is refused after encoding and
    before any model loads, naming the row; cut to fit, the same rows pass."""
    import opd.run.setup
    from opd.data.positions import check_positions, model_positions
    from opd.data.rows import load_run_data
    from opd.modeling.hf import load_tokenizer

    assert model_positions(base_config()["student"]["path"]) == 512
    path = tmp_path / "long.jsonl"
    rows = [{"prompt": "1+1=", "completion": "2"}, {"prompt": "9" * 400, "completion": "8" * 200}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loads = []
    monkeypatch.setattr(opd.run.setup, "load_causal_lm", lambda *a, **k: loads.append(a))
    long = dict(data__train=str(path), data__max_prompt_tokens=1000)
    data = base_config(preset="supervised_kd", data__max_completion_tokens=1000, **long)
    with pytest.raises(ValueError, match=r"data\.train=.*long\.jsonl: row 1 needs 6\d\d "
                       r"positions \(prompt 40\d \+ completion 20\d\) but student\.path=.* has 512"):
        opd.run.setup.build_run(config_from_dict(data))
    assert loads == []
    sampled = base_config(preset="on_policy", sampling__max_new_tokens=200, **long)
    with pytest.raises(ValueError, match=r"row 1 needs 6\d\d positions \(prompt 40\d \+ "
                       r"sampling\.max_new_tokens 200\)"):
        opd.run.setup.build_run(config_from_dict(sampled))
    assert loads == []
    config = config_from_dict({**data, "data": {**data["data"], "max_prompt_tokens": 300}})
    tok = load_tokenizer(config.student.path)
    run_data = load_run_data(config, tok)
    assert max(len(r["prompt_ids"]) + len(r["completion_ids"]) for r in run_data.train_rows) > 500
    check_positions(config, run_data.train_rows, [])  # 300 + 20x fits in 512
