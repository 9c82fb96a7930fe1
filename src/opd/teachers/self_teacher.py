"""Self-distillation teacher (OPSD, SDFT): the student's own model with privileged context.

    p_T(. | x, c, y_<t) = p_theta_bar(. | template(x, c), y_<t),   student p_theta(. | x, y_<t)

`c` is privileged context from the dataset row (a reference solution, a demonstration),
inserted into the teacher's prompt by `teacher.privileged_template`; the student never
sees it. The completion tokens `y` are shared: the teacher's batch is assembled from its
own prompts and the student batch's completion tokens, and since completions start at the
prompt width in both (`opd.data.batch`), completion column j of either batch is the same token.

Teacher weights `theta_bar` (`teacher.self_weights`):

* `frozen`: the starting weights. With LoRA, the same module with its adapters disabled
  (peft's `disable_adapter()`), so no second copy exists; without LoRA, a deep copy taken
  before the first step (loaded from `student.path` when resuming, the same weights).
* `ema`: `theta_bar <- d * theta_bar + (1 - d) * theta` after every optimizer step, kept in
  float32. Without LoRA a deep copy holds it; with LoRA only the adapter tensors are
  shadowed and swapped in for the teacher's forward.
* `live`: the current weights; a no-grad forward of the same module.

The teacher runs in eval mode and without gradient in every case.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from opd.data.batch import SequenceBatch, assemble
from opd.data.privileged import privileged_prompt
from opd.modeling.hf import completion_hidden, completion_logits, supports_fused_head
from opd.teachers.base import TeacherScores, check_need, scores_from_hidden, scores_from_logits

WEIGHTS = ("frozen", "ema", "live")


class SelfTeacher:
    """`score(batch, need, topk)` of the student's model on privileged prompts."""

    def __init__(
        self,
        student: torch.nn.Module,
        encoder,
        *,
        vocab_size: int,
        template: str,
        prompt_field: str = "prompt",
        weights: str = "frozen",
        ema_decay: float = 0.99,
        start_model: torch.nn.Module | None = None,
    ):
        """`start_model`: the starting weights as a separate module (frozen/ema without LoRA);
        by default a deep copy of `student` as it is now."""
        if weights not in WEIGHTS:
            raise ValueError(f"teacher.self_weights={weights!r} not in {WEIGHTS}")
        if not 0.0 <= ema_decay <= 1.0:
            raise ValueError(f"teacher.ema_decay={ema_decay} must be in [0, 1]")
        self.student, self.encoder = student, encoder
        self.vocab_size, self.template, self.prompt_field = vocab_size, template, prompt_field
        self.weights, self.decay = weights, ema_decay
        self.uses_lora = getattr(student, "peft_config", None) is not None
        self.model = student  # the module whose forward is the teacher's
        self.updates = 0  # EMA updates applied
        # (live parameter, float32 shadow, module tensor to refresh from it or None)
        self._ema: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        if weights in ("frozen", "ema") and not self.uses_lora:
            self.model = start_model if start_model is not None else copy.deepcopy(student)
            self.model.eval().requires_grad_(False)
        if weights == "ema":
            self._init_ema()

    def _init_ema(self) -> None:
        held = dict(self.model.named_parameters())
        for name, live in self.student.named_parameters():
            if not live.requires_grad:
                continue  # frozen LoRA base weights never change, so their average is themselves
            if self.uses_lora:
                self._ema.append((live, live.detach().float().clone(), None))
                continue
            target = held[name]
            if target.dtype == torch.float32:
                self._ema.append((live, target.data, None))  # the copy's own storage
            else:
                self._ema.append((live, target.detach().float().clone(), target))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """EMA: `theta_bar <- d * theta_bar + (1 - d) * theta`; nothing for frozen/live."""
        if self.weights != "ema":
            return
        for live, shadow, target in self._ema:
            shadow.mul_(self.decay).add_(live.detach().float(), alpha=1.0 - self.decay)
            if target is not None:
                target.copy_(shadow)
        self.updates += 1

    def teacher_prompts(self, rows: list[dict]) -> list[list[int]]:
        return [
            self.encoder.prompt_ids(privileged_prompt(self.template, r, self.encoder)) for r in rows
        ]

    def teacher_batch(self, batch: SequenceBatch) -> SequenceBatch:
        """The batch the teacher scores: privileged prompts + the same completion tokens."""
        if len(batch.rows) != batch.size:
            raise ValueError(
                f"the self teacher needs each sequence's dataset row for its privileged "
                f"context; the batch has {len(batch.rows)} rows for {batch.size} sequences"
            )
        P = batch.prompt_width
        ids, real = batch.input_ids[:, P:].cpu(), batch.attention_mask[:, P:].bool().cpu()
        completions = [ids[i][real[i]].tolist() for i in range(batch.size)]
        return assemble(
            self.teacher_prompts(batch.rows),
            completions,
            pad_id=self.encoder.tokenizer.pad_token_id,
            source=batch.source,
            rows=batch.rows,
        )

    @contextmanager
    def _teacher_weights(self):
        was_training = self.model.training
        self.model.eval()
        stash: list[torch.Tensor] = []
        try:
            if self.weights == "frozen" and self.uses_lora:
                with self.student.disable_adapter():
                    yield
            elif self.weights == "ema" and self.uses_lora:
                for live, shadow, _ in self._ema:
                    stash.append(live.detach().clone())
                    live.data.copy_(shadow)
                yield
            else:
                yield
        finally:
            for (live, _, _), saved in zip(self._ema, stash, strict=False):
                live.data.copy_(saved)
            self.model.train(was_training)

    @torch.no_grad()
    def score(
        self, batch: SequenceBatch, need: str, topk: int = 0, temperature: float = 1.0
    ) -> TeacherScores:
        check_need(need, topk)
        teacher_batch = self.teacher_batch(batch).to(self.device)
        # Token and top-k log-probs: the head runs over hidden states a chunk of positions at
        # a time (`scores_from_hidden`), never forming [B, L, V] logits.
        chunked = need != "logits" and supports_fused_head(self.model)
        with self._teacher_weights():
            if chunked:
                out = completion_hidden(self.model, teacher_batch)
            else:
                out = completion_logits(self.model, teacher_batch, self.vocab_size)
            # The teacher's grid ends at its longest completion; the student's may be wider
            # (trailing columns are padding there, masked out of every loss).
            missing = batch.completion_width - out.shape[1]
            if missing > 0:
                out = F.pad(out, (0, 0, 0, missing))
            if chunked:
                head = self.model.get_output_embeddings()
                return scores_from_hidden(
                    out, head, self.vocab_size, batch, need, topk, temperature
                )
        return scores_from_logits(out, batch, need, topk, temperature)

    @torch.no_grad()
    def supervised_hidden(self, batch: SequenceBatch, forward) -> torch.Tensor:
        """The teacher's final hidden states at the student batch's supervised positions,
        `[N, H]` (row-major), computed by `forward(model, teacher_batch)`."""
        teacher_batch = self.teacher_batch(batch).to(self.device)
        with self._teacher_weights():
            hidden = forward(self.model, teacher_batch)
        # Completion column j holds the same token in both batches, so the supervised cells
        # must be the same ones for the rows to line up.
        mine, theirs = batch.loss_mask().to(self.device), teacher_batch.loss_mask()
        width = theirs.shape[1]
        if mine[:, width:].any() or not torch.equal(mine[:, :width], theirs):
            raise ValueError(
                "the self teacher's supervised completion tokens differ from the student "
                "batch's (a completion token is masked out of the student's loss); use "
                "loss.fused=false"
            )
        return hidden

    def checkpoint_state(self) -> dict:
        """What a resumed run needs to continue exactly: the EMA weights."""
        if self.weights != "ema":
            return {}
        return {
            "ema_shadows": [shadow.detach().cpu().clone() for _, shadow, _ in self._ema],
            "ema_updates": self.updates,
        }

    @torch.no_grad()
    def load_checkpoint_state(self, state: dict) -> None:
        if self.weights != "ema" or not state:
            return
        for (_, shadow, target), saved in zip(self._ema, state["ema_shadows"], strict=True):
            shadow.copy_(saved)
            if target is not None:
                target.copy_(shadow)
        self.updates = int(state["ema_updates"])


def build_self_teacher(config, tokenizer, student, resume_from=None) -> SelfTeacher:
    """The `teacher.kind=self` teacher of a run (called by `opd.teachers.registry.build_teacher`)."""
    from opd.data.rows import Encoder
    from opd.modeling.hf import load_causal_lm, shared_vocab_size

    if student is None:
        raise ValueError("teacher.kind='self' needs the student model to build its teacher")
    start_model = None
    separate = config.teacher.self_weights in ("frozen", "ema") and not config.lora.enabled
    if separate and resume_from is not None:
        # The student now holds the checkpoint's weights; the starting ones are on disk.
        start_model = load_causal_lm(
            config.student.path,
            dtype=config.student.dtype,
            device=next(student.parameters()).device,
        )
    return SelfTeacher(
        student,
        Encoder(tokenizer, config.data),
        vocab_size=shared_vocab_size(tokenizer, student),
        template=config.teacher.privileged_template,
        prompt_field=config.data.prompt_field,
        weights=config.teacher.self_weights,
        ema_decay=config.teacher.ema_decay,
        start_model=start_model,
    )
