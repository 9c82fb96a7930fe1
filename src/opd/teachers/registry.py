"""The teacher named by `teacher.kind`: one place that maps kinds to implementations."""

from __future__ import annotations

import torch

from opd.config.checks import uses_teacher
from opd.config.parse import TrainConfig
from opd.modeling.hf import load_causal_lm, load_tokenizer, shared_vocab_size
from opd.modeling.vocab import check_same_tokenizer
from opd.teachers.cross_tokenizer.build import needs_alignment, wrap
from opd.teachers.local import LocalTeacher
from opd.teachers.routing import build_routed_teacher


def build_teacher(
    config: TrainConfig,
    tokenizer,
    device: torch.device,
    student=None,
    resume_from=None,
    encoder=None,
):
    """The teacher named by `teacher.kind`, or None when the objective never asks one.

    `student` (and `resume_from`) are needed by `teacher.kind=self` only; `encoder` (the
    run's `opd.data.Encoder`) by a teacher with another tokenizer."""
    kind = config.teacher.kind
    if not uses_teacher(config):
        return None  # SFT on fixed text, or pure RL on student samples: no teacher at all
    if kind == "self":  # the student's own model with privileged context (OPSD/SDFT)
        from opd.teachers.self_teacher import build_self_teacher

        return build_self_teacher(config, tokenizer, student, resume_from)
    if kind == "local":
        forward = config.loss.fused_forward  # also the decoder forward of its scores
        if not config.teacher.path:
            raise ValueError("teacher.path is required for teacher.kind='local'")
        teacher_tok = load_tokenizer(config.teacher.path)
        if not needs_alignment(config, tokenizer, teacher_tok):
            check_same_tokenizer(tokenizer, teacher_tok, config.teacher.path)
            model = load_causal_lm(config.teacher.path, dtype=config.teacher.dtype, device=device)
            return LocalTeacher(model, shared_vocab_size(tokenizer, model), forward)
        if encoder is None:
            raise ValueError("a teacher with another tokenizer needs the run's encoder")
        model = load_causal_lm(config.teacher.path, dtype=config.teacher.dtype, device=device)
        inner = LocalTeacher(model, shared_vocab_size(teacher_tok, model), forward)
        return wrap(config, inner, tokenizer, teacher_tok, encoder, config.teacher.path)
    if kind == "remote":  # an `opd serve` or vLLM server; checks the tokenizer at connect
        from opd.teachers.remote import remote_teacher_from_config

        named = config.cross_tokenizer.teacher_tokenizer
        teacher_tok = load_tokenizer(named) if named else None
        if teacher_tok is None or not needs_alignment(config, tokenizer, teacher_tok):
            return remote_teacher_from_config(config, tokenizer)
        k = config.cross_tokenizer.boundary_k(config.loss.objective)  # the boundary rule's
        inner = remote_teacher_from_config(config, teacher_tok, min_topk=k)  # vs teacher_tok
        return wrap(config, inner, tokenizer, teacher_tok, encoder, config.teacher.url)
    if kind == "cached":  # offline log-probs: the teacher model is never loaded
        from opd.teachers.cached import build_cached_teacher

        return build_cached_teacher(config, tokenizer, encoder)
    if kind == "routed":  # `teachers:` with several teachers, each built as it would be alone
        return build_routed_teacher(
            config, lambda one: build_teacher(one, tokenizer, device, student, resume_from, encoder)
        )
    if kind == "vllm":  # a local vLLM engine scoring with prompt_logprobs
        from opd.teachers.vllm import build_vllm_teacher

        return build_vllm_teacher(config, tokenizer, encoder)
    raise ValueError(f"teacher.kind={kind!r} is not available in this build of opd")
