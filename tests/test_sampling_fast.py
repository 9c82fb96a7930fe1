"""The fast sampler returns exactly what `opd.sampling.reference.sample` returns."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from opd.cli.demo.tiny import build_char_tokenizer, tiny_causal_lm
from opd.modeling import lean, lean_decoder
from opd.modeling.hf import load_causal_lm, load_tokenizer
from opd.sampling.fast import sample_fast
from opd.sampling.reference import sample

# A 15-token vocabulary: EOS is likely enough that rows stop at many different steps, so
# the finished-row compaction runs mid-generation.
TOK = build_char_tokenizer("0123456789+=")
FAMILIES = {
    "llama": {},
    "qwen2": {},  # biased q/k/v projections
    "qwen3": {"heads": 4, "kv_heads": 2},  # per-head q/k norms, grouped KV heads
}
SETTINGS = [  # temperature, top_k, top_p
    (0.0, 0, 1.0),
    (1.0, 0, 1.0),
    (0.7, 5, 1.0),
    (1.3, 0, 0.8),
]


def _model(family: str, seed: int = 3):
    return tiny_causal_lm(
        len(TOK), family=family, hidden=32, layers=2, seed=seed, **FAMILIES[family]
    ).eval()


def _prompts():
    texts = ["12+3=", "7=", "99+99+1=", "5", "40+2=", "1+1="]
    return [TOK(t).input_ids for t in texts]  # left padding of 0 to 7 tokens


def _both(model, prompts, seed=5, fast_kw=None, **kw):
    kw = {"max_new_tokens": 24, "eos_id": 1, "pad_id": 0, "vocab_size": len(TOK), **kw}
    outs, states = [], []
    for fn, extra in ((sample, {}), (sample_fast, fast_kw or {})):
        gen = torch.Generator().manual_seed(seed)
        outs.append(fn(model, prompts, generator=gen, **kw, **extra))
        states.append(gen.get_state())
    return outs, states


def _assert_same(ref, fast):
    assert fast.completions == ref.completions
    assert fast.finished == ref.finished
    for a, b in zip(ref.logprobs, fast.logprobs, strict=True):
        torch.testing.assert_close(torch.tensor(b), torch.tensor(a), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
def test_same_tokens_and_logprobs_as_sample(family, temperature, top_k, top_p):
    model = _model(family)
    assert lean.lean_supported(model)
    for seed in (0, 1, 2):
        (ref, fast), (s_ref, s_fast) = _both(
            model, _prompts(), seed=seed, temperature=temperature, top_k=top_k, top_p=top_p
        )
        _assert_same(ref, fast)
        assert torch.equal(s_ref, s_fast)  # the generator advanced exactly as much


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_static_shape_steps_same_tokens(family):
    # The fixed-shape step (what a CUDA graph replays) attends over the whole cache width.
    model = _model(family)
    for temperature in (0.0, 1.0):
        (ref, fast), (s_ref, s_fast) = _both(
            model, _prompts(), temperature=temperature, fast_kw={"static": True}
        )
        _assert_same(ref, fast)
        assert torch.equal(s_ref, s_fast)


def test_rows_that_finish_leave_the_batch(monkeypatch):
    kept = []
    keep = lean_decoder.LeanDecoder.keep
    monkeypatch.setattr(
        lean_decoder.LeanDecoder,
        "keep",
        lambda self, rows: kept.append(len(rows)) or keep(self, rows),
    )
    model = _model("llama")
    prompts = _prompts() * 3
    (ref, fast), _ = _both(model, prompts, seed=4, max_new_tokens=40)
    _assert_same(ref, fast)
    assert kept and kept[-1] < len(prompts)  # compaction happened, and changed nothing
    kept.clear()
    gen = torch.Generator().manual_seed(4)
    never = sample_fast(
        model, prompts, max_new_tokens=40, eos_id=1, pad_id=0, vocab_size=len(TOK),
        generator=gen, compact_at=1.0,
    )  # fmt: skip
    assert not kept
    _assert_same(ref, never)


def test_a_wide_head_decodes_through_mkl_packed_gemm_alike(monkeypatch):
    """On a CPU with MKL, a float32 head wide enough to pack (hidden 256) decodes through
    MKL's packed GEMM: the same logits as `F.linear` at the batch it was packed for, the
    plain op at any other row count or with autograd on, and the sampler's tokens as `sample`'s
    (rows that finish leave the batch here, so both paths run)."""
    model = tiny_causal_lm(len(TOK), family="llama", hidden=256, layers=1, seed=3).eval()
    head = model.get_output_embeddings()
    if not lean_decoder._packing_pays(head.weight):
        pytest.skip("no MKL packed GEMM in this torch build")
    made = []
    real = lean_decoder.decode_head
    monkeypatch.setattr(
        lean_decoder, "decode_head", lambda h, rows: made.append(f := real(h, rows)) or f
    )
    prompts = _prompts() * 3

    class CountPacked(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountPacked.calls += "_mkl_linear" in str(func)
            return func(*args, **(kwargs or {}))

    with CountPacked():
        (ref, fast), _ = _both(model, prompts, seed=4, max_new_tokens=40)
    _assert_same(ref, fast)
    assert made and all(f.__name__ == "packed_head" for f in made)
    assert CountPacked.calls > 10  # the check's decoder, then prefill and the steps
    packed = made[-1]
    g = torch.Generator().manual_seed(0)
    for rows in (len(prompts), 5):
        x = torch.randn(rows, 256, generator=g)
        with torch.no_grad():
            want = torch.nn.functional.linear(x, head.weight)
            torch.testing.assert_close(packed(x), want, rtol=1e-5, atol=1e-6)
    assert packed(x).requires_grad  # autograd on: the plain op, which a backward can use
    narrow = tiny_causal_lm(len(TOK), family="llama", hidden=128, layers=1, seed=3)
    # MKL pads a 128-wide head 4x: decoded unpacked
    assert real(narrow.get_output_embeddings(), 8).__name__ != "packed_head"
    made.clear()
    (short_ref, short), _ = _both(model, prompts, seed=4, max_new_tokens=8)
    assert not made  # too short to repay the packing
    _assert_same(short_ref, short)


def test_stop_strings_end_rows_like_sample(tiny_pair):
    _, student = tiny_pair
    tok = load_tokenizer(str(student))
    model = load_causal_lm(str(student))
    prompts = [tok("12+3=").input_ids, tok("7+7=").input_ids]
    kw = dict(max_new_tokens=8, eos_id=-1, pad_id=0, vocab_size=len(tok), temperature=0.0)
    free = sample(model, prompts, **kw)
    stop = (tok.decode(free.completions[0])[2:4],)
    ref = sample(model, prompts, stop=stop, tokenizer=tok, **kw)
    fast = sample_fast(model, prompts, stop=stop, tokenizer=tok, **kw)
    _assert_same(ref, fast)
    assert fast.finished[0] and len(fast.completions[0]) == 4


def test_peaked_teacher_greedy_and_sampled(tiny_pair):
    teacher, _ = tiny_pair  # LM head scaled up: confident, so EOS ends rows early
    tok = load_tokenizer(str(teacher))
    model = load_causal_lm(str(teacher))
    prompts = [tok(t).input_ids for t in ("12+3=", "7=", "99+1=", "4+4=")]
    for temperature in (0.0, 1.0):
        (ref, fast), _ = _both(
            model, prompts, temperature=temperature, max_new_tokens=12, eos_id=tok.eos_token_id,
            vocab_size=len(tok),
        )  # fmt: skip
        _assert_same(ref, fast)


def test_unsupported_models_and_lockstep_take_sample():
    model = tiny_causal_lm(len(TOK), family="mistral", hidden=32, layers=2, seed=1).eval()
    assert not lean.lean_supported(model)
    (ref, fast), _ = _both(model, _prompts())
    _assert_same(ref, fast)
    sliding = tiny_causal_lm(len(TOK), family="qwen2", hidden=32, layers=2, seed=1)
    sliding.config.use_sliding_window = True
    assert not lean.lean_supported(sliding)
    split = _model("llama")
    split.hf_device_map = {"model.layers.0": 0, "model.layers.1": 1}  # over two devices
    assert not lean.lean_supported(split)
    calls = []

    def all_finished(done: bool) -> bool:
        calls.append(done)
        return done

    model = _model("llama")
    (ref, _), _ = _both(model, _prompts())
    gen = torch.Generator().manual_seed(5)
    out = sample_fast(
        model, _prompts(), max_new_tokens=24, eos_id=1, pad_id=0, vocab_size=len(TOK),
        generator=gen, all_finished=all_finished,
    )  # fmt: skip
    assert calls  # the lock-step hook was honoured (by `sample` itself)
    _assert_same(ref, out)


def test_restores_training_mode_and_switches_it_only_for_the_check(monkeypatch):
    """The lean decoder computes the same in either mode, and a transformers model's
    train()/eval() costs ~1 ms: only the once-per-model check's HF forward switches it."""
    model = _model("qwen3").train()
    switches = []
    real = type(model).train
    monkeypatch.setattr(
        type(model), "train", lambda self, mode=True: switches.append(mode) or real(self, mode)
    )
    kw = dict(max_new_tokens=3, eos_id=1, pad_id=0, vocab_size=len(TOK))
    got = sample_fast(model, _prompts(), **kw)
    assert model.training and switches == [False, True]  # the check: eval, then back
    again = sample_fast(model, _prompts(), **kw, generator=torch.Generator().manual_seed(1))
    assert model.training and switches == [False, True]  # checked once: no switch after
    assert got.completions and again.completions


def test_engine_and_cuda_graphs_keys_choose_the_path(monkeypatch):
    """`sampling.engine=hf` never builds the lean decoder; `lean` and `auto` (the default) do,
    with the growing-cache step unless `sampling.cuda_graphs` asks for the fixed-shape
    (graph) step."""
    from opd.config.parse import SamplingConfig
    from opd.sampling import sample as sample_engine

    calls = []
    for name in ("prefill", "step", "step_static"):
        real = getattr(lean_decoder.LeanDecoder, name)
        monkeypatch.setattr(
            lean_decoder.LeanDecoder, name,
            lambda self, *a, _n=name, _r=real: calls.append(_n) or _r(self, *a),
        )  # fmt: skip
    model = _model("llama")
    kw = dict(max_new_tokens=4, eos_id=-1, pad_id=0, vocab_size=len(TOK), temperature=0.0)
    ref = sample_engine(model, _prompts(), engine="hf", **kw)
    assert calls == []
    assert SamplingConfig().engine == "auto"
    sample_engine(model, _prompts(), engine="auto", **kw)  # the first batch also checks
    assert calls[:3] == ["prefill", "step", "step_static"]  # ... each lean step against HF
    calls.clear()
    fast = sample_engine(model, _prompts(), engine="lean", **kw)
    assert calls == ["prefill", "step", "step", "step"]  # checked once per model
    calls.clear()
    auto = sample_engine(model, _prompts(), engine="auto", **kw)
    assert calls == ["prefill", "step", "step", "step"]
    _assert_same(ref, auto)
    calls.clear()
    graphs = sample_engine(model, _prompts(), engine="lean", cuda_graphs=True, **kw)
    assert calls == ["prefill", "step_static", "step_static", "step_static"]
    _assert_same(ref, fast)
    _assert_same(ref, graphs)


def test_graph_checks_are_kept_per_model_and_shape():
    """A CUDA graph's replay checked for one model and shape says nothing about another:
    each (model, batch, cache width, dtype, device) is checked on its own first replay, and
    a disagreeing one runs eagerly without turning off the others. The replay here is a
    plain callable (CUDA graphs need a GPU); the bookkeeping is the one the sampler uses."""
    import gc
    import weakref

    from opd.sampling.fast import GraphChecks, checked_replay

    checks = GraphChecks()
    a, b = _model("llama", seed=1), _model("llama", seed=2)
    x = torch.arange(6.0).reshape(2, 3)
    eager_calls = []

    def eager(tokens, positions, col):
        eager_calls.append(col)
        return x

    def good(tokens, positions, col):
        return x.clone()

    def bad(tokens, positions, col):
        return x + 1.0

    shape1 = (2, 40, torch.float32, "cuda:0")
    shape2 = (2, 41, torch.float32, "cuda:0")
    step = checked_replay(good, eager, checks, a, shape1)
    assert torch.equal(step(None, None, 7), x) and eager_calls == [7]  # checked once
    assert checks.get(a, shape1) == "verified"
    assert torch.equal(step(None, None, 8), x) and eager_calls == [7]  # then replayed alone
    # Another shape of the same model, and the same shape of another model, are unchecked.
    assert checks.get(a, shape2) is None and checks.get(b, shape1) is None
    wrong = checked_replay(bad, eager, checks, a, shape2)
    assert torch.equal(wrong(None, None, 9), x)  # the eager result, not the graph's
    assert checks.get(a, shape2) == "disabled" and checks.get(a, shape1) == "verified"
    assert torch.equal(wrong(None, None, 10), x) and eager_calls == [7, 9, 10]
    fresh = checked_replay(bad, eager, checks, b, shape1)  # b's graph is checked too
    assert torch.equal(fresh(None, None, 11), x) and checks.get(b, shape1) == "disabled"
    assert checks.get(a, shape1) == "verified"
    # The decoder's shape is part of the key; entries go with their model.
    decoder = lean_decoder.LeanDecoder(a, len(TOK), 3, 12)
    assert GraphChecks.key(decoder, 3) == (3, 12, torch.float32, "cpu")
    gone = weakref.ref(b)
    del b, fresh
    gc.collect()
    assert gone() is None and len(checks._state) == 1
