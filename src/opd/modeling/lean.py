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
* decoding (`LeanDecoder`, used by `opd.sampling.fast`): a preallocated KV cache, and per
  token one embedding, about twenty kernels per layer and the head.

Both use the model's own weights and submodules (norm weights and epsilons, projections,
activation, rotary embedding), so RoPE variants and LoRA adapters apply unchanged: plain
`nn.Linear` projections that share an input run as one matmul, anything else (a LoRA
layer) through its own module. Equality with the Hugging Face forward is tested
(`tests/test_lean.py`, `tests/test_sampling_fast.py`); other models take the plain path.

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


def _rms(norm, x: torch.Tensor) -> torch.Tensor:
    """`norm(x)` for the Llama/Qwen RMSNorm in one fused kernel (same formula and rounding:
    normalize in float32, back to the input dtype, then scale)."""
    eps = getattr(norm, "variance_epsilon", None)
    if eps is None:
        return norm(x)
    if x.dtype == torch.float32:
        return F.rms_norm(x, norm.weight.shape, norm.weight, eps)
    return norm.weight * F.rms_norm(x.float(), norm.weight.shape, None, eps).to(x.dtype)


def _joint(modules):
    """`x -> cat([m(x) for m in modules], -1)`: one matmul when all are plain `nn.Linear`.

    The weights are concatenated at call time, inside autograd, so gradients reach each
    module's own parameters."""
    plain = all(type(m) is torch.nn.Linear for m in modules)
    biases = [m.bias for m in modules] if plain else []
    if plain and (all(b is None for b in biases) or all(b is not None for b in biases)):
        weight = torch.cat([m.weight for m in modules])
        bias = None if biases[0] is None else torch.cat(biases)
        return lambda x: F.linear(x, weight, bias)
    return lambda x: torch.cat([m(x) for m in modules], dim=-1)


def _add_linear(x: torch.Tensor, module, inp: torch.Tensor) -> torch.Tensor:
    """`x + module(inp)`, fused into one `addmm` for a bias-free plain Linear on 2-D rows."""
    if type(module) is torch.nn.Linear and module.bias is None and x.dim() == 2:
        return torch.addmm(x, inp, module.weight.t())
    return x + module(inp)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class _Layer:
    """One decoder layer's weights, arranged for the lean forward (rebuilt per call: the
    joint projections must see the current weights, and the gradient must reach them)."""

    def __init__(self, layer):
        attn, mlp = layer.self_attn, layer.mlp
        self.layer, self.attn, self.mlp = layer, attn, mlp
        self.head_dim = attn.head_dim
        self.q_heads = attn.q_proj.out_features // attn.head_dim
        self.kv_heads = attn.k_proj.out_features // attn.head_dim
        self.qkv = _joint([attn.q_proj, attn.k_proj, attn.v_proj])
        self.gate_up = _joint([mlp.gate_proj, mlp.up_proj])
        self.qk_norm = hasattr(attn, "q_norm")

    def qkv_rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """`x [..., H]` -> `q [..., Hq, D]`, `k, v [..., Hkv, D]`, RoPE applied to q and k."""
        D, Hq, Hkv = self.head_dim, self.q_heads, self.kv_heads
        qkv = self.qkv(_rms(self.layer.input_layernorm, x))
        qkv = qkv.view(*x.shape[:-1], Hq + 2 * Hkv, D)
        qk, v = qkv[..., : Hq + Hkv, :], qkv[..., Hq + Hkv :, :]
        if self.qk_norm:  # Qwen3: RMSNorm over each head before RoPE
            q, k = _rms(self.attn.q_norm, qk[..., :Hq, :]), _rms(self.attn.k_norm, qk[..., Hq:, :])
            return _rope(q, cos, sin), _rope(k, cos, sin), v
        qk = _rope(qk, cos, sin)  # one pass over q and k together
        return qk[..., :Hq, :], qk[..., Hq:, :], v

    def finish(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """Output projection, residual, MLP, residual."""
        x = _add_linear(x, self.attn.o_proj, attended)
        gate, up = self.gate_up(_rms(self.layer.post_attention_layernorm, x)).chunk(2, dim=-1)
        return _add_linear(x, self.mlp.down_proj, self.mlp.act_fn(gate) * up)


def grid_mask(real_BT: torch.Tensor) -> torch.Tensor:
    """`[B, 1, T, T]` causal attention over real keys; each position also sees itself, so a
    padding query never meets an all-masked row (its output is discarded anyway)."""
    T = real_BT.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=real_BT.device).tril()
    eye = torch.eye(T, dtype=torch.bool, device=real_BT.device)
    return ((causal & real_BT[:, None, :].bool()) | eye)[:, None]


def _grid_attention(attn, q, k, v, mask):
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
    cos, sin = decoder.rotary_emb(x, positions[None])
    cos, sin = cos[0, :, None, :], sin[0, :, None, :]  # [N, 1, D]: broadcast over heads
    mask = grid_mask(fed)
    # Grid cells that predict a supervised token: column P-1+j for supervised column P+j.
    rows, cols = batch.loss_mask().nonzero(as_tuple=True)
    cells = rows * T + batch.prompt_width - 1 + cols
    packed_of = torch.full((B * T,), -1, dtype=torch.long, device=idx.device)
    packed_of[idx] = torch.arange(idx.numel(), device=idx.device)
    select = packed_of[cells]

    def to_grid(t: torch.Tensor) -> torch.Tensor:  # [N, heads, D] -> [B, heads, T, D]
        grid = t.new_zeros(B * T, *t.shape[1:]).index_copy(0, idx, t)
        return grid.view(B, T, *t.shape[1:]).transpose(1, 2)

    layers = [_Layer(layer) for layer in decoder.layers]
    for i, layer in enumerate(layers):
        q, k, v = layer.qkv_rope(x, cos, sin)
        out = _grid_attention(layer.attn, to_grid(q), to_grid(k), to_grid(v), mask)
        out = out.transpose(1, 2).reshape(B * T, -1)
        if i == len(layers) - 1:
            x, out = x[select], out[cells]
        else:
            out = out[idx]
        x = layer.finish(x, out)
    return _rms(decoder.norm, x)


# ---------------------------------------------------------------- decoding with a static cache


class LeanDecoder:
    """Prefill + one-token steps over a preallocated `[B, Hkv, T, D]` KV cache per layer.

    All rows write column `t` at step t (prompts are left-padded to one width), so the
    cache is a plain grid; `key_bias [B, T]` is 0 on cells holding real tokens, -inf
    elsewhere. Build one per generation: it snapshots the weights.

    `step` attends over the columns written so far (a Python int says how many); rows can
    leave (`keep`). `step_static` attends over the whole width, the column given as a
    device tensor, so its shapes never change and it can be captured in a CUDA graph.
    """

    @torch.no_grad()
    def __init__(self, model, vocab_size: int, batch: int, width: int):
        self.decoder = model.get_decoder()
        self.head = model.get_output_embeddings()
        self.vocab_size = vocab_size
        self.width = width
        self.layers = [_Layer(layer) for layer in self.decoder.layers]
        param = next(model.parameters())
        dtype, device = param.dtype, param.device
        positions = torch.arange(width, device=device)
        cos, sin = self.decoder.rotary_emb(
            torch.zeros((), dtype=dtype, device=device), positions[None]
        )
        self.cos, self.sin = cos[0], sin[0]  # [width, D]
        shapes = [(batch, layer.kv_heads, width, layer.head_dim) for layer in self.layers]
        self.keys = [torch.zeros(s, dtype=dtype, device=device) for s in shapes]
        self.values = [torch.zeros(s, dtype=dtype, device=device) for s in shapes]
        self.key_bias = torch.full((batch, width), float("-inf"), dtype=dtype, device=device)

    def prefill(self, ids_BP: torch.Tensor, real_BP: torch.Tensor) -> torch.Tensor:
        """Run the prompts into the cache (in place); return `[B, V]` first-token logits."""
        B, P = ids_BP.shape
        x = self.decoder.embed_tokens(ids_BP)
        positions = (real_BP.long().cumsum(-1) - 1).clamp(min=0)
        cos, sin = self.cos[positions][:, :, None, :], self.sin[positions][:, :, None, :]
        mask = grid_mask(real_BP)
        self.key_bias.fill_(float("-inf"))
        self.key_bias[:, :P].masked_fill_(real_BP.bool(), 0.0)
        for i, (layer, cache_k, cache_v) in enumerate(
            zip(self.layers, self.keys, self.values, strict=True)
        ):
            q, k, v = layer.qkv_rope(x, cos, sin)  # [B, P, heads, D]
            k, v = k.transpose(1, 2), v.transpose(1, 2)
            cache_k[:, :, :P] = k
            cache_v[:, :, :P] = v
            out = _grid_attention(layer.attn, q.transpose(1, 2), k, v, mask)
            out = out.transpose(1, 2).reshape(B, P, -1)
            if i == len(self.layers) - 1:  # only the last column goes on to the head
                x, out = x[:, -1], out[:, -1]
            x = layer.finish(x, out)
        return self.head(_rms(self.decoder.norm, x))[:, : self.vocab_size]

    def _attend_one(self, layer, q, keys, values, bias):
        # One query per row: plain matmuls beat the fused CPU attention kernel here. Query
        # heads are grouped by the KV head they share (GQA), so the cache is not repeated.
        B = q.shape[0]
        q = q.view(B, layer.kv_heads, -1, layer.head_dim)
        scores = torch.matmul(q, keys.transpose(-1, -2)) * layer.attn.scaling + bias
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(probs, values).view(B, -1)

    def step(self, tokens_B: torch.Tensor, positions_B: torch.Tensor, column: int):
        """Feed one token per row at cache column `column`; return `[B, V]` next logits."""
        x = self.decoder.embed_tokens(tokens_B)
        cos, sin = self.cos[positions_B][:, None, :], self.sin[positions_B][:, None, :]
        self.key_bias[:, column] = 0.0
        bias = self.key_bias[:, None, None, : column + 1]
        for layer, cache_k, cache_v in zip(self.layers, self.keys, self.values, strict=True):
            q, k, v = layer.qkv_rope(x, cos, sin)  # [B, heads, D]
            cache_k[:, :, column] = k
            cache_v[:, :, column] = v
            end = column + 1
            out = self._attend_one(layer, q, cache_k[:, :, :end], cache_v[:, :, :end], bias)
            x = layer.finish(x, out)
        return self.head(_rms(self.decoder.norm, x))[:, : self.vocab_size]

    def step_static(
        self, tokens_B: torch.Tensor, positions_B: torch.Tensor, column_1: torch.Tensor
    ):
        """`step` with fixed shapes: the whole cache width, `column_1` a 1-element tensor."""
        x = self.decoder.embed_tokens(tokens_B)
        cos = self.cos.index_select(0, positions_B)[:, None, :]
        sin = self.sin.index_select(0, positions_B)[:, None, :]
        self.key_bias.index_fill_(1, column_1, 0.0)
        bias = self.key_bias[:, None, None, :]
        for layer, cache_k, cache_v in zip(self.layers, self.keys, self.values, strict=True):
            q, k, v = layer.qkv_rope(x, cos, sin)
            cache_k.index_copy_(2, column_1, k[:, :, None])
            cache_v.index_copy_(2, column_1, v[:, :, None])
            x = layer.finish(x, self._attend_one(layer, q, cache_k, cache_v, bias))
        return self.head(_rms(self.decoder.norm, x))[:, : self.vocab_size]

    def keep(self, rows: torch.Tensor) -> None:
        """Drop every row of the cache but `rows` (indices into the current batch)."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
        self.key_bias = self.key_bias.index_select(0, rows)


class GraphedStep:
    """`LeanDecoder.step_static` captured once in a CUDA graph and replayed per token: one
    launch instead of a few hundred kernels (decoding a small batch is launch-bound).

    Capture runs before `prefill` (it writes one cache column, which prefill's reset of
    `key_bias` then hides until the step that really writes it)."""

    def __init__(self, decoder: LeanDecoder, batch: int):
        device = decoder.key_bias.device
        self.tokens = torch.zeros(batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, dtype=torch.long, device=device)
        self.column = torch.full((1,), decoder.width - 1, dtype=torch.long, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: lazy initialisations happen outside the capture
                decoder.step_static(self.tokens, self.positions, self.column)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = decoder.step_static(self.tokens, self.positions, self.column)

    def __call__(self, tokens_B: torch.Tensor, positions_B: torch.Tensor, column: int):
        self.tokens.copy_(tokens_B)
        self.positions.copy_(positions_B)
        self.column.fill_(column)
        self.graph.replay()
        return self.logits
