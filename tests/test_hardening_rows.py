"""Pathological rows are refused before a tokenizer sees them; every config value is checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opd.cli import main as cli_main
from opd.config.parse import config_from_dict
from opd.data.row_limits import MAX_DEPTH
from opd.data.rows import load_rows

GOOD = {"prompt": "1+1=", "completion": "2", "answer": "2"}


def _jsonl(path: Path, bad_line: str) -> Path:
    """Row 1 is fine, row 2 (line 2) is `bad_line`, row 3 is fine."""
    path.write_text(json.dumps(GOOD) + "\n" + bad_line + "\n" + json.dumps(GOOD) + "\n")
    return path


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("opd: error:")]
    assert len(lines) == 1, err
    return lines[0]


BAD_ROWS = {
    # name -> (line 2 of the file, words of the error)
    "big": (json.dumps({**GOOD, "prompt": "x" * (3 << 20)}), "holds more than 1048576 bytes"),
    "deep": ('{"prompt": ' + "[" * 200_000 + "]" * 200_000 + "}", "deeper than"),
    "surrogate": ('{"prompt": "a \\ud800 b", "completion": "2"}', "holds \\ud800"),
}


@pytest.mark.parametrize("name", sorted(BAD_ROWS))
def test_bad_row_is_refused_naming_file_and_line(base_config, tmp_path, capsys, name):
    line, words = BAD_ROWS[name]
    data = _jsonl(tmp_path / "train.jsonl", line)
    argv = ["train", f"student.path={base_config()['student']['path']}", f"data.train={data}"]
    argv += [f"teacher.path={base_config()['teacher']['path']}", f"output_dir={tmp_path / 'r'}"]
    assert cli_main(argv) == 2
    error = _error_line(capsys)
    assert f"{data}:2: " in error and words in error, error


def test_row_bound_is_the_config_key_and_a_long_line_is_not_read_whole(tmp_path):
    data = _jsonl(tmp_path / "t.jsonl", json.dumps({**GOOD, "prompt": "é" * 600}))
    assert len(load_rows(data, max_row_bytes=2000)) == 3  # 1,200 bytes of text: within
    with pytest.raises(ValueError, match=r"t\.jsonl:2: .*more than 1000 bytes of text"):
        load_rows(data, max_row_bytes=1000)
    huge = _jsonl(tmp_path / "h.jsonl", json.dumps({**GOOD, "prompt": "y" * (1 << 20)}))
    with pytest.raises(ValueError, match=r"h\.jsonl:2: the line is over 71536 bytes"):
        load_rows(huge, max_row_bytes=1000)
    config = config_from_dict(
        {"student": {"path": "s"}, "data": {"train": str(data), "max_row_bytes": 1000}}
    )
    assert config.data.max_row_bytes == 1000


def test_nesting_is_bounded_below_what_python_can_parse(tmp_path):
    shallow = {"prompt": "p", "meta": json.loads("[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1))}
    deep = {"prompt": "p", "meta": json.loads("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1))}
    path = tmp_path / "n.jsonl"
    path.write_text(json.dumps(shallow) + "\n")
    assert load_rows(path)[0] == shallow
    path.write_text(json.dumps(shallow) + "\n" + json.dumps(deep) + "\n")
    with pytest.raises(ValueError, match=rf"n\.jsonl:2: nests lists/objects deeper than {MAX_DEPTH}"):
        load_rows(path)


def test_json_file_rows_are_bounded_too(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('[{"prompt": "ok"}, {"prompt": "\\udfff"}]')
    with pytest.raises(ValueError, match=r"rows\.json: row 1: column 'prompt' holds \\udfff"):
        load_rows(path)
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=r"rows\.json: nests lists/objects deeper"):
        load_rows(path)


@pytest.mark.parametrize(
    "override,words",
    [
        ("loss.beta=inf", "loss.beta=inf must be a finite number"),
        ("loss.beta=1.5", "loss.beta=1.5 must be <= 1"),
        ("loss.discount=.nan", "loss.discount=nan must be a finite number"),
        ("loss.skew_alpha=-1", "loss.skew_alpha=-1.0 must be in [0, 1)"),
        ("lora.alpha=100000000000000000000", "lora.alpha=100000000000000000000 with lora.r=16"),
        ("teacher.timeout_s=.inf", "teacher.timeout_s=inf must be a finite number"),
        ("teacher.privileged_template={0}", "use named fields"),
        ("reward.pattern=(", "reward.pattern='(' is not a regex"),
        ("resume_allow_changes=1e308", "resume_allow_changes[0]='1e308' is not a config key"),
        ("resume_allow_changes=[optim, 5]", "resume_allow_changes[1]=5 must be of type str"),
        ("sampling.stop=[1]", "sampling.stop[0]=1 must be of type str"),
    ],
)
def test_values_of_keys_the_run_does_not_use_are_checked(base_config, capsys, override, words):
    """A supervised KD run with a forward KL, no LoRA, a local teacher, no reward, no resume:
    none of these keys is used, and each value is still refused."""
    data = base_config(preset="supervised_kd")
    argv = ["train", *(f"{k}.{kk}={vv}" for k, v in data.items() if isinstance(v, dict)
                       for kk, vv in v.items()), f"output_dir={data['output_dir']}", override]  # fmt: skip
    assert cli_main(argv) == 2
    assert words in _error_line(capsys)


def test_unused_keys_with_sound_values_still_run():
    config = config_from_dict(
        {
            "student": {"path": "s"},
            "data": {"train": "t"},
            "loss": {"beta": 0.0, "skew_alpha": 0.5},
            "lora": {"alpha": 64, "r": 16},
            "resume_allow_changes": ["optim", "loss.beta"],
        }
    )
    assert config.loss.beta == 0.0 and config.resume_allow_changes == ["optim", "loss.beta"]
