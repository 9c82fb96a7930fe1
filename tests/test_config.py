"""Config parsing as people type it, and the key listing of `opd config`."""

import dataclasses
import typing

import pytest

from opd.config.docs import attribute_docs, format_keys, key_docs
from opd.config.parse import TrainConfig, config_from_dict, load_config, parse_override

BASE = {"student": {"path": "s"}, "data": {"train": "t.jsonl"}}


def _config_classes(cls=TrainConfig):
    yield cls
    for hint in typing.get_type_hints(cls).values():
        if dataclasses.is_dataclass(hint):
            yield from _config_classes(hint)


def test_every_field_has_a_doc_and_every_doc_a_field():
    for cls in _config_classes():
        docs = attribute_docs(cls)
        fields = {f.name for f in dataclasses.fields(cls)}
        sections = {
            name
            for name, hint in typing.get_type_hints(cls).items()
            if dataclasses.is_dataclass(hint)
        }
        assert fields - sections - set(docs) == set(), f"{cls.__name__}: fields without a doc"
        assert set(docs) - fields == set(), f"{cls.__name__}: docs of fields that do not exist"
    assert all(d.doc for d in key_docs())


def test_listing_shows_every_key_with_type_default_and_choices():
    text = format_keys()
    for doc in key_docs():
        assert f"  {doc.key} (" in text, doc.key
    assert "loss.divergence (str, default forward_kl) one of: forward_kl, reverse_kl, jsd" in text
    assert "optim.lr (float, default 1e-05)" in text
    assert "report_to (list[str], default [jsonl]) one of: jsonl, tensorboard, wandb" in text
    assert "one of: '', seqkd, supervised_kd, gkd, on_policy" in text  # preset


@pytest.mark.parametrize("name", ["seqkd", "gkd", "opsd"])
def test_a_presets_name_shows_what_it_sets(name):
    """`opd config seqkd`: every key the preset sets with its value, the defining ones marked;
    the listing names the presets."""
    from opd.config.checks import PRESET_DEFINES
    from opd.config.presets import PRESETS

    lines = format_keys(name).splitlines()
    assert lines[0] == f"preset={name}:"
    resolved = config_from_dict({**BASE, "preset": name})  # what the preset really sets
    for section, values in PRESETS[name].items():
        for key in values:
            value = getattr(getattr(resolved, section), key)
            line = next(x for x in lines if x.startswith(f"  {section}.{key}="))
            assert line.split()[0] == f"{section}.{key}={value}"
            assert ("defines the method" in line) == ((section, key) in PRESET_DEFINES[name])
    assert "presets: seqkd, supervised_kd, gkd" in format_keys()


def test_divergence_choices_are_the_losses_kinds():
    from opd.losses import KINDS

    hint = typing.get_type_hints(TrainConfig)["loss"]
    assert typing.get_args(typing.get_type_hints(hint)["divergence"]) == KINDS


@pytest.mark.parametrize("text", ["1e-5", "1.0e-5", "0.00001"])
def test_float_overrides_as_people_type_them(text):
    cfg = config_from_dict(BASE, [f"optim.lr={text}"])
    assert cfg.optim.lr == 1e-5 and isinstance(cfg.optim.lr, float)


def test_yaml_file_floats_without_a_dot(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(
        "student: {path: s}\ndata: {train: t.jsonl}\noptim:\n  lr: 2e-5\nloss:\n  beta: 1e-1\n"
    )
    cfg = load_config(path)
    assert cfg.optim.lr == 2e-5 and cfg.loss.beta == 0.1
    with pytest.raises(ValueError, match=r"optim\.lr must be of type float, got 'fast'"):
        config_from_dict(BASE, ["optim.lr=fast"])
    with pytest.raises(ValueError, match="steps must be of type int, got '1e3'"):
        config_from_dict(BASE, ["steps=1e3"])


def test_string_fields_take_the_text_as_written():
    cfg = config_from_dict(
        BASE,
        [
            "teacher.kind=self",
            "teacher.privileged_template={prompt} Ref: {solution}",
            "data.system_prompt=Note: be brief",
            "output_dir=runs/a=b",
            "preset=gkd",
        ],
    )
    assert cfg.teacher.privileged_template == "{prompt} Ref: {solution}"
    assert cfg.data.system_prompt == "Note: be brief"
    assert cfg.output_dir == "runs/a=b"
    assert cfg.source.lmbda == 0.5  # the preset applied


def test_non_string_overrides_are_yaml():
    cfg = config_from_dict(BASE, ["sampling.stop=[</s>, '##']", "resume=true", "report_to=jsonl"])
    assert cfg.sampling.stop == ["</s>", "##"] and cfg.resume is True
    assert cfg.report_to == ["jsonl"]
    assert config_from_dict(BASE, ["sampling.stop=# end"]).sampling.stop == ["# end"]
    with pytest.raises(
        ValueError, match=r"override 'sampling.stop=\[a': the value is not valid YAML"
    ):
        parse_override("sampling.stop=[a")
    with pytest.raises(ValueError, match="report_to='mlflow' is not allowed"):
        config_from_dict(BASE, ["report_to=[jsonl, mlflow]"])


def test_malformed_config_file_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("student:\n  path: s\nloss: {objective: kd\nsteps: 3\n")
    with pytest.raises(ValueError, match=rf"{path}:4:\d+: invalid YAML"):
        load_config(path)
    with pytest.raises(ValueError, match="is a directory; pass a YAML file"):
        load_config(tmp_path)
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_config(tmp_path / "list.yaml")


def test_literal_choices_name_the_key():
    with pytest.raises(ValueError, match=r"student\.dtype='fp8' is not allowed; choose one of"):
        config_from_dict(BASE, ["student.dtype=fp8"])
    with pytest.raises(ValueError, match=r"loss\.estimator='sampled' is not allowed"):
        config_from_dict(BASE, ["loss.estimator=sampled"])
    with pytest.raises(ValueError, match="device='gpu': use auto, cpu, cuda"):
        config_from_dict(BASE, ["device=gpu"])
