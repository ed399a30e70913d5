"""Typed requests and results of the engine: the plain-Python contract every edge
(CLI, Ray Serve, gRPC, benchmarks) converts to and from."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from promptmux.prompts.records import PromptMeta

from .errors import InvalidRequestError

Strategy = Literal["greedy", "beam", "sample"]
FinishReason = Literal["eos", "length"]


@dataclass(frozen=True)
class GenerationParams:
    """How to decode one request.

    Rows of one batch may differ: the engine encodes the whole batch once, then decodes rows
    in groups that share a decoding program (greedy and sampling rows share one loop with
    per-row temperature, top-p and length limits; beam rows group by beam settings).
    """

    max_new_tokens: int = 32
    strategy: Strategy = "greedy"
    num_beams: int = 4
    length_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None

    def validate(self, max_new_tokens_limit: int) -> None:
        if not 1 <= self.max_new_tokens <= max_new_tokens_limit:
            raise InvalidRequestError(
                f"max_new_tokens={self.max_new_tokens} is out of range; expected 1..{max_new_tokens_limit} "
                "(the server's max_new_tokens_limit)"
            )
        if self.strategy not in ("greedy", "beam", "sample"):
            raise InvalidRequestError(
                f"unknown decoding strategy {self.strategy!r}; expected 'greedy', 'beam' or 'sample'"
            )
        if self.strategy == "beam" and not 1 <= self.num_beams <= 16:
            raise InvalidRequestError(f"num_beams={self.num_beams} is out of range; expected 1..16")
        if self.strategy == "sample":
            if not (math.isfinite(self.temperature) and self.temperature > 0):
                raise InvalidRequestError(
                    f"temperature={self.temperature} is invalid; expected a finite value > 0 "
                    "(use strategy='greedy' for deterministic output)"
                )
            if not (0 < self.top_p <= 1):
                raise InvalidRequestError(f"top_p={self.top_p} is invalid; expected 0 < top_p <= 1")


@dataclass(frozen=True)
class GenerationRequest:
    """One request. Its soft prompt is the concatenation, in order, of the prompts named by
    `prompt_segments` (e.g. a language prompt then a task prompt), or of `task` alone.
    An empty prompt (no task, no segments) runs the frozen model unmodified."""

    tenant: str
    text: str
    task: str | None = None
    prompt_segments: tuple[str, ...] = ()
    params: GenerationParams = field(default_factory=GenerationParams)
    request_id: str = ""
    # Cut over-long input to the server's max_input_tokens instead of rejecting it.
    truncate: bool = False

    @property
    def prompt_task_ids(self) -> tuple[str, ...]:
        if self.prompt_segments:
            return tuple(self.prompt_segments)
        return (self.task,) if self.task else ()


@dataclass(frozen=True)
class PreparedRequest:
    """A request that passed validation, tokenized once, with its prompt versions resolved.

    `Engine.prepare` makes it off the event loop when the request is admitted; the batcher
    and the engine pass it on and never validate or tokenize it again."""

    request: GenerationRequest
    token_ids: tuple[int, ...]  # after truncation
    prompts: tuple[PromptMeta, ...]  # in concatenation order (language, then task)

    @property
    def tenant(self) -> str:
        return self.request.tenant

    @property
    def prompt_task_ids(self) -> tuple[str, ...]:
        return self.request.prompt_task_ids

    @property
    def params(self) -> GenerationParams:
        return self.request.params


@dataclass(frozen=True)
class PromptVersionRef:
    """Which stored prompt version a request actually used."""

    tenant: str
    task: str
    version: int


@dataclass
class GenerationResult:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    input_tokens: int
    output_tokens: int
    prompt_versions: tuple[PromptVersionRef, ...] = ()


@dataclass
class BatchStats:
    """What one engine batch did, for metrics and benchmarks."""

    batch_size: int
    distinct_tasks: int
    padding_fraction: float
    input_tokens: int
    output_tokens: int
    encode_seconds: float
    decode_seconds: float
    cache_hits: int = 0
    cache_misses: int = 0
    cache_evictions: int = 0
