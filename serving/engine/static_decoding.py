"""Decoding programs for rows of a mixed batch that share an encoder pass.

Choice: the whole batch is encoded once; rows are then decoded in groups that share a
decoding program, with per-row parameters inside each group:
- greedy rows: one loop, per-row max_new_tokens;
- sampling rows: one loop, per-row temperature, top-p, max_new_tokens and random stream
  (PerRowSampler: each row draws from its own seed, so its tokens never depend on its
  batch-mates; the step loop samples with the same function, serving/engine/sampling.py);
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

from promptmux.prompts.errors import InvalidRequestError
from .types import GenerationParams
from .sampling import SAMPLING_DTYPE, check_sampling_params, sample_rows, seed_words


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
        # Sampling rows pick their token in PerRowSampler and leave only it unmasked, so
        # generate's own argmax takes it: no shared RNG is drawn from.
        config.do_sample = False
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


class PerRowSampler(LogitsProcessor):
    """Samples each row with its own temperature, top-p and random stream
    (`sampling.sample_rows`), then masks every other token: generate's greedy pick takes it.

    A row's k-th token is drawn with the uniform of (its seed, k), exactly as in the step
    loop, so a seeded request gives the same tokens alone, in any batch, on either path."""

    def __init__(self, params: Sequence[GenerationParams], seeds: Sequence[int], device: torch.device,
                 start_length: int) -> None:
        for p in params:  # validation refuses these; a row that skipped it must not decode garbage
            try:
                check_sampling_params(p)
            except InvalidRequestError as error:
                raise ValueError(f"a sampling row reached the decoder unvalidated: {error}") from None
        self.temperature = torch.tensor([p.temperature for p in params], dtype=SAMPLING_DTYPE).to(device)  # [Bg]
        self.top_p = torch.tensor([p.top_p for p in params], dtype=SAMPLING_DTYPE).to(device)  # [Bg]
        self.seeds = torch.tensor([seed_words(s) for s in seeds], dtype=torch.long).to(device)  # [Bg, 2]
        self.greedy = torch.zeros(len(params), dtype=torch.bool, device=device)  # [Bg]
        self.filter_top_p = any(p.top_p < 1.0 for p in params)
        self.start_length = start_length  # decoder tokens before the first generated one

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        counters = torch.full_like(self.seeds[:, 0], input_ids.shape[1] - self.start_length)  # [Bg]
        tokens = sample_rows(scores, self.greedy, self.temperature, self.top_p, self.seeds, counters,
                             filter_top_p=self.filter_top_p)  # [Bg]
        chosen = torch.full_like(scores, float("-inf"))  # [Bg, V]
        return chosen.scatter(1, tokens[:, None], 0.0)


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
