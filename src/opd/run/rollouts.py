"""Where each optimizer step's micro-batches come from, relative to the weights that train.

`rollouts.mode`:
  off        the step samples its batch first, with the current weights (the serial loop);
  pipelined  the batch of step s is sampled with the weights of step max(s - lag, 0): at the
             start of step s the batch of step s + lag is drawn. With a rollout server it
             is drawn on a thread while step s trains (the server computes; this process
             waits on HTTP), and the next weight push waits for it, so which weights drew
             which batch is fixed by the step numbers alone. Deterministic: the batches in
             flight go into the checkpoint, so a resumed run equals the uninterrupted one.
  queue      a producer thread samples production slot after slot with whatever weights
             the sampler holds; a batch more than `max_staleness` steps older than the
             trained weights when it is taken is dropped and counted. A push waits for the
             production in progress, so every batch carries the version that drew it.

Each batch keeps the sampler's log q of its tokens, from the weights that drew it: the
`pg` objective's ratio p_theta/q (`loss.ratio_correction`) corrects for the lag.
"""

from __future__ import annotations

import copy
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from opd.data.batch import SequenceBatch
from opd.run.metrics import PhaseTimer
from opd.run.setup import RunSetup
from opd.run.sources import make_micro_batches, micro_batch_rows
from opd.sampling import sample
from opd.sampling.reference import Rollout, process_logits


@dataclass
class Drawn:
    """The micro-batches of one step (pipelined) or production slot (queue)."""

    slot: int  # the step (or slot) whose seeds and rows they were drawn with
    version: int  # optimizer steps the weights that sampled them had taken
    batches: list[SequenceBatch]
    seconds: float = 0.0  # wall time their production took

    @property
    def sampled(self) -> int:
        return sum(b.size for b in self.batches if b.source == "student")


def oldest_allowed(version: int, max_staleness: int) -> int:
    """The oldest sampler version a consumer at `version` accepts in queue mode."""
    return version - max_staleness


class ModelCopySampler:
    """The student's HF (or lean) sampler on a private copy of its weights: the rollout
    engine of queue mode without vLLM, so a producer thread never reads weights the
    optimizer is writing. `push_weights` copies the trained weights in."""

    def __init__(self, run: RunSetup):
        self.run = run
        self.model = copy.deepcopy(run.world.unwrap(run.student)).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.pushes = 0

    @torch.no_grad()
    def push_weights(self, model) -> None:
        self.model.load_state_dict(model.state_dict())
        self.pushes += 1

    def sample(self, prompts, *, eos_ids, seed: int, **kwargs) -> Rollout:
        s, run = self.run.config.sampling, self.run
        gen = torch.Generator(device=run.device)
        gen.manual_seed(seed)
        return sample(
            self.model,
            prompts,
            engine=s.engine,
            cuda_graphs=s.cuda_graphs,
            eos_id=eos_ids,
            pad_id=run.tokenizer.pad_token_id,
            vocab_size=run.vocab_size,
            tokenizer=run.tokenizer,
            generator=gen,
            **kwargs,
        )


class Rollouts:
    """The loop's source of micro-batches (`batches_for`) and of weight pushes
    (`after_update`), with the staleness and timing each step logs (`record`)."""

    def __init__(self, run: RunSetup):
        self.run, self.config = run, run.config.rollouts
        self.mode = self.config.mode
        self.lag = self.config.lag if self.mode == "pipelined" else 0
        self.engine = run.rollout_engine
        self.version = 0  # optimizer steps the trained weights have taken
        self.ready: dict[int, Drawn] = {}  # pipelined: drawn, not yet trained on
        self.pending: tuple[int, Future] | None = None  # pipelined, on a thread
        self.lock = threading.Lock()  # held by a production; a push waits for it
        self.dropped, self.wait_s, self.sample_s = 0, 0.0, 0.0
        self.used: Drawn | None = None
        self.next_slot = 0  # queue: the producer's next slot
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        # A server computes on its own: drawing on a thread overlaps it with training.
        self._executor = None
        if self.mode == "pipelined" and run.config.sampling.engine == "vllm_server":
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="opd-rollouts")
        if self.mode == "queue" and self.engine is None:
            self.engine = ModelCopySampler(run)

    # -- producing --------------------------------------------------------------------
    def _draw(self, slot: int, version: int | None, timer: PhaseTimer | None = None) -> Drawn:
        """`version`: of the weights that draw (None: the sampler's, read under the lock a
        push takes). `timer`: the loop's, when drawn on its thread."""
        t0 = time.perf_counter()
        with self.lock:
            version = self.version if version is None else version
            batches = make_micro_batches(self.run, slot, timer or PhaseTimer(), self.engine)
        return Drawn(slot, version, batches, time.perf_counter() - t0)

    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                drawn = self._draw(self.next_slot, None)
                self.next_slot += 1
                while not self._stop.is_set():
                    try:
                        self._queue.put(drawn, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as err:  # handed to the consumer, which raises it
            self._error = err

    def start(self, step: int) -> None:
        """Begin at `step` (0, or a resumed run's next step)."""
        self.version = step
        if self.mode == "queue":
            self._queue = queue.Queue(maxsize=self.config.max_staleness + 1)
            self._thread = threading.Thread(target=self._produce, name="opd-rollouts", daemon=True)
            self._thread.start()

    # -- consuming --------------------------------------------------------------------
    def batches_for(self, step: int, timer: PhaseTimer) -> list[SequenceBatch]:
        """The micro-batches step `step` trains on (the weights have taken `step` steps)."""
        self.version = step
        t0 = time.perf_counter()
        if self.mode == "off":
            drawn = Drawn(step, step, make_micro_batches(self.run, step, timer))
        elif self.mode == "pipelined":
            drawn = self._pipelined(step, timer)
        else:
            drawn = self._from_queue(step)
        self.wait_s += time.perf_counter() - t0
        self.used = drawn
        return drawn.batches

    def _pipelined(self, step: int, timer: PhaseTimer) -> Drawn:
        last = step + self.lag
        for slot in range(step, last + 1):
            if slot in self.ready or (self.pending and self.pending[0] == slot):
                continue
            if slot == last and self._executor is not None:
                self.pending = (slot, self._executor.submit(self._draw, slot, step))
            else:
                self.ready[slot] = self._draw(slot, step, timer)
                self.sample_s += self.ready[slot].seconds
        if step not in self.ready:  # lag 0 on a thread: drawn now, waited for now
            self._collect()
        return self.ready.pop(step)

    def _collect(self) -> None:
        if self.pending is not None:
            slot, future = self.pending
            self.ready[slot] = future.result()
            self.sample_s += self.ready[slot].seconds
            self.pending = None

    def _from_queue(self, step: int) -> Drawn:
        while True:
            while True:
                if self._error is not None:
                    raise self._error
                try:
                    drawn = self._queue.get(timeout=0.1)
                    break
                except queue.Empty:
                    continue
            self.sample_s += drawn.seconds
            if drawn.version >= oldest_allowed(step, self.config.max_staleness):
                return drawn
            self.dropped += drawn.sampled

    # -- after the optimizer step -----------------------------------------------------
    def after_update(self, updated: bool) -> None:
        """Push the new weights to the sampler (if the step changed them) once nothing
        is being drawn with the old ones; the weights have then taken one more step."""
        t0 = time.perf_counter()
        self._collect()  # pipelined: the batch drawn beside this step, with its weights
        with self.lock:
            if updated and self.engine is not None:
                self.engine.push_weights(self.run.world.unwrap(self.run.student))
            self.version += 1
        self.wait_s += time.perf_counter() - t0

    def record(self, step_seconds: float) -> dict:
        """This step's JSONL fields: staleness of its batch, dropped samples, seconds."""
        world, waited = self.run.world, self.wait_s
        stale = self.version - 1 - self.used.version  # steps behind the weights it trained
        stale_sum, dropped = world.sum_all([stale, self.dropped])
        out = {
            "staleness_mean": stale_sum / world.size,
            "staleness_max": round(world.max_all([stale])[0]),
            "dropped_samples": dropped,
            "time_sampling": self.sample_s,
            "time_waiting": waited,
            "time_training": max(step_seconds - waited, 0.0),
        }
        self.dropped, self.wait_s, self.sample_s = 0, 0.0, 0.0
        return out

    # -- checkpoints ------------------------------------------------------------------
    def state(self) -> dict:
        """What a checkpoint keeps, for every rank (a collective): pipelined, the drawn
        batches not yet trained on (they came from weights the checkpoint no longer
        holds); queue, the producer's next slot (its queued batches are dropped)."""
        ready = [
            {
                "slot": d.slot,
                "version": d.version,
                "batches": [_batch_state(b) for b in d.batches],
            }
            for d in sorted(self.ready.values(), key=lambda d: d.slot)
        ]
        mine = {"ready": ready, "next_slot": self.next_slot}
        return {"mode": self.mode, "ranks": self.run.world.gather(mine)}

    def load_state(self, state: dict) -> None:
        world = self.run.world
        if not state or state.get("mode") != self.mode:
            return  # a config change the resume check accepted: draw afresh
        if len(state["ranks"]) != world.size:
            if any(r["ready"] for r in state["ranks"]):
                raise ValueError(
                    f"this checkpoint holds rollouts drawn by {len(state['ranks'])} processes, "
                    f"not {world.size}: resume a pipelined run with as many processes"
                )
            return
        state = state["ranks"][world.rank]
        self.next_slot = state["next_slot"]
        for d in state["ready"]:
            batches = [
                _batch_from_state(b, micro_batch_rows(self.run, d["slot"], m, b["source"]))
                for m, b in enumerate(d["batches"])
            ]
            self.ready[d["slot"]] = Drawn(d["slot"], d["version"], batches)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._executor is not None:
            self._executor.shutdown(wait=True)


def _batch_state(batch: SequenceBatch) -> dict:
    return {
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask,
        "completion_mask": batch.completion_mask,
        "prompt_width": batch.prompt_width,
        "source": batch.source,
        "sampler_logprobs": batch.sampler_logprobs,
    }


def _batch_from_state(state: dict, rows: list[dict]) -> SequenceBatch:
    # Rows are not stored: they follow from (slot, micro-batch, rank) and the data order.
    return SequenceBatch(
        state["input_ids"],
        state["attention_mask"],
        state["completion_mask"],
        int(state["prompt_width"]),
        state["source"],
        state["sampler_logprobs"],
        rows,
    )


@torch.no_grad()
def sampler_token_stats(model, batch: SequenceBatch, config, vocab_size: int) -> list:
    """`[gap_sum, ratio_sum, ratio_max, out_of_bounds, tokens]` over the batch's sampled
    tokens, from one no-grad forward of the trained student:

    * gap: |log p - log q| with p under the sampler's transform (temperature, top-k,
      top-p): zero when the sampler holds exactly these weights (`sampler_logprob_gap`);
    * ratio: p_theta/q as the `pg` loss forms it (log p at temperature 1), and how many
      tokens `loss.ratio_correction` truncates (tis) or masks (icepop)."""
    from opd.modeling.hf import completion_logits

    logits = completion_logits(model, batch, vocab_size)
    ids, mask = batch.completion_ids(), batch.loss_mask()
    logq = batch.sampler_logprobs[:, batch.prompt_width :].to(logits.device)
    s, loss = config.sampling, config.loss
    gap, ratio_sum, ratio_max, out = 0.0, 0.0, 0.0, 0
    for i in range(batch.size):
        m = mask[i]
        processed = process_logits(logits[i], s.temperature, s.top_k, s.top_p)
        mine = processed.gather(-1, ids[i].unsqueeze(-1)).squeeze(-1)
        gap += float((mine - logq[i]).abs()[m].sum())
        raw = torch.log_softmax(logits[i].float(), -1).gather(-1, ids[i].unsqueeze(-1))
        ratio = torch.exp(raw.squeeze(-1) - logq[i])[m]
        if ratio.numel():
            ratio_sum += float(ratio.sum())
            ratio_max = max(ratio_max, float(ratio.max()))
        if loss.ratio_correction == "icepop":
            out += int(((ratio < loss.ratio_floor) | (ratio > loss.ratio_cap)).sum())
        elif loss.ratio_cap > 0:
            out += int((ratio > loss.ratio_cap).sum())
    return [gap, ratio_sum, ratio_max, out, int(mask.sum())]
