"""A lean forward for Llama/Qwen-family decoders: packed training rows and KV-cached decoding.

Hugging Face's forward pays for generality on every call: mask construction, cache
objects, output records, one kernel per norm step. Two places in the loop run it where
that cost, or the padding it computes on, dominates (figures in benchmarks/README.md):

* training and teacher scoring (`packed_supervised_hidden`): after on-policy sampling the
  `[B, T]` grid is up to a third padding (rows stop at EOS at different lengths). Here the
  linear layers and MLPs run on the real tokens only, packed into `[N, H]`; attention alone
  goes back to the grid, through one index. A row's last token predicts nothing and no
  later token attends to it, so it is not fed at all; in the last layer only the positions
  that predict a supervised token go past attention.
* decoding (`opd.modeling.lean_decoder.LeanDecoder`, used by `opd.sampling.fast`): a
  preallocated KV cache, and per token one embedding, about twenty kernels per layer and the head.

Both use the model's own weights and submodules (norm weights and epsilons, projections,
activation, rotary embedding), so RoPE variants and LoRA adapters apply unchanged: plain
`nn.Linear` and `nn.Embedding` run as the functional op over their weight (when decoding,
projections that share an input as one matmul), anything else (a LoRA layer) through its
own module; module attributes are looked up once per call, not per kernel (`LayerWeights`).
Equality with the Hugging Face forward is tested (`tests/test_lean.py`,
`tests/test_sampling_fast.py`); other models take the plain path.

Because it re-implements the layer, a transformers change could make it silently differ:
`lean_check.py` compares it with the Hugging Face forward on the first batch of each model.
It is the default (`sampling.engine=auto`, `loss.fused_forward=auto`) where it applies, and
a failed check there is logged and turns it off for that model; asked for by name (`lean`),
a failed check stops the run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

try:  # transformers' own SiLU module (ACT2FN["silu"]): `F.silu` in its forward
    from transformers.activations import SiLUActivation

    _SILU = (torch.nn.SiLU, SiLUActivation)
except ImportError:  # older releases map "silu" to torch's
    _SILU = (torch.nn.SiLU,)

if TYPE_CHECKING:  # annotations only: modeling sits below the data room
    from opd.data.batch import SequenceBatch


# Decoder layer exactly: x += o(attn(rope(q, k), v)) on input_layernorm(x), then
# x += down(act(gate(h)) * up(h)) on post_attention_layernorm(x); Qwen3 adds per-head q/k norms.
LEAN_FAMILIES = ("llama", "qwen2", "qwen3")
_POSITION_DEPENDENT_ROPE = ("dynamic", "longrope")  # inv_freq changes with the length seen


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def lean_supported(model) -> bool:
    """True when the lean forward computes exactly what the model's own forward does."""
    config = getattr(_base(model), "config", None)
    if config is None or getattr(config, "model_type", None) not in LEAN_FAMILIES:
        return False
    if getattr(config, "use_sliding_window", False) or getattr(config, "attention_dropout", 0.0):
        return False
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
        return False
    # Sharded weights (FSDP2's DTensors, FSDP1's wrapped units) are gathered by hooks on the
    # modules' own forwards, which the lean path does not call for every module; a model
    # split over devices moves its activations in those hooks too.
    if any(type(p).__name__ in ("DTensor", "FlatParameter") for p in model.parameters()):
        return False
    if any(type(m).__name__ == "FullyShardedDataParallel" for m in model.modules()):
        return False
    if len(set((getattr(_base(model), "hf_device_map", None) or {}).values())) > 1:
        return False
    decoder = model.get_decoder()
    if not all(hasattr(decoder, n) for n in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return False
    return getattr(decoder.rotary_emb, "rope_type", "default") not in _POSITION_DEPENDENT_ROPE


# ---------------------------------------------------------------- building blocks


def rms_norm_of(norm):
    """`norm` for the Llama/Qwen RMSNorm in one fused kernel (same formula and rounding:
    normalize in float32, back to the input dtype, then scale), the module's attributes looked
    up once (a decoding step is launch-bound: each `nn.Module` attribute or call costs about a
    small kernel's time)."""
    eps = getattr(norm, "variance_epsilon", None)
    if eps is None:
        return norm
    weight = norm.weight
    shape = weight.shape

    def rms(x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, shape, weight, eps)
        return weight * F.rms_norm(x.float(), shape, None, eps).to(x.dtype)

    return rms


def _joint(modules):
    """`x -> cat([m(x) for m in modules], -1)`: one matmul when all are plain `nn.Linear`.

    The weights are concatenated at call time, inside autograd, so gradients reach each
    module's own parameters; transposed, as `[in, out]` rows a matmul reads without striding
    (a third off a small product's time when decoding)."""
    plain = all(type(m) is torch.nn.Linear for m in modules)
    biases = [m.bias for m in modules] if plain else []
    if plain and (all(b is None for b in biases) or all(b is not None for b in biases)):
        weight_t = torch.cat([m.weight.t() for m in modules], dim=1)
        bias = None if biases[0] is None else torch.cat(biases)

        def joint(x: torch.Tensor) -> torch.Tensor:
            rows = x.reshape(-1, x.shape[-1])
            out = torch.mm(rows, weight_t) if bias is None else torch.addmm(bias, rows, weight_t)
            return out.view(*x.shape[:-1], -1)

        return joint
    return lambda x: torch.cat([m(x) for m in modules], dim=-1)


def _separate(modules):
    """`x -> tuple(m(x) for m in modules)`, plain Linears as `F.linear` over their weights."""
    forwards = [plain_forward(m, F.linear) for m in modules]
    return lambda x: tuple(f(x) for f in forwards)


def _add_into(module):
    """`(x, inp) -> x + module(inp)`, one `addmm` for a bias-free plain Linear on 2-D rows."""
    if type(module) is not torch.nn.Linear or module.bias is not None:
        return lambda x, inp: x + module(inp)
    weight = module.weight

    def add(x: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
        return torch.addmm(x, inp, weight.t()) if x.dim() == 2 else x + F.linear(inp, weight)

    return add


def plain_forward(module, fn):
    """`module`'s forward as the functional `fn` over its weight when it is exactly the
    torch class (no LoRA layer, no bias, no embedding max_norm), else the module itself."""
    if (
        type(module) in (torch.nn.Linear, torch.nn.Embedding)
        and getattr(module, "bias", None) is None
        and getattr(module, "max_norm", None) is None
    ):
        weight = module.weight
        return lambda x: fn(x, weight)
    return module


def _activation(act):
    """`act` itself, or `F.silu` for a SiLU module (no module call per use)."""
    return F.silu if type(act) in _SILU else act


def rope_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(cos, sin)` as `_rope` takes them: the sine's first half negated, so that HF's
    `rotate_half(x) * sin` (`cat(-x2, x1) * sin`) is `roll(x) * signed_sin`."""
    half = sin.shape[-1] // 2
    return cos, torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


_ROPE_HALVES_FROM = 1 << 17  # elements; below, the two extra launches cost more than a pass


def _rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """HF's `x * cos + rotate_half(x) * sin` (`signed_sin` from `rope_tables`), rounded alike
    (the same products and sums). Four kernels; without autograd on a large `x`, `x * cos`
    with each half's product added in place instead of a rolled copy: 0.50 against 0.65 ms on
    a `[1952, 8, 64]` teacher query (in-place half updates cost more in a backward)."""
    if torch.is_grad_enabled() or x.numel() < _ROPE_HALVES_FROM:
        return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin
    half = x.shape[-1] // 2
    out = x * cos
    out[..., :half].add_(torch.mul(x[..., half:], signed_sin[..., :half]))
    out[..., half:].add_(torch.mul(x[..., :half], signed_sin[..., half:]))
    return out


class LayerWeights:
    """One decoder layer's weights, arranged for the lean forward.

    `joint`: projections that share an input run as one matmul over weights concatenated
    here (decoding: a step is launch-bound, and the decoder is built once per generation);
    otherwise each runs alone (packed rows: the products are large, and a concatenated copy
    of most of the layer's weights would live until the backward). Rebuilt per call: the
    weights must be the current ones, and the gradient must reach them."""

    def __init__(self, layer, joint: bool = False):
        attn, mlp = layer.self_attn, layer.mlp
        self.attn = attn
        self.scaling = attn.scaling
        self.head_dim = attn.head_dim
        self.q_heads = attn.q_proj.out_features // attn.head_dim
        self.kv_heads = attn.k_proj.out_features // attn.head_dim
        self.norm_in, self.norm_post = (
            rms_norm_of(layer.input_layernorm),
            rms_norm_of(layer.post_attention_layernorm),
        )
        projections = ([attn.q_proj, attn.k_proj, attn.v_proj], [mlp.gate_proj, mlp.up_proj])
        if joint:
            self.qkv, self.gate_up = (_joint(group) for group in projections)
        else:
            self.qkv, self.gate_up = (_separate(group) for group in projections)
        self.add_o, self.add_down = _add_into(attn.o_proj), _add_into(mlp.down_proj)
        self.act = _activation(mlp.act_fn)
        self.qk_norm = (
            (rms_norm_of(attn.q_norm), rms_norm_of(attn.k_norm))
            if hasattr(attn, "q_norm")
            else None
        )

    def qkv_rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """`x [..., H]` -> `q [..., Hq, D]`, `k, v [..., Hkv, D]`, RoPE applied to q and k."""
        D, Hq, Hkv = self.head_dim, self.q_heads, self.kv_heads
        qkv = self.qkv(self.norm_in(x))
        if isinstance(qkv, tuple):
            q, k, v = (t.view(*x.shape[:-1], -1, D) for t in qkv)
        else:
            qkv = qkv.view(*x.shape[:-1], Hq + 2 * Hkv, D)
            qk, v = qkv[..., : Hq + Hkv, :], qkv[..., Hq + Hkv :, :]
            if not self.qk_norm:
                qk = _rope(qk, cos, sin)  # one pass over q and k together
                return qk[..., :Hq, :], qk[..., Hq:, :], v
            q, k = qk[..., :Hq, :], qk[..., Hq:, :]
        if self.qk_norm:  # Qwen3: RMSNorm over each head before RoPE
            q, k = self.qk_norm[0](q), self.qk_norm[1](k)
        return _rope(q, cos, sin), _rope(k, cos, sin), v

    def finish(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """Output projection, residual, MLP, residual."""
        x = self.add_o(x, attended)
        gate_up = self.gate_up(self.norm_post(x))
        gate, up = gate_up if isinstance(gate_up, tuple) else gate_up.chunk(2, dim=-1)
        if self.act is F.silu and not torch.is_grad_enabled():  # no graph: no copies
            return self.add_down(x, F.silu(gate, inplace=True).mul_(up))
        return self.add_down(x, self.act(gate) * up)


def grid_mask(real_BT: torch.Tensor) -> torch.Tensor:
    """`[B, 1, T, T]` causal attention over real keys; each position also sees itself, so a
    padding query never meets an all-masked row (its output is discarded anyway)."""
    T = real_BT.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=real_BT.device).tril()
    eye = torch.eye(T, dtype=torch.bool, device=real_BT.device)
    return ((causal & real_BT[:, None, :].bool()) | eye)[:, None]


def grid_attention(attn, q, k, v, mask):
    """`q [B, Hq, T, D]`, `k, v [B, Hkv, T, D]`, bool `mask [B, 1, T, T]` (True: attend)."""
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=attn.scaling, enable_gqa=gqa
    )


# ---------------------------------------------------------------- training rows, packed


def packed_supervised_hidden(model, batch: SequenceBatch) -> torch.Tensor:
    """Final hidden states that predict the supervised completion tokens, `[N, H]`.

    Equal to `completion_hidden(model, batch)[batch.loss_mask()]` (row-major order).
    """
    decoder = model.get_decoder()
    B, T = batch.input_ids.shape
    real = batch.attention_mask.bool()
    # A row's last real token is neither a query that predicts anything nor a key any
    # later query sees: leave it out.
    last = T - 1 - real.flip(-1).int().argmax(-1)
    fed = real.clone()
    fed[torch.arange(B, device=real.device), last] = False
    idx = fed.reshape(-1).nonzero().squeeze(1)  # packed row -> grid cell
    positions = batch.position_ids().reshape(-1)[idx]
    x = decoder.embed_tokens(batch.input_ids.reshape(-1)[idx])
    cos, sin = rope_tables(*decoder.rotary_emb(x, positions[None]))
    cos, sin = cos[0, :, None, :], sin[0, :, None, :]  # [N, 1, D]: broadcast over heads
    mask = grid_mask(fed)
    # Grid cells that predict a supervised token: column P-1+j for supervised column P+j.
    rows, cols = batch.loss_mask().nonzero(as_tuple=True)
    cells = rows * T + batch.prompt_width - 1 + cols
    packed_of = torch.full((B * T,), -1, dtype=torch.long, device=idx.device)
    packed_of[idx] = torch.arange(idx.numel(), device=idx.device)
    select = packed_of[cells]

    holes = (~fed).reshape(-1).nonzero().squeeze(1)  # grid cells no packed row fills

    def to_grid(t: torch.Tensor) -> torch.Tensor:  # [N, heads, D] -> [B, heads, T, D]
        # Zeros only where no row lands (masked keys and values must stay finite): the
        # rest is overwritten, so filling it first is a wasted pass over the grid.
        grid = t.new_empty(B * T, *t.shape[1:]).index_fill_(0, holes, 0.0)
        grid = grid.index_copy_(0, idx, t)
        return grid.view(B, T, *t.shape[1:]).transpose(1, 2)

    layers = [LayerWeights(layer) for layer in decoder.layers]
    for i, layer in enumerate(layers):
        q, k, v = layer.qkv_rope(x, cos, sin)
        out = grid_attention(layer.attn, to_grid(q), to_grid(k), to_grid(v), mask)
        out = out.transpose(1, 2).reshape(B * T, -1)
        # index_select, not `[...]`: its backward is an index_add, not a sorting index_put
        if i == len(layers) - 1:
            x, out = x.index_select(0, select), out.index_select(0, cells)
        else:
            out = out.index_select(0, idx)
        x = layer.finish(x, out)
    return rms_norm_of(decoder.norm)(x)
