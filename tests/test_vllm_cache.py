"""`opd generate|score --engine vllm`: the same cache format, equal scores, exact resume.

Scores are compared with the built-in engine's (HF forward) on the same tokens at 2e-4
(float32 both; kernels differ in summation order). Tail masses come from 1 - sum(top-k)
on vLLM's side, resolved to ~1e-6 (`opd.data.cache_format.TAIL_FLOOR`), so they are compared
in probability.
"""

import json

import numpy as np
import pytest

from opd.cli import main as cli_main
from opd.config.parse import VllmConfig
from opd.data.cache_format import CacheReader, read_manifest
from opd.teachers.cache.generate import CacheSpec, build_cache
from vllm_util import SETTINGS, vllm_or_skip

vllm_or_skip()

TOL = 2e-4
N_PROMPTS = 7


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("vllm_cache") / "pairs.jsonl"
    with path.open("w") as fh:
        for i in range(N_PROMPTS):
            fh.write(json.dumps({"prompt": f"{i}+{2 * i}=", "completion": f"{3 * i}x"}) + "\n")
    return path


def spec(**kw):
    base = dict(topk=8, max_new_tokens=6, shard_size=3, n=2, seed=3, engine="vllm")
    base.update(logprob_dtype="float32")
    base.update(max_prompt_tokens=32, max_completion_tokens=16)
    return CacheSpec(**{**base, **kw})


SET = VllmConfig(**SETTINGS)


def content(root):
    reader = CacheReader(root)
    rows = {r["cache_row"]: r for r in reader.rows()}
    return rows, {rid: reader.token_arrays(rid) for rid in reader.row_ids()}


def assert_scores_close(a, b):
    for rid, arr in a.items():
        n = len(arr["completion_ids"])  # b may hold one more token (EOS) past a's end
        other = {k: v[:n] for k, v in b[rid].items()}
        assert np.array_equal(arr["completion_ids"], other["completion_ids"])
        assert np.abs(arr["token_logprobs"] - other["token_logprobs"]).max(initial=0) < TOL
        assert np.array_equal(arr["topk_ids"], other["topk_ids"])
        assert np.abs(arr["topk_logprobs"] - other["topk_logprobs"]).max(initial=0) < TOL
        tails = np.exp(arr["tail_logmass"]) - np.exp(other["tail_logmass"])
        assert np.abs(tails).max(initial=0) < 2e-6


def test_generate_resumes_exactly_and_scores_like_the_builtin_engine(vllm_pair, prompts, tmp_path):
    teacher = str(vllm_pair[0])
    whole = tmp_path / "whole"
    m = build_cache(teacher, prompts, whole, spec(), vllm_settings=SET)
    assert m["complete"] and m["spec"]["engine"] == "vllm"
    assert m["counts"]["rows"] == 2 * N_PROMPTS and m["counts"]["completion_tokens"] > 20

    def die_after_shard_one(index):
        if index == 1:
            raise KeyboardInterrupt("killed")

    killed = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        build_cache(
            teacher, prompts, killed, spec(), vllm_settings=SET, on_shard=die_after_shard_one
        )
    assert [s["index"] for s in read_manifest(killed)["shards"]] == [0, 1]
    build_cache(teacher, prompts, killed, spec(), vllm_settings=SET)
    rows_k, arrays_k = content(killed)
    rows_w, arrays_w = content(whole)
    assert rows_k == rows_w
    assert all(
        all(np.array_equal(arrays_k[r][k], arrays_w[r][k]) for k in arrays_w[r]) for r in arrays_w
    )
    # The same completions scored by the HF forward (`opd score` on the cached rows).
    scored = tmp_path / "pairs.jsonl"
    with scored.open("w") as fh:
        for r in sorted(rows_w.values(), key=lambda r: r["cache_row"]):
            fh.write(json.dumps({"prompt": r["prompt"], "completion": r["completion"]}) + "\n")
    hf = tmp_path / "hf"
    build_cache(teacher, scored, hf, spec(mode="score", n=1, engine="hf"))
    _, arrays_hf = content(hf)
    # generate stores text rows without EOS: rows that ended in EOS lack that one token
    eos = read_manifest(whole)["tokenizer"]["eos_id"]
    unfinished = [rid for rid, arr in arrays_w.items() if arr["completion_ids"][-1] != eos]
    assert unfinished
    assert_scores_close({r: arrays_w[r] for r in unfinished}, arrays_hf)


def test_score_equals_the_builtin_engine_and_cli_flag(vllm_pair, prompts, tmp_path, capsys):
    teacher = str(vllm_pair[0])
    builtin = tmp_path / "builtin"
    build_cache(teacher, prompts, builtin, spec(mode="score", n=1, engine="hf"))
    out = tmp_path / "vllm"
    args = ["score", "--teacher", teacher, "--prompts", str(prompts), "--out", str(out)]
    args += [
        "--engine",
        "vllm",
        "--topk",
        "8",
        "--shard-size",
        "3",
        "--seed",
        "3",
        "--logprob-dtype",
        "float32",
    ]
    args += ["--max-prompt-tokens", "32", "--max-completion-tokens", "16", "--kv-cache-gb", "0.25"]
    assert cli_main(args) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["counts"]["rows"] == 7
    assert read_manifest(out)["spec"]["engine"] == "vllm"
    assert_scores_close(content(out)[1], content(builtin)[1])
