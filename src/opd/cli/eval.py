"""`opd eval`: score one model (a student, a teacher or a checkpoint) on held-out rows.

    opd eval CONFIG.yaml [key=value ...] [--model DIR]

It reads the rows of `data.eval` (the first `eval_size`), and prints one JSON object:
the task metric on greedy completions (`eval_metric`), the held-out loss (mean per-token
cross-entropy of the rows' completions, when they have them), and, with a local teacher
(`teacher.path`) other than the model, the exposure-bias probe: the mean per-token
divergence to the teacher on prefixes the model sampled itself and on prefixes the
teacher sampled, and their difference (opd.evaluation.exposure_bias). With a teacher of
another tokenizer the divergences are over the positions where the two tokenizations
align one to one, with exact span log-ratios beside them; the output's `basis` says so
(opd.evaluation.cross_divergence).
"""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from pathlib import Path

DIVERGENCES = ("forward_kl", "reverse_kl", "tvd")


def add_eval_command(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="score a model on data.eval: task metric, held-out loss, divergence to the teacher",
        description=__doc__.split("\n\n", 2)[2],
    )
    p.add_argument("config", nargs="?", help="YAML config (optional: everything can be key=value)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.eval=test.jsonl")
    p.add_argument("--model", default=None, help="model directory to score (default: student.path)")
    p.add_argument("--out", default=None, help="also write the JSON to this file")
    p.set_defaults(func=_cmd_eval)


def load_model(path: str, dtype: str, device):
    """A full model or a LoRA checkpoint (adapter_config.json) with its base."""
    if (Path(path) / "adapter_config.json").is_file():
        from opd.config.extras import require

        require("peft", f"scoring the LoRA checkpoint {path}")
        from peft import AutoPeftModelForCausalLM

        return AutoPeftModelForCausalLM.from_pretrained(path).to(device)
    from opd.modeling.hf import load_causal_lm

    return load_causal_lm(path, dtype=dtype, device=device)


def evaluate_model(config, model_path: str) -> dict:
    """The JSON object `opd eval` prints, for the model at `model_path`."""
    import torch

    with torch.no_grad():  # evaluation trains nothing: no autograd graph anywhere in it
        return _evaluate(config, model_path)


def _evaluate(config, model_path: str) -> dict:
    import torch

    from opd.data.checks import check_columns
    from opd.data.rows import Encoder, load_rows
    from opd.evaluation.divergence import exposure_bias, heldout_loss
    from opd.evaluation.generation import sample_completions, task_accuracy
    from opd.evaluation.rewards import resolve_metric
    from opd.modeling.checks import check_device, check_model_path
    from opd.modeling.hf import load_tokenizer, resolve_device, shared_vocab_size
    from opd.modeling.vocab import check_same_tokenizer
    from opd.teachers.local import LocalTeacher

    data = config.data
    if not data.eval:
        raise ValueError("opd eval needs data.eval: a file of held-out rows (prompt, answer)")
    check_device(config.device)
    check_model_path("--model" if model_path != config.student.path else "student.path", model_path)
    rows = load_rows(data.eval, data.eval_split, data.max_row_bytes)[: config.eval_size]
    check_columns(rows, f"data.eval={data.eval}", [data.prompt_field])
    teacher_path = config.teacher.path if config.teacher.kind == "local" else ""
    probe = bool(teacher_path) and Path(teacher_path).resolve() != Path(model_path).resolve()
    if probe:
        check_model_path("teacher.path", teacher_path)
    metric = resolve_metric(config.eval_metric, data.answer_field)
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    tokenizer = load_tokenizer(model_path)
    model = load_model(model_path, config.student.dtype, device).eval().requires_grad_(False)
    vocab = shared_vocab_size(tokenizer, model)
    encoder = Encoder(tokenizer, data)
    common = {
        "prompt_field": data.prompt_field,
        "max_new_tokens": config.sampling.max_new_tokens,
        "seed": config.seed,
    }
    result = {"model": model_path, "rows": len(rows), "eval_metric": config.eval_metric}
    if data.answer_field in rows[0] or config.eval_metric != "exact_match":
        result["accuracy"] = task_accuracy(model, encoder, rows, metric, vocab_size=vocab, **common)
    if all(data.completion_field in r for r in rows):
        result["heldout_loss"] = heldout_loss(
            model,
            encoder,
            rows,
            prompt_field=data.prompt_field,
            completion_field=data.completion_field,
            vocab_size=vocab,
        )
    if probe:
        from opd.modeling.hf import load_causal_lm
        from opd.teachers.cross_tokenizer.build import needs_alignment

        t_tok = load_tokenizer(teacher_path)
        if needs_alignment(config, tokenizer, t_tok):  # another tokenizer or chat template
            result["teacher"] = teacher_path
            result["divergence_to_teacher"] = _cross_probe(
                config, model, tokenizer, encoder, t_tok, rows, vocab, device
            )
            return result
        check_same_tokenizer(tokenizer, t_tok, teacher_path)
        t_model = load_causal_lm(teacher_path, dtype=config.teacher.dtype, device=device)
        vocab = shared_vocab_size(tokenizer, model, t_model)
        teacher = LocalTeacher(t_model, vocab)
        sampling = {**common, "vocab_size": vocab, "temperature": config.sampling.temperature}
        own = sample_completions(model, encoder, rows, **sampling)
        theirs = sample_completions(t_model, encoder, rows, **sampling)
        gaps = exposure_bias(
            model,
            teacher,
            own,
            theirs,
            pad_id=tokenizer.pad_token_id,
            vocab_size=vocab,
            kinds=DIVERGENCES,
        )
        result["teacher"] = teacher_path
        result["divergence_to_teacher"] = gaps
    return result


def _cross_probe(config, model, tokenizer, encoder, t_tok, rows, vocab, device) -> dict:
    """The exposure-bias probe with a teacher of another tokenizer: mapped divergences at
    one-to-one positions and exact span log-ratios (opd.evaluation.cross_divergence)."""
    from opd.evaluation.cross_divergence import cross_exposure_bias
    from opd.modeling.hf import load_causal_lm, shared_vocab_size
    from opd.teachers.cross_tokenizer.build import cross_teacher
    from opd.teachers.local import LocalTeacher

    path = config.teacher.path
    t_model = load_causal_lm(path, dtype=config.teacher.dtype, device=device)
    inner = LocalTeacher(t_model, shared_vocab_size(t_tok, t_model))
    cross = cross_teacher(config, inner, tokenizer, t_tok, encoder, path)
    sampling = {
        "max_new_tokens": config.sampling.max_new_tokens,
        "temperature": config.sampling.temperature,
        "seed": config.seed,
    }
    return cross_exposure_bias(
        model, cross, rows, s_encoder=encoder, sampling=sampling, vocab_size=vocab,
        kinds=DIVERGENCES,
    )  # fmt: skip


def _cmd_eval(args) -> int:
    from opd.config.parse import config_from_dict, read_config_file
    from opd.config.paths import check_file_target
    from opd.run.lock import is_run_dir, run_dir_lock

    data = read_config_file(args.config) if args.config else {}
    overrides = [*args.overrides, *([f"student.path={args.model}"] if args.model else [])]
    config = config_from_dict(eval_mapping(data, overrides))
    out = check_file_target("--out", args.out) if args.out else None  # before the work
    # Writing into a run directory: hold its lock, so a run writing it refuses us (or we it).
    writes_run = out is not None and is_run_dir(out.parent)
    with run_dir_lock(out.parent, "opd eval", "--out") if writes_run else nullcontext():
        result = evaluate_model(config, config.student.path)
        text = json.dumps(result, indent=1)
        if out is not None:
            write_text_atomic(out, text + "\n")
    print(text)
    return 0


def write_text_atomic(path: Path, text: str) -> None:
    """A regular file is replaced whole (never half-written); a device such as /dev/null
    is written to as it is."""
    from opd.config.paths import OutOfSpace, is_out_of_space

    if path.exists() and not path.is_file():
        path.write_text(text)
        return
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as err:
        if is_out_of_space(err):
            raise OutOfSpace(err.errno, f"no space left on device writing --out {path}") from err
        raise
    finally:
        tmp.unlink(missing_ok=True)


def eval_mapping(data: dict, overrides: list[str]) -> dict:
    """The mapping with overrides applied; data.train defaults to data.eval, which is all
    an evaluation reads (a run config's validation asks for training rows)."""
    from opd.config.parse import _deep_merge, parse_override

    for item in overrides:
        data = _deep_merge(data, parse_override(item))
    section = dict(data.get("data") or {})
    if not section.get("train") and section.get("eval"):
        section["train"] = section["eval"]
        data = {**data, "data": section}
    return data
