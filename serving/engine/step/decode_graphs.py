"""How the step loop runs its decoder forward: eagerly, under CUDA graphs, or torch.compile'd.

`engine.decode_graphs`:
- `none`: eager PyTorch, the exact active shape every step. The only mode on CPU.
- `cuda-graphs`: the forward of T5DecoderStep captured once per padded shape (active rows,
  self-attention columns and encoder columns each rounded up to a power of two,
  `padded_shape`) and replayed. Every tensor the forward touches lives in the SlotCache's fixed buffers,
  so a replay reads the current tokens, positions and K/V. Rows past the active ones are free
  slots parked at position 0 (their outputs are ignored; their K/V writes land in free rows).
  When the cross K/V buffer grows (a longer request), every captured graph is dropped.
- `compile`: `torch.compile` of the same forward (inductor kernels, `dynamic=False`) over the
  same padded shapes.
- `auto`: `cuda-graphs` on CUDA, `none` elsewhere.

Not yet run on a GPU (none was lent while this was written). Check there first:
1. greedy rows under `cuda-graphs` equal `none` (tests/test_step_engine.py runs that
   comparison on CUDA, marked `gpu`);
2. the step time of `cuda-graphs` against `compile` and `none` at 1, 8 and 64 active slots;
3. capture count, capture time and pool memory after a varied workload (`padded_shape`
   bounds the number of shapes).
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Literal

import torch

from .slot_cache import CROSS_WIDTH_STEP, SlotCache
from .t5_step import T5DecoderStep

DecodeGraphs = Literal["auto", "cuda-graphs", "compile", "none"]
MODES = ("auto", "cuda-graphs", "compile", "none")
MIN_COLUMNS = 32  # fewest self-attention columns a graph is built for

# (rows, columns, width) -> logits [rows, V]
DecoderRunner = Callable[[int, int, int], torch.Tensor]


def resolve_decode_graphs(mode: str, device: torch.device) -> str:
    """The mode to run: 'auto' picks by device; GPU-only modes are refused off CUDA."""
    if mode not in MODES:
        raise ValueError(f"engine.decode_graphs={mode!r} is unknown; expected one of {', '.join(MODES)}")
    if mode == "auto":
        return "cuda-graphs" if device.type == "cuda" else "none"
    if mode != "none" and device.type != "cuda":
        raise ValueError(
            f"engine.decode_graphs={mode!r} needs the model on a CUDA device, but it is on {device}; "
            "use 'auto' or 'none' (the eager step loop) on CPU"
        )
    return mode


def make_runner(mode: str, decoder: T5DecoderStep, cache: SlotCache) -> "EagerRunner | GraphRunner | CompiledRunner":
    if mode == "cuda-graphs":
        return GraphRunner(decoder, cache)
    if mode == "compile":
        return CompiledRunner(decoder, cache)
    return EagerRunner(decoder, cache)


def _power_of_two(value: int, floor: int, cap: int) -> int:
    return min(max(1 << (value - 1).bit_length(), floor), cap)


def padded_shape(cache: SlotCache, rows: int, columns: int, width: int) -> tuple[int, int, int]:
    """(rows, columns, width) rounded up to the shape a graph or compiled kernel is built for:
    powers of two (columns from 32, encoder width from 64), capped by the buffers. A long run
    therefore builds at most log2(slots) x log2(T/32) x log2(W/64) shapes (about a hundred
    at 64 slots, T=256, W=1024), and padding at most doubles the attention's reads."""
    return (
        _power_of_two(rows, 1, cache.slots),
        _power_of_two(columns, MIN_COLUMNS, cache.max_positions),
        _power_of_two(width, CROSS_WIDTH_STEP, cache.cross_width),
    )


class EagerRunner(partial):
    """`T5DecoderStep.forward` bound to the cache: `runner(rows, columns, width)` is the
    forward itself, with no frame of its own per step."""

    def __new__(cls, decoder: T5DecoderStep, cache: SlotCache) -> "EagerRunner":
        return super().__new__(cls, decoder.forward, cache)

    def reset(self) -> None:
        pass


class GraphRunner:
    """CUDA graphs of the decoder forward, one per padded shape, captured on first use."""

    def __init__(self, decoder: T5DecoderStep, cache: SlotCache) -> None:
        self.decoder, self.cache = decoder, cache
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def __call__(self, rows: int, columns: int, width: int) -> torch.Tensor:
        key = padded_shape(self.cache, rows, columns, width)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(*key)
        graph, logits = entry
        graph.replay()
        return logits[:rows]  # [rows, V]

    def _capture(self, rows: int, columns: int, width: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Warm-up runs execute the real step (same K/V writes as the replay that follows), so
        # they change no state the replay would not.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.decoder.forward(self.cache, rows, columns, width)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.decoder.forward(self.cache, rows, columns, width)  # [rows, V] static output
        return graph, logits

    def reset(self) -> None:
        """The cache's buffers were reallocated: every captured graph reads stale memory."""
        self.graphs.clear()


class CompiledRunner:
    """torch.compile of the decoder forward over the same padded shapes as GraphRunner."""

    def __init__(self, decoder: T5DecoderStep, cache: SlotCache) -> None:
        self.decoder, self.cache = decoder, cache
        # One compiled graph per padded shape: allow as many as padded_shape can make
        # (dynamo's default limit of 8 would silently fall back to eager).
        shapes = cache.slots.bit_length() * cache.max_positions.bit_length() * 16
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, shapes)
        self.compiled = torch.compile(decoder.forward, dynamic=False)

    def __call__(self, rows: int, columns: int, width: int) -> torch.Tensor:
        return self.compiled(self.cache, *padded_shape(self.cache, rows, columns, width))[:rows]  # [rows, V]

    def reset(self) -> None:
        torch._dynamo.reset()
