"""Offline teacher caches that were tampered with or lost their manifest."""

import json
import random
import shutil

import pytest

from opd.cli import main as cli_main
from opd.cli.demo.tiny import save_tiny_pair
from opd.config.parse import config_from_dict
from opd.data.cache_format import CacheError, CacheReader, read_manifest
from opd.run.loop import train
from opd.teachers.cache.generate import CacheSpec, build_cache
from opd.teachers.cache.inspect import cache_report


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    teacher, student = save_tiny_pair(tmp_path_factory.mktemp("models"))
    root = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    rows = [{"prompt": f"{rng.randint(0, 99)}+1=", "completion": "x"} for _ in range(4)]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = CacheSpec(mode="score", topk=4, shard_size=2)
    build_cache(str(teacher), root / "prompts.jsonl", root / "cache", spec)
    return root / "cache", student


def _copy(cache, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(cache, out)
    return out


@pytest.mark.parametrize(
    "bad_name",
    ["../../../etc/hostname", "/etc/hostname", "shard-00000.safetensors/../../x", "other.bin"],
)
def test_manifest_naming_files_outside_the_cache_is_refused(cache, tmp_path, bad_name, capsys):
    root = _copy(cache[0], tmp_path)
    manifest = json.loads((root / "manifest.json").read_text())
    files = manifest["shards"][0]["files"]
    files[bad_name] = files.pop("shard-00000.jsonl")
    (root / "manifest.json").write_text(json.dumps(manifest))
    for read in (read_manifest, CacheReader, cache_report):
        with pytest.raises(CacheError, match="not the cache's own"):
            read(root)
    assert cli_main(["inspect", str(root)]) == 2
    assert "not the cache's own" in capsys.readouterr().err


def test_shard_name_that_leaves_the_cache_is_refused(cache, tmp_path):
    root = _copy(cache[0], tmp_path)
    manifest = json.loads((root / "manifest.json").read_text())
    entry = manifest["shards"][0]
    entry["name"] = "../outside"
    entry["files"] = {"../outside.safetensors": {}, "../outside.jsonl": {}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="not the cache's own"):
        CacheReader(root, verify=False)


def _train_on(root, student, tmp_path, **teacher):
    data = {
        "student": {"path": str(student)},
        "teacher": {"kind": "cached", "path": "/nonexistent", **teacher},
        "data": {"train": str(root)},
        "loss": {"objective": "kd", "estimator": "topk", "topk": 4},
        "steps": 1,
        "batch_size": 2,
        "micro_batch_size": 2,
        "output_dir": str(tmp_path / "run"),
    }
    return train(config_from_dict(data))


@pytest.mark.parametrize("damage", ["lost", "torn"])
@pytest.mark.parametrize("named", [False, True])  # teacher.cache_dir set, or taken from data.train
def test_lost_or_torn_manifest_says_so_and_how_to_rebuild(cache, tmp_path, damage, named):
    root = _copy(cache[0], tmp_path)
    manifest = root / "manifest.json"
    if damage == "lost":
        manifest.unlink()
    else:
        manifest.write_text(manifest.read_text()[:100])
    extra = {"cache_dir": str(root)} if named else {}
    with pytest.raises(CacheError, match="manifest") as info:
        _train_on(root, cache[1], tmp_path, **extra)
    message = str(info.value)
    assert ("lost its manifest.json" if damage == "lost" else "is damaged") in message
    assert "rerun the `opd generate` / `opd score` command" in message
    assert "teacher.cache_dir is required" not in message
