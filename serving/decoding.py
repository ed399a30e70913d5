"""Decoding programs for rows of a mixed batch that share an encoder pass.

Choice: the whole batch is encoded once; rows are then decoded in groups that share a
decoding program, with per-row parameters inside each group:
- greedy rows: one loop, per-row max_new_tokens;
- sampling rows: one loop, per-row temperature, top-p and max_new_tokens;
- beam rows: one loop per (num_beams, length_penalty, max_new_tokens), because a beam
  search's result depends on its length budget.
So a batch runs at most 2 + (number of distinct beam settings) decoder loops, never one per
task or per request.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from transformers import GenerationConfig, LogitsProcessor, StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from .requests import GenerationParams


@dataclass(frozen=True)
class DecodeGroupKey:
    strategy: str
    num_beams: int = 1
    length_penalty: float = 1.0
    max_new_tokens: int = 0  # only beam groups are keyed by length


def group_key(params: GenerationParams) -> DecodeGroupKey:
    if params.strategy == "beam" and params.num_beams > 1:
        return DecodeGroupKey("beam", params.num_beams, params.length_penalty, params.max_new_tokens)
    if params.strategy == "sample":
        return DecodeGroupKey("sample")
    return DecodeGroupKey("greedy")


def generation_config(key: DecodeGroupKey, params: Sequence[GenerationParams], base: GenerationConfig) -> GenerationConfig:
    config = GenerationConfig.from_dict(base.to_dict())
    config.max_new_tokens = max(p.max_new_tokens for p in params)
    config.min_new_tokens = None
    config.max_length = None
    # Disable every default warper: the per-row processor below is the only one.
    config.top_k = None
    config.top_p = None
    config.temperature = None
    config.num_return_sequences = 1
    config.no_repeat_ngram_size = None
    config.repetition_penalty = None
    if key.strategy == "beam":
        config.do_sample = False
        config.num_beams = key.num_beams
        config.length_penalty = key.length_penalty
        config.early_stopping = True
    else:
        config.num_beams = 1
        config.do_sample = key.strategy == "sample"
    return config


class PerRowMaxNewTokens(StoppingCriteria):
    """Stops each row at its own budget (a row's tokens up to its limit do not depend on
    the other rows' limits in greedy and sampling loops)."""

    def __init__(self, limits: torch.Tensor, start_length: int) -> None:
        self.limits = limits  # [Bg] long
        self.start_length = start_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        generated = input_ids.shape[1] - self.start_length
        return generated >= self.limits


class PerRowTemperatureTopP(LogitsProcessor):
    """Temperature and nucleus filtering with one value per row, in one vectorised pass."""

    def __init__(self, temperature: torch.Tensor, top_p: torch.Tensor) -> None:
        self.temperature = temperature[:, None]  # [Bg, 1]
        self.top_p = top_p[:, None]  # [Bg, 1]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores / self.temperature  # [Bg, V]
        sorted_scores, order = torch.sort(scores, descending=True)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token once the mass before it already reaches top_p; the top token always stays.
        drop_sorted = (cumulative - sorted_scores.softmax(dim=-1)) >= self.top_p
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)  # back to vocab order
        return scores.masked_fill(drop, float("-inf"))


class TokenStreamer(BaseStreamer):
    """Hands each new token of each row to `on_token(row, token_id)` until the row is done.

    Only used when some request streams: it costs one host sync per decode step."""

    def __init__(self, on_token: Callable[[int, int], None], limits: list[int], eos_token_id: int) -> None:
        self.on_token = on_token
        self.limits = limits
        self.eos = eos_token_id
        self.emitted = [0] * len(limits)
        self.done = [False] * len(limits)
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # the first call carries the decoder start tokens
            self._prompt_seen = True
            return
        for row, token in enumerate(value.view(-1).tolist()):
            if self.done[row]:
                continue
            self.on_token(row, token)
            self.emitted[row] += 1
            self.done[row] = token == self.eos or self.emitted[row] >= self.limits[row]

    def end(self) -> None:
        pass
