"""End to end on what real checkpoints and data look like (fixtures: `real_format.py`).

Byte-level BPE with Qwen's specials and a Jinja chat template, two EOS ids in
generation_config, Qwen3 and tied-embedding Llama pairs with a padded teacher embedding,
prompt/completion and `messages` rows as JSONL, Parquet and `datasets` directories.
"""

import dataclasses
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import opd.run.setup as run_setup_mod
from opd.config.parse import DataConfig, config_from_dict
from opd.config.presets import PRESETS
from opd.data.batch import assemble
from opd.data.encoding import Encoder
from opd.data.rows import RowSpec, check_rows, load_rows, load_run_data
from opd.modeling.vocab import check_same_tokenizer
from opd.run.loop import train
from opd.run.metrics import read_metrics
from opd.run.sources import loss_denominators
from opd.run.world import World
from opd.sampling import sample
from opd.sampling.stops import mark_stop_strings
from real_format import build_pair, build_tokenizer, eos_ids, rows, save_checkpoint, write_data

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    return {arch: build_pair(root, arch) for arch in ("qwen3", "llama")}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("realdata")
    return {
        (kind, fmt): write_data(root, kind, fmt)
        for kind in ("plain", "messages")
        for fmt in ("jsonl", "parquet", "dataset", "datasetdict")
    }


def config(pair, train_path, out, kind="messages", **over):
    teacher, student = pair
    data = {
        "student": {"path": str(student)},
        "teacher": {"path": str(teacher)},
        "data": {
            "train": str(train_path),
            "prompt_field": "messages" if kind == "messages" else "prompt",
            "max_completion_tokens": 64,
        },
        "steps": 2,
        "batch_size": 4,
        "micro_batch_size": 2,
        "sampling": {"max_new_tokens": 6, "n": 2},
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


# ------------------------------------------------------------------ tokenizer and data


def test_tokenizer_is_byte_level_with_split_characters(tok):
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert len(tok(special, add_special_tokens=False).input_ids) == 1
    ids = tok("größe → €", add_special_tokens=False).input_ids
    pieces = [tok.decode([i]) for i in ids]
    assert "\ufffd" in "".join(pieces), "some character must be split over tokens"
    assert tok.decode(ids) == "größe → €"


@pytest.mark.parametrize("kind", ["plain", "messages"])
def test_every_format_loads_the_same_rows(data, kind):
    expected = rows()[kind]
    for fmt in ("jsonl", "parquet", "dataset", "datasetdict"):
        assert load_rows(data[(kind, fmt)]) == expected, fmt
    test_split = load_rows(data[(kind, "datasetdict")], split="test")
    assert test_split == expected[: len(expected) // 2]
    with pytest.raises(ValueError, match=r"without split 'validation'.*train, test"):
        load_rows(data[(kind, "datasetdict")], split="validation")


def test_messages_render_with_the_template_and_supervise_the_turn_end(tok):
    enc = Encoder(tok, DataConfig(prompt_field="messages"))
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert enc.stop_id == im_end
    row = rows()["messages"][0]  # system prompt, an earlier exchange, the final turn
    prompt = tok.decode(enc.row_prompt_ids(row))
    assert prompt.startswith("<|im_start|>system\nYou are helpful 0.<|im_end|>\n")
    assert "<|im_start|>assistant\ntwo<|im_end|>\n" in prompt  # history kept
    assert prompt.endswith("café 🙂<|im_end|>\n<|im_start|>assistant\n")
    assert "boxed" not in prompt  # the final assistant turn is the completion
    (encoded,), _ = enc.encode_rows([row], with_completion=True, where="x")
    completion = encoded["completion_ids"]
    assert completion[-1] == im_end
    assert tok.decode(completion[:-1]) == row["messages"][-1]["content"]
    batch = assemble([encoded["prompt_ids"]], [completion], pad_id=tok.pad_token_id)
    assert batch.loss_mask()[0, len(completion) - 1]  # the turn end is supervised


def test_truncation_never_invents_an_end_and_is_reported(tok, caplog):
    plain = Encoder(tok, DataConfig(max_completion_tokens=5, max_prompt_tokens=6))
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    ids, cut = plain.fit_completion("The answer is \\boxed{7}. 日本語 and more words")
    assert cut and len(ids) == 5 and im_end not in ids and tok.eos_token_id not in ids
    short, cut = plain.fit_completion("7")
    assert not cut and short[-1] == plain.stop_id
    chat = Encoder(tok, DataConfig(prompt_field="messages", max_prompt_tokens=40))
    data = rows()["messages"]
    kept, report = chat.encode_rows(data, with_completion=True, where="d.jsonl")
    assert report.dropped > 0 and len(kept) == len(data) - report.dropped
    assert all(tok.decode(r["prompt_ids"]).startswith("<|im_start|>") for r in kept)
    assert "rows dropped" in report.describe("d.jsonl", chat.config)


def test_bad_rows_are_named_before_any_model_loads(pairs, tmp_path, monkeypatch):
    def no_models(*a, **k):
        raise AssertionError("a model was loaded before the data was checked")

    monkeypatch.setattr(run_setup_mod, "build_student", no_models)
    cases = {
        '{"prompt": "a", "completion": null}': r"row 0: column 'completion' must be a string",
        '{"prompt": 7, "completion": "b"}': r"row 0: column 'prompt' must be a non-empty",
        '{"messages": [{"role": "bot", "content": "x"}]}': r"row 0: .*message 0 needs a 'role'",
    }
    for i, (line, message) in enumerate(cases.items()):
        path = tmp_path / f"bad{i}.jsonl"
        path.write_text(line + "\n")
        kind = "messages" if "messages" in line else "plain"
        cfg = config(pairs["qwen3"], path, tmp_path / f"o{i}", kind=kind, preset="supervised_kd")
        with pytest.raises(ValueError, match=str(path).replace(".", r"\.") + ": " + message):
            run_setup_mod.build_run(cfg)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"latin\.jsonl:2: not UTF-8"):
        load_rows(latin)
    with pytest.raises(ValueError, match=r"eval\.jsonl: row 0: no column 'answer'"):
        check_rows([{"prompt": "q"}], RowSpec("prompt", None, "answer"), "eval.jsonl")


# ------------------------------------------------------------------ stopping


def test_stop_string_with_a_character_split_over_tokens(tok):
    text, stop = "so → and größe!", "→"  # the arrow is 3 bytes, one token each
    ids = tok(text, add_special_tokens=False).input_ids
    assert sum(tok.decode([i]) == "\ufffd" for i in ids) >= 3
    tokens, done = torch.tensor([ids]), torch.zeros(1, dtype=torch.bool)
    first = next(t for t in range(len(ids)) if stop in tok.decode(ids[: t + 1]))
    for t in range(len(ids)):  # as the sampler calls it, one new token at a time
        mark_stop_strings(done, tokens, t, [0], (stop,), tok)
        assert bool(done[0]) == (t >= first), t


def _eos_student(src, out, token_id):
    """The Qwen3 student made to emit `token_id` first: a constant feature in the residual
    stream (embedding column 0) read only by that token's LM-head row (untied head)."""
    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 50.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[token_id, 0] = 50.0
    return save_checkpoint(out, model, build_tokenizer())


@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize("engine", ["hf", "lean"])
def test_sampling_stops_on_either_eos_id(pairs, tok, tmp_path, which, engine, caplog):
    target = eos_ids(tok)[which]
    student = _eos_student(pairs["qwen3"][1], tmp_path / "s", target)
    train_path = write_data(tmp_path, "messages", "jsonl")
    cfg = config((pairs["qwen3"][0], student), train_path, tmp_path / "o", preset="minillm_like")
    with caplog.at_level("INFO", logger="opd"):
        run = run_setup_mod.build_run(cfg)
    assert set(eos_ids(tok)) <= set(run.encoder.end_ids)
    assert "sampling stops on token ids [2 '<|im_end|>', 0 '<|endoftext|>']" in caplog.text
    assert "sets do_sample=True, temperature=0.7, top_p=0.8, top_k=20, overridden" in caplog.text
    prompts = [r["prompt_ids"] for r in run.train_rows[:3]]
    kw = dict(engine=engine, max_new_tokens=5, pad_id=tok.pad_token_id, vocab_size=len(tok))
    out = sample(run.student, prompts, eos_id=run.encoder.end_ids, temperature=0.0, **kw)
    assert out.completions == [[target]] * 3 and all(out.finished)
    other = [i for i in eos_ids(tok) if i != target]
    out = sample(run.student, prompts, eos_id=other, temperature=0.0, **kw)
    assert out.completions == [[target] * 5] * 3 and not any(out.finished)


# ------------------------------------------------------------------ tokenizer roles


def test_instruct_teacher_base_student_proceeds_naming_roles(tok, caplog):
    base = build_tokenizer(eos="<|endoftext|>")
    with caplog.at_level("WARNING", logger="opd"):
        check_same_tokenizer(base, tok, "instruct")
    assert "eos_token: student '<|endoftext|>', teacher '<|im_end|>'" in caplog.text
    other = build_tokenizer(vocab_size=300)
    with pytest.raises(ValueError, match=r"reads \d+ of the student's token ids.*id \d+: student"):
        check_same_tokenizer(tok, other, "other")


# ------------------------------------------------------------------ GKD's lambda


def test_lambda_weighs_sources_not_tokens(tok):
    """n=4 student samples per prompt against one dataset row each: with every token's
    loss 1, each source contributes its weight (1/2 here), not its share of tokens."""
    prompts = [[5, 6]] * 2
    dataset = assemble(prompts, [[7, 8, 9]] * 2, pad_id=0, source="dataset")
    student = assemble([[5, 6]] * 8, [[7, 8, 9, 10]] * 8, pad_id=0, source="student")
    den = loss_denominators([dataset, student], World())
    shares = {b.source: b.num_target_tokens() / den[b.source] for b in (dataset, student)}
    assert shares == {"dataset": 0.5, "student": 0.5}
    assert student.num_target_tokens() / 38 > 0.8  # a token-weighted loss would give 84%


def test_gkd_reports_each_sources_weight_and_term(pairs, data, tmp_path):
    over = dict(preset="gkd", steps=2, batch_size=4, micro_batch_size=1, sampling__n=4)
    cfg = config(pairs["qwen3"], data[("plain", "jsonl")], tmp_path / "gkd", kind="plain", **over)
    train(cfg)
    for r in read_metrics(cfg.output_dir):
        assert r["weight_student"] == r["sequences_from_student"] / 16  # 4 micro x n=4
        assert r["weight_student"] + r["weight_dataset"] == 1.0
        terms = r["loss_from_student"] + r["loss_from_dataset"]
        assert r["loss"] == pytest.approx(terms, rel=1e-6)


def test_seqkd_on_chat_data_says_what_it_trains_on(pairs, data, tmp_path, caplog, capsys):
    """preset=seqkd samples the teacher: the rows' own assistant turns are unused, and the
    log says so and why; the progress line calls the per-token cross-entropy `ce`."""
    cfg = config(pairs["qwen3"], data[("messages", "jsonl")], tmp_path / "o", preset="seqkd")
    with caplog.at_level("INFO", logger="opd"):
        train(dataclasses.replace(cfg, steps=1))
    n = len(rows()["messages"])
    assert (
        f"{n} of {n} rows carry a completion (their last assistant turn) that this run does not "
        "train on: it trains on the teacher's samples for each prompt "
        "(source.off_policy=teacher); set source.off_policy=dataset"
    ) in caplog.text
    progress = [x for x in capsys.readouterr().err.splitlines() if x.startswith("step 1/1")]
    assert len(progress) == 1 and "  ce " in progress[0] and " div " not in progress[0]
    caplog.clear()
    dataset = config(pairs["qwen3"], data[("messages", "jsonl")], tmp_path / "d", preset="seqkd")
    with caplog.at_level("INFO", logger="opd"):
        load_run_data(dataclasses.replace(dataset, source=dataclasses.replace(
            dataset.source, off_policy="dataset")), build_tokenizer())  # fmt: skip
    assert "does not train on" not in caplog.text


# ------------------------------------------------------------------ every preset


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_runs_on_real_formats(pairs, data, tmp_path, arch, preset):
    kind = "messages" if (arch == "qwen3") == (list(PRESETS).index(preset) % 2 == 0) else "plain"
    fmt = ("jsonl", "parquet", "dataset", "datasetdict")[list(PRESETS).index(preset) % 4]
    over = {"teacher__privileged_template": "{prompt} (answer: {answer})"}
    if preset not in ("opsd", "sdft"):
        over = {}
    cfg = config(pairs[arch], data[(kind, fmt)], tmp_path / "o", kind=kind, preset=preset, **over)
    result = train(cfg)
    records = read_metrics(cfg.output_dir)
    assert len(records) == 2 and not any(r["skipped"] for r in records)
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records)
    assert result["loss"] != 0.0


@pytest.mark.parametrize("preset", ["supervised_kd", "on_policy"])
def test_padded_teacher_rows_change_nothing(pairs, data, tmp_path, preset):
    """The teacher's embedding has 13 rows past the tokenizer (as Qwen's checkpoints do): the
    run equals the one with those rows cut off the checkpoint (full-vocabulary KD would put
    mass on them, the sampled-token path would index past the student's vocabulary)."""
    teacher, student = pairs["qwen3"]
    tok = build_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(teacher)
    assert model.get_output_embeddings().weight.shape[0] == len(tok) + 13
    model.resize_token_embeddings(len(tok))
    cut = save_checkpoint(tmp_path / "cut-teacher", model, tok)
    padded_dir, cut_dir = tmp_path / "padded", tmp_path / "cut"
    train(config(pairs["qwen3"], data[("plain", "jsonl")], padded_dir, kind="plain", preset=preset))
    train(config((cut, student), data[("plain", "jsonl")], cut_dir, kind="plain", preset=preset))
    a, b = read_metrics(padded_dir), read_metrics(cut_dir)
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-6, abs=1e-7)


def test_dataset_batches_supervise_the_end_and_cut_ones_do_not(pairs, data, tmp_path):
    train_path = data[("messages", "parquet")]
    cfg = config(pairs["llama"], train_path, tmp_path / "o", data__max_completion_tokens=6)
    tokenizer = build_tokenizer()
    train_rows = load_run_data(cfg, tokenizer).train_rows
    ends = set(eos_ids(tokenizer))
    assert all(len(r["completion_ids"]) == 6 for r in train_rows)  # every completion is longer
    assert not any(set(r["completion_ids"]) & ends for r in train_rows)
    long_enough = config(pairs["llama"], train_path, tmp_path / "p")
    for r in load_run_data(long_enough, tokenizer).train_rows:
        assert r["completion_ids"][-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")


# ------------------------------------------------------------------ generate / score / eval


@pytest.mark.parametrize("mode", ["score", "generate"])
def test_cache_reads_messages(pairs, data, tmp_path, mode):
    from opd.data.cache_format import CacheReader
    from opd.teachers.cache.generate import CacheSpec, build_cache

    teacher = str(pairs["qwen3"][0])
    spec = CacheSpec(mode=mode, prompt_field="messages", topk=8, max_new_tokens=4, shard_size=8)
    build_cache(teacher, data[("messages", "jsonl")], tmp_path / "c", spec, device="cpu")
    tok = build_tokenizer()
    enc = Encoder(tok, DataConfig(prompt_field="messages"))
    cached = CacheReader(tmp_path / "c").rows()
    assert len(cached) == len(rows()["messages"])
    for row in cached:
        assert row["prompt_ids"] == enc.row_prompt_ids(row)
        if mode == "score":
            assert row["completion_ids"] == enc.completion_ids(enc.row_completion(row))


def test_eval_on_messages_with_boxed_metric(pairs, data, tmp_path):
    evals = str(data[("messages", "datasetdict")])  # its "test" split: data.eval_split
    over = dict(preset="on_policy", eval_every=1, eval_metric="boxed", steps=1, data__eval=evals)
    cfg = config(pairs["llama"], data[("messages", "dataset")], tmp_path / "o", **over)
    train(cfg)
    records = read_metrics(cfg.output_dir)
    assert [r["step"] for r in records if "eval_accuracy" in r] == [0, 1]
    assert all(0.0 <= r["eval_accuracy"] <= 1.0 for r in records if "eval_accuracy" in r)
