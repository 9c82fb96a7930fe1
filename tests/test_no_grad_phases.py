"""Guards: the phases that train nothing build no autograd graph.

Sampling (every engine), teacher scoring, evaluation and offline-cache generation run under
`torch.autograd.graph.saved_tensors_hooks`, which sees every tensor autograd saves for a
backward pass: there must be none, and their outputs must not require grad. A sampler that
records a graph keeps every decode step's activations and KV cache alive (3.2 GB instead
of 0.18 GB at V = 151,936 for one sampling call), silently: the results are the same.
The training step's own phases are checked where the loop runs them (`train_step` with a
timer that counts saved tensors per phase), so a `no_grad` that moves off a call site fails
here. Teachers are frozen (`requires_grad` False on every parameter).
"""

import json
from contextlib import contextmanager

import pytest
import torch

from opd.cli.eval import evaluate_model
from opd.config import config_from_dict
from opd.data.rows import Encoder
from opd.evaluation.generation import sample_completions
from opd.evaluation.rewards import resolve_metric
from opd.modeling.hf import load_causal_lm, load_tokenizer
from opd.run.loop import evaluate_now, train_step
from opd.run.metrics import PhaseTimer
from opd.run.setup import build_run
from opd.sampling import ENGINES, sample
from opd.teachers.cache.generate import build_cache
from opd.teachers.cache.spec import CacheSpec


class SavedTensors:
    """Counts the tensors autograd saves for backward while active."""

    def __init__(self):
        self.count = 0

    def _pack(self, t):
        self.count += 1
        return t

    @contextmanager
    def watch(self):
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield self


class PhaseSaves(PhaseTimer):
    """The loop's timer, also counting saved tensors inside each phase."""

    def __init__(self):
        super().__init__()
        self.saved: dict[str, int] = {}

    @contextmanager
    def phase(self, name: str):
        counter = SavedTensors()
        with super().phase(name), counter.watch():
            yield
        self.saved[name] = self.saved.get(name, 0) + counter.count


def _trainable(path):
    model = load_causal_lm(str(path))
    assert all(p.requires_grad for p in model.parameters())  # as a student being trained
    return model


def test_the_counter_sees_a_training_forward(tiny_pair):
    """The guard itself: a forward with grad on saves tensors, under no_grad none."""
    model = _trainable(tiny_pair[1])
    ids = torch.tensor([[3, 4, 5]])
    with SavedTensors().watch() as on:
        model(input_ids=ids)
    with torch.no_grad(), SavedTensors().watch() as off:
        model(input_ids=ids)
    assert on.count > 10 and off.count == 0


@pytest.mark.parametrize("engine", ENGINES)
def test_sampling_saves_nothing(tiny_pair, engine):
    model = _trainable(tiny_pair[1])
    tok = load_tokenizer(str(tiny_pair[1]))
    prompts = [tok("12+3=").input_ids, tok("7=").input_ids]
    with SavedTensors().watch() as saved:
        out = sample(
            model, prompts, engine=engine, max_new_tokens=5, eos_id=tok.eos_token_id,
            pad_id=tok.pad_token_id, vocab_size=len(tok),
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
    assert saved.count == 0
    assert sum(len(c) for c in out.completions) > 0
    assert all(p.requires_grad for p in model.parameters())  # left as it was


STEPS = [  # (overrides, the sampling phase each exercises)
    ({"preset": "on_policy"}, "generate"),  # pg, token teacher, fused token objective
    ({"preset": "on_policy", "sampling__engine": "lean"}, "generate"),
    ({"source__lmbda": 0.0, "source__off_policy": "teacher"}, "teacher_generate"),  # full kd
    ({"source__lmbda": 1.0, "loss__estimator": "topk", "loss__topk": 4, "loss__fused": False},
     "generate"),
]  # fmt: skip


@pytest.mark.parametrize("overrides,sampling_phase", STEPS)
def test_training_step_samples_and_scores_without_a_graph(
    base_config, overrides, sampling_phase, monkeypatch
):
    run = build_run(config_from_dict(base_config(**overrides)))
    assert all(not p.requires_grad for p in run.teacher.model.parameters())  # frozen teacher
    outputs = []
    score = run.teacher.score

    def recording(*args, **kwargs):
        scores = score(*args, **kwargs)
        outputs.extend(v for v in vars(scores).values() if isinstance(v, torch.Tensor))
        return scores

    monkeypatch.setattr(run.teacher, "score", recording)
    timer = PhaseSaves()
    train_step(run, 0, timer)
    assert timer.saved[sampling_phase] == 0
    assert timer.saved.get("teacher_score", 0) == 0
    assert timer.saved["update"] > 0  # the loss phase does build the graph
    assert not any(t.requires_grad for t in outputs)


def test_in_loop_evaluation_saves_nothing(base_config, tmp_path):
    train = base_config()["data"]["train"]
    run = build_run(config_from_dict(base_config(eval_every=1, data__eval=train)))
    assert run.eval_rows
    metric = resolve_metric(run.config.eval_metric, run.config.data.answer_field)
    with SavedTensors().watch() as saved:
        record = evaluate_now(run, metric)
    assert saved.count == 0 and "eval_accuracy" in record


def test_evaluation_samples_save_nothing(tiny_pair, addition_data):
    model = _trainable(tiny_pair[1])
    tok = load_tokenizer(str(tiny_pair[1]))
    data = config_from_dict({"student": {"path": "x"}, "data": {"train": "x"}}).data
    rows = [json.loads(line) for line in addition_data.read_text().splitlines()[:3]]
    with SavedTensors().watch() as saved:
        _, completions = sample_completions(
            model, Encoder(tok, data), rows, max_new_tokens=4, vocab_size=len(tok)
        )
    assert saved.count == 0 and len(completions) == 3


def test_opd_eval_saves_nothing(base_config, addition_data):
    config = config_from_dict(base_config(data__eval=str(addition_data), eval_size=4))
    with SavedTensors().watch() as saved:
        result = evaluate_model(config, config.student.path)
    assert saved.count == 0
    assert "divergence_to_teacher" in result and "accuracy" in result


def test_cache_generation_saves_nothing(tiny_pair, addition_data, tmp_path):
    spec = CacheSpec(mode="generate", max_new_tokens=4, topk=3, shard_size=4, n=1)
    rows = tmp_path / "prompts.jsonl"
    rows.write_text("".join(addition_data.read_text().splitlines(True)[:4]))
    with SavedTensors().watch() as saved:
        manifest = build_cache(str(tiny_pair[0]), rows, tmp_path / "cache", spec, device="cpu")
    assert saved.count == 0
    assert manifest["counts"]["completion_tokens"] > 0
