"""One T5 decoder step for every active slot, on the model's own weights.

Rows of one step sit at different decode positions, so nothing here is shared along the
time axis the way Hugging Face's decoder assumes:
- self-attention: each row writes its new K/V at its own position in the SlotCache and reads
  columns [0, t); its relative position bias is looked up per row from a table of T5's
  bucketed bias by distance (query position - key position), and columns after the row's
  own position are masked. The table is built once with the model's own bucketing function
  and bias embedding, so every value equals what `compute_bias` gives a lone request.
- cross-attention: no position bias (as in T5); the additive mask is the slot's encoder
  padding mask (SlotCache.cross_bias), over that slot's K/V projected at admission.
Both attentions add one float bias to unscaled scores (`attend`), the computation of the
merged-bias path the Engine installs for `generate` (kernels/t5_attention_bias.py).

The step computes its projections its own way (`projection`): each layer's self-attention q,
k and v as one GEMM, and a gated feed-forward's two input projections as one (a fused GEMM
gives bit-identical columns: each output is the same dot product). On a CPU every projection
and the LM head run as oneDNN matmuls over packed weights (serving/model/packed.py): measured
on the project's AVX-512 CPU they are 1.2-1.8x faster than the default GEMM at 64 rows, and a
row's result does not depend on how many rows share the step (checked bit for bit in
tests/test_t5_step.py), so a mixed row still equals the request alone. A layer the model
already packed (`model.packed_weights`) serves as it is; a fused projection packs its layers'
weights together once. On CUDA the fused weights are views of the model's own, so nothing is
stored twice. int8 models (`model.quantization: int8`) fuse their Int8Linear layers the same
way. Layer norms and activations are the model's own modules.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import T5ForConditionalGeneration

from ...model.int8 import Int8Linear
from ...model.packed import PackedLinear, PackedMatmul, packs_on_cpu
from .slot_cache import SlotCache

def attend(
    query: torch.Tensor,  # [B, H, 1, d]
    key: torch.Tensor,  # [B, H, K, d] (a view into the cache: strided along B)
    value: torch.Tensor,  # [B, H, K, d]
    bias: torch.Tensor,  # [B, H or 1, 1, K] additive: position bias and/or mask
) -> torch.Tensor:
    """One query per row over K keys, T5-style (scores not scaled): [B, H, 1, d].

    CUDA: `scaled_dot_product_attention` (fused, float32 softmax inside, as the merged-bias
    path of `generate`). CPU: two batched matmuls and a softmax, about twice as fast as SDPA's
    CPU kernel at one query per row (embedded shape, 64 rows, 23 keys: 0.12 vs 0.23 ms)."""
    if query.device.type == "cuda":
        return F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=1.0)
    batch, heads, _, d_kv = query.shape
    keys = key.shape[2]
    scores = torch.baddbmm(
        bias.expand(batch, heads, 1, keys).reshape(batch * heads, 1, keys),
        query.reshape(batch * heads, 1, d_kv),
        key.reshape(batch * heads, keys, d_kv).transpose(1, 2),
    )  # [B*H, 1, K]
    out = torch.bmm(scores.softmax(dim=-1), value.reshape(batch * heads, keys, d_kv))  # [B*H, 1, d]
    return out.view(batch, heads, 1, d_kv)


def projection(modules: list[nn.Module]) -> nn.Module | PackedMatmul:
    """One projection computing `modules` side by side (outputs concatenated along the last
    dim). Plain float layers: on a CPU one oneDNN matmul over the layers' weights packed
    together (a layer already packed alone is used as it is); elsewhere one GEMM over a fused
    weight whose slices the layers keep as their own weights (nothing stored twice). int8
    layers: one Int8Linear, likewise sliced. Any other layer (e.g. bitsandbytes') as it is."""
    if all(type(m) in (nn.Linear, PackedLinear) and m.bias is None for m in modules):
        if len(modules) == 1 and isinstance(modules[0], PackedLinear):
            return modules[0]
        if packs_on_cpu(modules[0].weight):
            return PackedMatmul(torch.cat([m.weight for m in modules]))
        if len(modules) == 1:
            return modules[0]
        weight = torch.cat([m.weight.detach() for m in modules])  # [sum N, K]
        start = 0
        for m in modules:
            rows = m.weight.shape[0]
            m.weight = nn.Parameter(weight[start : start + rows], requires_grad=False)
            start += rows
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
        fused.weight = nn.Parameter(weight, requires_grad=False)
        return fused
    if all(isinstance(m, Int8Linear) for m in modules):
        if len(modules) == 1:
            return modules[0]
        fused = Int8Linear.concat(modules)
        start = 0
        for m in modules:
            rows = m.weight.shape[0]
            m.weight, m.scale = fused.weight[start : start + rows], fused.scale[start : start + rows]
            start += rows
        return fused
    return modules[0] if len(modules) == 1 else _Side(modules)


class _Side(nn.Module):
    def __init__(self, modules: list[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], dim=-1)


class _Layer:
    """What one decoder layer's step needs, taken from the model's block once."""

    def __init__(self, block: nn.Module) -> None:
        self_layer, cross_layer, feed_forward = block.layer
        attention, cross = self_layer.SelfAttention, cross_layer.EncDecAttention
        self.self_norm = self_layer.layer_norm
        self.qkv = projection([attention.q, attention.k, attention.v])  # [n, D] -> [n, 3 * H * d]
        self.self_out = projection([attention.o])
        self.cross_norm = cross_layer.layer_norm
        self.cross_q, self.cross_out = projection([cross.q]), projection([cross.o])
        self.cross_k, self.cross_v = cross.k, cross.v  # projected once per admission, by the model's own
        dense = feed_forward.DenseReluDense
        self.ff_norm = feed_forward.layer_norm
        self.gated = hasattr(dense, "wi_0")
        wi = [dense.wi_0, dense.wi_1] if self.gated else [dense.wi]
        self.wi = projection(wi)  # [n, D] -> [n, (2 x) d_ff]
        self.act, self.wo = dense.act, projection([dense.wo])
        self.wo_dtype = getattr(dense.wo, "weight", torch.empty(0)).dtype

    def feed_forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """T5LayerFF (norm, the dense block, residual), with the gated block's two input
        projections as one GEMM: the same ops on the same values as the model's module."""
        inner = self.wi(self.ff_norm(hidden))  # [n, (2 x) d_ff]
        if self.gated:
            gate, linear = inner.chunk(2, dim=-1)
            inner = self.act(gate) * linear
        else:
            inner = self.act(inner)
        if inner.dtype != self.wo_dtype and self.wo_dtype != torch.int8:
            inner = inner.to(self.wo_dtype)  # transformers keeps `wo` in float32 for T5
        return hidden + self.wo(inner)


class T5DecoderStep:
    def __init__(self, model: T5ForConditionalGeneration, max_positions: int) -> None:
        config = model.config
        self.blocks = list(model.decoder.block)
        self.embed = model.decoder.embed_tokens
        self.final_norm = model.decoder.final_layer_norm
        self.lm_head = projection([model.lm_head])
        self.output_scale = config.d_model**-0.5 if getattr(config, "scale_decoder_outputs", False) else None
        self.heads, self.d_kv = config.num_heads, config.d_kv
        self.layers = len(self.blocks)
        self.dtype = self.embed.weight.dtype  # the compute dtype (weights may be int8)
        self.max_positions = max_positions
        self._layers = [_Layer(block) for block in self.blocks]
        self.bias_table = self._position_bias_table(max_positions)  # [H, T]

    @torch.inference_mode()
    def _position_bias_table(self, positions: int) -> torch.Tensor:
        attention = self.blocks[0].layer[0].SelfAttention
        weight = attention.relative_attention_bias.weight  # [buckets, H]
        distance = torch.arange(positions, device=weight.device)  # [T] query position - key position
        buckets = attention._relative_position_bucket(
            -distance,  # T5's relative position is key - query
            bidirectional=False,
            num_buckets=attention.relative_attention_num_buckets,
            max_distance=attention.relative_attention_max_distance,
        )  # [T]
        return attention.relative_attention_bias(buckets).t().contiguous()  # [H, T]

    def self_attention_bias(self, positions: torch.Tensor, columns: int, dtype: torch.dtype) -> torch.Tensor:
        """Per-row position bias over key columns [0, columns): [B, H, 1, columns]."""
        keys = torch.arange(columns, device=positions.device)  # [t]
        distance = positions[:, None] - keys[None, :]  # [B, t]
        bias = self.bias_table[:, distance.clamp(min=0)]  # [H, B, t]
        bias = bias.masked_fill((distance < 0)[None], torch.finfo(bias.dtype).min)  # future columns
        return bias.permute(1, 0, 2).unsqueeze(2).to(dtype)  # [B, H, 1, t]

    def project_cross(self, encoded: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each decoder layer's cross-attention K and V of an encoder output [B, S, D]:
        two lists of L tensors [B, H, S, d]."""
        batch, length, _ = encoded.shape
        keys, values = [], []
        for layer in self._layers:
            keys.append(layer.cross_k(encoded).view(batch, length, self.heads, self.d_kv).transpose(1, 2))
            values.append(layer.cross_v(encoded).view(batch, length, self.heads, self.d_kv).transpose(1, 2))
        return keys, values

    def forward(self, cache: SlotCache, rows: int, columns: int, width: int) -> torch.Tensor:
        """Logits of the next token for slot rows [0, rows): [rows, V].

        Feeds cache.tokens at cache.positions, writes their self-attention K/V into the
        cache, attends over self columns [0, columns) and encoder columns [0, width).
        Only tensor ops on fixed buffers: no host sync, safe to capture in a CUDA graph."""
        n, heads, d_kv = rows, self.heads, self.d_kv
        tokens = cache.tokens[:n]  # [n]
        positions = cache.positions[:n]  # [n]
        row_index = torch.arange(n, device=tokens.device)  # [n]
        hidden = self.embed(tokens)  # [n, D]
        self_bias = self.self_attention_bias(positions, columns, hidden.dtype)  # [n, H, 1, t]
        cross_bias = cache.cross_bias[:n, None, None, :width]  # [n, 1, 1, w]
        for index, layer in enumerate(self._layers):
            qkv = layer.qkv(layer.self_norm(hidden)).view(n, 3, heads, d_kv)  # [n, 3, H, d]
            cache.self_k[index, row_index, :, positions] = qkv[:, 1]
            cache.self_v[index, row_index, :, positions] = qkv[:, 2]
            out = attend(
                qkv[:, 0, :, None], cache.self_k[index, :n, :, :columns], cache.self_v[index, :n, :, :columns],
                self_bias,
            )  # [n, H, 1, d]
            hidden = hidden + layer.self_out(out.reshape(n, heads * d_kv))

            query = layer.cross_q(layer.cross_norm(hidden)).view(n, heads, 1, d_kv)  # [n, H, 1, d]
            out = attend(
                query, cache.cross_k[index, :n, :, :width], cache.cross_v[index, :n, :, :width], cross_bias
            )  # [n, H, 1, d]
            hidden = hidden + layer.cross_out(out.reshape(n, heads * d_kv))
            hidden = layer.feed_forward(hidden)  # [n, D]
        hidden = self.final_norm(hidden)  # [n, D]
        if self.output_scale is not None:
            hidden = hidden * self.output_scale
        return self.lm_head(hidden)  # [n, V]
