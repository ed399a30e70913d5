"""The step loop's preallocated decoder state: per-slot K/V and per-slot decode state.

Layout (L decoder layers, N slots, H heads, d = d_kv):
- self-attention K/V: `self_k`, `self_v` [L, N, H, T, d], T = engine.max_new_tokens_limit. A
  slot's token at decode position p writes column p; columns past a row's position hold
  stale values and are masked out by the position bias.
- cross-attention K/V: `cross_k`, `cross_v` [L, N, H, W, d], projected once at admission from
  the request's encoder output, and `cross_bias` [N, W]: 0 on the request's
  `[prompt; input]` positions, the dtype's minimum on padding (T5's cross-attention has no
  position bias, so this additive mask is all of it).
  W is padded, not paged: it is the longest encoder length admitted so far, rounded up to
  `CROSS_WIDTH_STEP`, and grows (one copy of the live rows) when a longer request arrives.
  Padding keeps every step one dense SDPA call over a fixed buffer (what CUDA graphs need,
  and no page-table gather per layer per step); a step reads only the first `w` columns,
  w = the longest *active* encoder length, so the padding costs memory, not compute. Paged
  cross K/V would save memory when one long request sits among many short ones; at the
  shapes served here (encoder lengths up to max_prompt_length + max_input_tokens) the
  padded buffer fits (T5-XXL, 64 slots, W=512, bf16: 6.4 GB).
- per-slot decode state: the token to feed next, its position (= tokens produced so far, the
  sampler's counter too), and the row's sampling parameters and seed.
- per-slot logits controls (engine/sampling.py's `control_logits`, stop_strings.py): the
  decoder's input so far, `history` [N, T+1] (column 0 the start token, column k+1 the k-th
  output token), each row's top_k, repetition penalty, no-repeat n-gram size, the position
  before which EOS stays masked, and which of the step's distinct stop strings it stops at
  (`stop_member` [N, S]: column s is a string the executor assigned to s). Written only while
  some active row uses them.

Active slots are kept compact in rows [0, n): a step runs on views `[:n]` with no gather, and
freeing a row moves the last active rows into the holes (`move_rows`, one index_copy per
buffer). The slot a request occupies may therefore change between steps; the step engine
keeps the mapping.
"""
from __future__ import annotations

import torch

CROSS_WIDTH_STEP = 64  # encoder-length granularity of the cross K/V buffer


class SlotCache:
    def __init__(
        self,
        *,
        slots: int,
        layers: int,
        heads: int,
        d_kv: int,
        max_positions: int,
        dtype: torch.dtype,
        device: torch.device | str,
        stop_columns: int = 0,
    ) -> None:
        self.slots, self.layers, self.heads, self.d_kv = slots, layers, heads, d_kv
        self.max_positions = max_positions
        self.dtype, self.device = dtype, torch.device(device)
        self.masked = torch.finfo(dtype).min
        kv = (layers, slots, heads, max_positions, d_kv)
        self.self_k = torch.zeros(kv, dtype=dtype, device=device)  # [L, N, H, T, d]
        self.self_v = torch.zeros(kv, dtype=dtype, device=device)  # [L, N, H, T, d]
        self.cross_width = 0
        self.cross_k = torch.zeros(layers, slots, heads, 0, d_kv, dtype=dtype, device=device)  # [L, N, H, W, d]
        self.cross_v = torch.zeros_like(self.cross_k)  # [L, N, H, W, d]
        self.cross_bias = torch.zeros(slots, 0, dtype=dtype, device=device)  # [N, W]
        # Decode state per slot. Free rows keep position 0, so a step padded past the active
        # rows (CUDA graphs run a fixed row count) writes inside the buffer.
        self.tokens = torch.zeros(slots, dtype=torch.long, device=device)  # [N] next decoder input
        self.positions = torch.zeros(slots, dtype=torch.long, device=device)  # [N] its position
        self.greedy = torch.ones(slots, dtype=torch.bool, device=device)  # [N]
        self.temperature = torch.ones(slots, dtype=torch.float32, device=device)  # [N]
        self.top_p = torch.ones(slots, dtype=torch.float32, device=device)  # [N]
        self.seeds = torch.zeros(slots, 2, dtype=torch.long, device=device)  # [N, 2] 32-bit words
        self.history = torch.zeros(slots, max_positions + 1, dtype=torch.long, device=device)  # [N, T+1]
        self.top_k = torch.zeros(slots, dtype=torch.long, device=device)  # [N] 0: off
        self.repetition_penalty = torch.ones(slots, dtype=torch.float32, device=device)  # [N] 1: off
        self.ngram_size = torch.zeros(slots, dtype=torch.long, device=device)  # [N] 0: off
        self.eos_until = torch.zeros(slots, dtype=torch.long, device=device)  # [N] EOS masked below it
        self.stop_member = torch.zeros(slots, stop_columns, dtype=torch.bool, device=device)  # [N, S]

    # ------------------------------------------------------------------ sizing
    def ensure_cross_width(self, width: int, live_rows: int) -> bool:
        """Grow the cross buffers to hold `width` encoder positions, keeping rows [0,
        live_rows). Returns True when the buffers were reallocated (captured graphs that
        read them are then stale)."""
        if width <= self.cross_width:
            return False
        new_width = -(-width // CROSS_WIDTH_STEP) * CROSS_WIDTH_STEP
        shape = (self.layers, self.slots, self.heads, new_width, self.d_kv)
        cross_k = torch.zeros(shape, dtype=self.dtype, device=self.device)  # [L, N, H, W', d]
        cross_v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        bias = torch.full((self.slots, new_width), self.masked, dtype=self.dtype, device=self.device)  # [N, W']
        old = self.cross_width
        if live_rows and old:
            cross_k[:, :live_rows, :, :old] = self.cross_k[:, :live_rows]
            cross_v[:, :live_rows, :, :old] = self.cross_v[:, :live_rows]
            bias[:live_rows, :old] = self.cross_bias[:live_rows]
        self.cross_k, self.cross_v, self.cross_bias = cross_k, cross_v, bias
        self.cross_width = new_width
        return True

    # ------------------------------------------------------------------ admission
    def admit_rows(
        self,
        start: int,
        cross_k: list[torch.Tensor],  # L x [B, H, S, d]
        cross_v: list[torch.Tensor],  # L x [B, H, S, d]
        encoder_lengths: torch.Tensor,  # [B] long: each row's [prompt; input] length
        decoder_start_token: int,
        greedy: torch.Tensor,  # [B] bool
        temperature: torch.Tensor,  # [B] float32
        top_p: torch.Tensor,  # [B] float32
        seeds: torch.Tensor,  # [B, 2] long
    ) -> None:
        """Fill rows [start, start + B) for newly admitted requests."""
        batch, _, width, _ = cross_k[0].shape
        rows = slice(start, start + batch)
        for layer in range(self.layers):  # once per admission, not per step
            self.cross_k[layer, rows, :, :width] = cross_k[layer]
            self.cross_v[layer, rows, :, :width] = cross_v[layer]
        columns = torch.arange(self.cross_width, device=self.device)  # [W]
        self.cross_bias[rows] = torch.where(
            columns[None, :] < encoder_lengths[:, None], 0.0, self.masked
        ).to(self.dtype)  # [B, W]
        self.tokens[rows] = decoder_start_token
        self.positions[rows] = 0
        self.greedy[rows] = greedy
        self.temperature[rows] = temperature
        self.top_p[rows] = top_p
        self.seeds[rows] = seeds

    def admit_controls(
        self,
        start: int,
        decoder_start_token: int,
        top_k: torch.Tensor,  # [B] long
        repetition_penalty: torch.Tensor,  # [B] float32
        ngram_size: torch.Tensor,  # [B] long
        eos_until: torch.Tensor,  # [B] long
        stop_member: torch.Tensor,  # [B, S] bool
    ) -> None:
        """The logits controls of rows [start, start + B), admitted just before (admit_rows)."""
        rows = slice(start, start + top_k.shape[0])
        self.history[rows, 0] = decoder_start_token
        self.top_k[rows] = top_k
        self.repetition_penalty[rows] = repetition_penalty
        self.ngram_size[rows] = ngram_size
        self.eos_until[rows] = eos_until
        self.stop_member[rows] = stop_member

    # ------------------------------------------------------------------ compaction
    def move_rows(self, dst: list[int], src: list[int], positions: int, width: int) -> None:
        """Copy rows `src` into rows `dst` (all buffers; K/V up to `positions` decode
        columns and `width` encoder columns: the rest is masked for every live row)."""
        if not dst:
            return
        dst_index = torch.tensor(dst, dtype=torch.long).to(self.device, non_blocking=True)
        src_index = torch.tensor(src, dtype=torch.long).to(self.device, non_blocking=True)
        # Advanced-index assignment: one gather-scatter over the live columns (on CPU about 15x
        # faster than index_select + index_copy_ on the strided column view).
        for buffer in (self.self_k, self.self_v):
            buffer[:, dst_index, :, :positions] = buffer[:, src_index, :, :positions]  # [L, m, H, t, d]
        for buffer in (self.cross_k, self.cross_v):
            buffer[:, dst_index, :, :width] = buffer[:, src_index, :, :width]  # [L, m, H, w, d]
        for buffer in (self.cross_bias, self.tokens, self.positions, self.greedy, self.temperature,
                       self.top_p, self.seeds, *self.control_buffers()):
            buffer[dst_index] = buffer[src_index]

    def control_buffers(self) -> tuple[torch.Tensor, ...]:
        return (self.history, self.top_k, self.repetition_penalty, self.ngram_size, self.eos_until, self.stop_member)

    def clear_rows(self, start: int, stop: int) -> None:
        """Rows [start, stop) became free: park them at position 0 (see __init__)."""
        self.positions[start:stop] = 0
        self.tokens[start:stop] = 0
