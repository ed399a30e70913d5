"""Bytes a T5 decode step reads from device memory: the memory-bandwidth bound of decoding.

One greedy decode step of a batch reads, from HBM:
- the decoder's weights once, shared by every row: its layers, its final norm and the output
  projection (`lm_head`, read whole to score the vocabulary); the input embedding is a lookup
  of one row per sequence and is left out (unless it is the same tensor as `lm_head`);
- but NOT the cross-attention K/V projection weights after step 1: the cache holds their
  outputs for the encoder positions, so later steps never touch them;
- per row, its cache: cross-attention K/V at the encoder length, and self-attention K/V up to
  the current step (step t reads t positions, the newest included).

    bytes(step t) = decoder weights - cross K/V projection weights
                    + batch * (cross cache per row + t * self cache per position)

On the T5-XXL shape in bf16 with 229 encoder positions a row's cross-attention cache is
about 90 MB, and its self-attention cache about 13 MB on average over 64 new tokens: at
batch 64 the caches add about 60% to the 11.1 GB of weights a step reads.

Works on a model whose parameters are on the `meta` device (no memory), so the accounting of
an 11B shape can be checked on any machine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch


def _bytes(params: Iterable[torch.nn.Parameter]) -> int:
    """Bytes of distinct parameters: a tied tensor is counted once (by identity, so meta works)."""
    seen: dict[int, torch.nn.Parameter] = {}
    for p in params:
        seen.setdefault(id(p), p)
    return sum(p.numel() * p.element_size() for p in seen.values())


@dataclass(frozen=True)
class DecodeStepBytes:
    """What one decode step reads, split into the shared weights and each row's cache."""

    decoder_weight_bytes: int  # decoder layers, final norm and lm_head; no input-embedding lookup
    cross_kv_weight_bytes: int  # the cross-attention k and v projections of every decoder layer
    cross_cache_bytes_per_row: int  # K and V of every decoder layer at the encoder length
    self_cache_bytes_per_position: int  # K and V of every decoder layer for one decoded position
    encoder_length: int

    @property
    def weight_bytes_per_step(self) -> int:
        """Weights read by every step after the first (the cross K/V projections are cached)."""
        return self.decoder_weight_bytes - self.cross_kv_weight_bytes

    def cache_bytes_per_row(self, step: int) -> int:
        """One row's cache reads at decode step `step` (1-based: step 1 makes the first token)."""
        return self.cross_cache_bytes_per_row + step * self.self_cache_bytes_per_position

    def step_bytes(self, batch: int, step: int) -> int:
        """Bytes read by decode step `step` (>= 2, when the cross-attention cache is filled)."""
        if step < 2:
            raise ValueError(
                f"step {step}: the byte count holds from step 2 on; step 1 still projects the "
                "encoder output into the cross-attention cache, which the decode timing leaves out"
            )
        return self.weight_bytes_per_step + batch * self.cache_bytes_per_row(step)

    def decode_bytes(self, batch: int, new_tokens: int) -> int:
        """Bytes read by steps 2..new_tokens: what `T(new_tokens) - T(1 token)` times."""
        return sum(self.step_bytes(batch, step) for step in range(2, new_tokens + 1))

    def bound_tokens_per_s(self, batch: int, new_tokens: int, bandwidth_gbps: float) -> float:
        """Tokens/s if steps 2..new_tokens ran at `bandwidth_gbps` of memory reads, nothing else."""
        if new_tokens < 2:
            raise ValueError(f"new_tokens={new_tokens}: a decode bound needs at least 2 new tokens")
        seconds = self.decode_bytes(batch, new_tokens) / (bandwidth_gbps * 1e9)
        return batch * (new_tokens - 1) / seconds


def decode_step_bytes(model: torch.nn.Module, encoder_length: int) -> DecodeStepBytes:
    """The byte accounting of `model` (a T5ForConditionalGeneration, on any device, meta too).

    Cache bytes use the dtype of the decoder's attention weights, which the cache is made in.
    """
    config = model.config
    decoder = model.decoder
    embedding = decoder.embed_tokens.weight
    lm_head = model.get_output_embeddings().weight
    decoder_params = [p for p in decoder.parameters() if p is not embedding] + [lm_head]
    cross = [block.layer[1].EncDecAttention for block in decoder.block]
    cross_kv = [p for attention in cross for p in (attention.k.weight, attention.v.weight)]
    element = cross[0].k.weight.element_size()
    layers = len(decoder.block)
    inner = config.num_heads * config.d_kv  # width of one K or V position
    per_position = 2 * layers * inner * element  # K and V, every layer
    return DecodeStepBytes(
        decoder_weight_bytes=_bytes(decoder_params),
        cross_kv_weight_bytes=_bytes(cross_kv),
        cross_cache_bytes_per_row=encoder_length * per_position,
        self_cache_bytes_per_position=per_position,
        encoder_length=encoder_length,
    )
