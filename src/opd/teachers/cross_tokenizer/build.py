"""When a run's teacher needs alignment, and the wrapped teacher it then gets."""

from __future__ import annotations

import logging
from dataclasses import replace

from opd.data.encoding import Encoder
from opd.modeling.vocab import vocabulary_differences
from opd.teachers.cross_tokenizer.align import ByteTable
from opd.teachers.cross_tokenizer.teacher import CrossTokenizerTeacher

log = logging.getLogger("opd")


def same_tokenizer(student_tok, teacher_tok) -> bool:
    """The fast identity check: the same vocabulary (token -> id), the same special tokens
    and the same chat template. Such a teacher takes the shared-vocabulary path untouched."""
    return (
        student_tok.get_vocab() == teacher_tok.get_vocab()
        and getattr(student_tok, "chat_template", None) == getattr(teacher_tok, "chat_template", None)
        and set(student_tok.all_special_tokens) == set(teacher_tok.all_special_tokens)
    )


def needs_alignment(config, student_tok, teacher_tok) -> bool:
    return config.cross_tokenizer.when == "always" or not same_tokenizer(student_tok, teacher_tok)


def refuse_unsupported(config, where: str) -> None:
    """What alignment cannot serve, with the reason (a one-line error)."""
    if config.source.lmbda < 1 and config.source.off_policy == "teacher":
        raise ValueError(
            f"teacher {where} has another tokenizer: source.off_policy=teacher would sample "
            "completions in the teacher's tokens, which the student's batches cannot hold; "
            "use source.off_policy=dataset (e.g. a SeqKD cache written by opd generate)"
        )


def wrap(config, inner, student_tok, teacher_tok, student_encoder, where: str, topk_cap: int | None = None):
    """`inner` (a teacher scoring its own tokens) seen through the student's grid, for a
    training run (what alignment cannot serve there is refused first)."""
    refuse_unsupported(config, where)
    return cross_teacher(config, inner, student_tok, teacher_tok, student_encoder, where, topk_cap)


def cross_teacher(
    config, inner, student_tok, teacher_tok, student_encoder, where: str, topk_cap: int | None = None
):
    """`CrossTokenizerTeacher` over `inner`, the tokenizers checked for a byte reading (also
    `opd eval`'s probe, which samples nothing in the teacher's tokens for training).
    `topk_cap`: the most top-k `inner` can give at temperature 1 (a cache's); with none,
    `pg` spans keep the token rule, said in the log."""
    for tok in (student_tok, teacher_tok):
        try:
            ByteTable.of(tok)
        except ValueError as err:  # no byte reading: the vocabularies cannot be aligned
            differ = vocabulary_differences(student_tok, teacher_tok)
            shown = "; ".join(differ[:3])
            raise ValueError(
                f"teacher {where} reads {len(differ)} of the student's token ids as other "
                f"tokens ({shown}), and cannot be aligned by bytes: {err}"
            ) from None
    # The teacher's prompt is not cut: the student's rows fit the student's limit, and the
    # teacher's rendering of the same row may take more tokens.
    data = replace(config.data, max_prompt_tokens=max(config.data.max_prompt_tokens, 1 << 20))
    teacher_encoder = Encoder(teacher_tok, data)
    ct = config.cross_tokenizer
    boundary_topk = ct.boundary_topk if ct.boundary == "marginal" else 0
    if topk_cap is not None:
        boundary_topk = min(boundary_topk, topk_cap)
    if ct.boundary_k(config.loss.objective) and not boundary_topk:
        log.info("teacher %s holds no top-k: pg spans take the teacher's tokens as cut "
                 "(cross_tokenizer.boundary=token)", where)  # fmt: skip
    if not teacher_encoder.use_chat and student_encoder.use_chat:
        log.warning("teacher %s has no chat template: its prompt is the row's plain text", where)
    teacher = CrossTokenizerTeacher(
        inner,
        student_tokenizer=student_tok,
        teacher_tokenizer=teacher_tok,
        student_encoder=student_encoder,
        teacher_encoder=teacher_encoder,
        prompt_template=config.cross_tokenizer.prompt_template,
        span_kd=config.cross_tokenizer.span_kd,
        boundary_topk=boundary_topk,
    )
    log.info(
        "teacher %s has another tokenizer or chat template: scoring by byte alignment "
        "(prompt_template=%s, boundary: %s; %.0f%% of the student's vocabulary receives the mass of some "
        "teacher token: one of the same bytes, or a longer one the student begins with it)",
        where,
        config.cross_tokenizer.prompt_template,
        f"marginal over the teacher's top-{teacher.boundary_topk}" if teacher.boundary_topk else "token",
        100 * teacher.vocab.coverage(len(student_tok)),
    )
    return teacher
