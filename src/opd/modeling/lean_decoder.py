"""Decoding on the lean forward: a preallocated KV cache, one token per row per step.

`LeanDecoder` runs the layers of `opd.modeling.lean` (`LayerWeights` with joint projections:
a small-batch step is launch-bound) over a static cache, the output layer packed once per
generation for MKL where that pays (`decode_head`); `GraphedStep` replays its fixed-shape
step as one CUDA graph. `opd.sampling.fast` drives it; `opd.modeling.lean_check` compares
its prefill and steps with the Hugging Face forward on each model's first batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from opd.modeling.lean import (
    LayerWeights,
    grid_attention,
    grid_mask,
    plain_forward,
    rms_norm_of,
    rope_tables,
)

# MKL's packed copy pads the hidden dimension to whole 512-wide panels (MKL 2024.2: a
# [32000, 256] head packs to 2.7x its size, [32000, 128] to 5.4x, [V, 1024] to 1.2x), plus a
# few MB. Heads whose padding would more than double them decode unpacked.
_PANEL = 512


def _packing_pays(weight: torch.Tensor) -> bool:
    hidden = weight.shape[1]
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and -(-hidden // _PANEL) * _PANEL <= 2 * hidden
        and torch.backends.mkl.is_available()
        and hasattr(torch.ops.mkl, "_mkl_linear")
    )


def decode_head(head, rows: int):
    """`x -> head(x)` for decoding steps of `rows` rows.

    A float32 plain `Linear` on a CPU with MKL is packed once here and applied with MKL's
    packed GEMM (what torch.compile's CPU backend does with frozen linear weights): at a few
    dozen rows a plain `F.linear` re-packs the whole `[V, H]` weight on every step, about a
    third of the head's time (benchmarks/README.md). Any other head, autograd on, or another
    row count (rows that left; MKL's op itself falls back to `F.linear` there) runs as before.
    The packed copy lives as long as the decoder (one generation).
    """
    plain = plain_forward(head, F.linear)
    if plain is head or not _packing_pays(head.weight):
        return plain
    weight = head.weight.detach()
    packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, rows)
    if packed.numel() > 3 * weight.numel() + (1 << 22):  # not the layout measured above
        return plain

    def packed_head(x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.dim() != 2:
            return plain(x)
        return torch.ops.mkl._mkl_linear(x, packed, weight, None, rows)

    return packed_head


class LeanDecoder:
    """Prefill + one-token steps over a preallocated `[B, Hkv, T, D]` KV cache per layer.

    All rows write column `t` at step t (prompts are left-padded to one width), so the
    cache is a plain grid; `key_bias [B, T]` is 0 on cells holding real tokens, -inf
    elsewhere. Build one per generation: it snapshots the weights. `pack_head=False` keeps
    the output layer unpacked (a short generation does not repay the packing).

    `step` attends over the columns written so far (a Python int says how many); rows can
    leave (`keep`). `step_static` attends over the whole width, the column given as a
    device tensor, so its shapes never change and it can be captured in a CUDA graph.
    """

    @torch.no_grad()
    def __init__(self, model, vocab_size: int, batch: int, width: int, pack_head: bool = True):
        self.decoder = model.get_decoder()
        self.vocab_size = vocab_size
        self.embed = plain_forward(self.decoder.embed_tokens, F.embedding)
        output = model.get_output_embeddings()
        head = decode_head(output, batch) if pack_head else plain_forward(output, F.linear)
        final_norm = rms_norm_of(self.decoder.norm)
        self.logits = lambda x: head(final_norm(x))[:, :vocab_size]
        self.width = width
        self.layers = [LayerWeights(layer, joint=True) for layer in self.decoder.layers]
        param = next(model.parameters())
        dtype, device = param.dtype, param.device
        positions = torch.arange(width, device=device)
        cos, sin = rope_tables(
            *self.decoder.rotary_emb(torch.zeros((), dtype=dtype, device=device), positions[None])
        )
        self.cos_sin = torch.stack((cos[0], sin[0]), dim=1)  # [width, 2, D]: one gather
        shapes = [(batch, layer.kv_heads, width, layer.head_dim) for layer in self.layers]
        self.keys = [torch.zeros(s, dtype=dtype, device=device) for s in shapes]
        self.values = [torch.zeros(s, dtype=dtype, device=device) for s in shapes]
        self.key_bias = torch.full((batch, width), float("-inf"), dtype=dtype, device=device)

    def prefill(self, ids_BP: torch.Tensor, real_BP: torch.Tensor) -> torch.Tensor:
        """Run the prompts into the cache (in place); return `[B, V]` first-token logits."""
        B, P = ids_BP.shape
        x = self.embed(ids_BP)
        positions = (real_BP.long().cumsum(-1) - 1).clamp(min=0)
        cos_sin = self.cos_sin[positions]  # [B, P, 2, D]
        cos, sin = cos_sin[:, :, :1], cos_sin[:, :, 1:]  # [B, P, 1, D]: broadcast over heads
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
            out = grid_attention(layer.attn, q.transpose(1, 2), k, v, mask)
            out = out.transpose(1, 2).reshape(B, P, -1)
            if i == len(self.layers) - 1:  # only the last column goes on to the head
                x, out = x[:, -1], out[:, -1]
            x = layer.finish(x, out)
        return self.logits(x)

    def _attend_one(self, layer, q, keys, values, bias):
        # One query per row: plain batched matmuls beat the fused CPU attention kernel here.
        # Query heads are grouped by the KV head they share (GQA), so the cache is not
        # repeated; `[B, Hkv, T, D]` cache slices fold to `[B * Hkv, T, D]` without a copy.
        B, Hkv, T, D = keys.shape
        q = q.reshape(B * Hkv, -1, D)
        scores = torch.bmm(q, keys.reshape(B * Hkv, T, D).transpose(1, 2)).view(B, Hkv, -1, T)
        scores = torch.add(bias, scores, alpha=layer.scaling)  # bias + scaling * q.k: one kernel
        if scores.dtype == torch.float32:
            probs = torch.softmax(scores, dim=-1)
        else:
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.bmm(probs.view(B * Hkv, -1, T), values.reshape(B * Hkv, T, D))
        return out.view(B, -1)

    def step(self, tokens_B: torch.Tensor, positions_B: torch.Tensor, column: int):
        """Feed one token per row at cache column `column`; return `[B, V]` next logits."""
        x = self.embed(tokens_B)
        cos_sin = self.cos_sin[positions_B]  # [B, 2, D]
        cos, sin = cos_sin[:, :1], cos_sin[:, 1:]  # [B, 1, D]: broadcast over heads
        self.key_bias[:, column] = 0.0
        bias = self.key_bias[:, None, None, : column + 1]
        for layer, cache_k, cache_v in zip(self.layers, self.keys, self.values, strict=True):
            q, k, v = layer.qkv_rope(x, cos, sin)  # [B, heads, D]
            cache_k[:, :, column] = k
            cache_v[:, :, column] = v
            end = column + 1
            out = self._attend_one(layer, q, cache_k[:, :, :end], cache_v[:, :, :end], bias)
            x = layer.finish(x, out)
        return self.logits(x)

    def step_static(
        self, tokens_B: torch.Tensor, positions_B: torch.Tensor, column_1: torch.Tensor
    ):
        """`step` with fixed shapes: the whole cache width, `column_1` a 1-element tensor."""
        x = self.embed(tokens_B)
        cos_sin = self.cos_sin.index_select(0, positions_B)
        cos, sin = cos_sin[:, :1], cos_sin[:, 1:]
        self.key_bias.index_fill_(1, column_1, 0.0)
        bias = self.key_bias[:, None, None, :]
        for layer, cache_k, cache_v in zip(self.layers, self.keys, self.values, strict=True):
            q, k, v = layer.qkv_rope(x, cos, sin)
            cache_k.index_copy_(2, column_1, k[:, :, None])
            cache_v.index_copy_(2, column_1, v[:, :, None])
            x = layer.finish(x, self._attend_one(layer, q, cache_k, cache_v, bias))
        return self.logits(x)

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
