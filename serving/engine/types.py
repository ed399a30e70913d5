"""Typed requests and results of the engine: the plain-Python contract every edge
(CLI, Ray Serve, gRPC, benchmarks) converts to and from."""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Literal

from promptmux.prompts.records import PromptMeta

from promptmux.prompts.errors import InvalidRequestError

Strategy = Literal["greedy", "beam", "sample"]
STRATEGIES: tuple[Strategy, ...] = ("greedy", "beam", "sample")
# eos: the model ended; length: max_new_tokens; stop: a stop sequence appeared (cut from the
# text); choice: a scored request (`GenerationRequest.choices`) returns its best candidate.
FinishReason = Literal["eos", "length", "stop", "choice"]


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
    # Per-row logits controls, as Hugging Face `generate` names them (0 / 1.0 / empty: off).
    # top_k applies to sampling rows only, like temperature and top_p.
    top_k: int = 0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    min_new_tokens: int = 0  # EOS is masked until the row has this many tokens
    ignore_eos: bool = False  # EOS always masked: the row runs to max_new_tokens (benchmarks)
    stop: tuple[str, ...] = ()  # the row ends when its text contains one; the text is cut before it
    logprobs: int | None = None  # None: none; k: each token's log-probability and the k most likely

    @property
    def eos_masked_until(self) -> int:
        """Tokens a row produces before EOS may be chosen (min_new_tokens, or every token)."""
        return self.max_new_tokens if self.ignore_eos else self.min_new_tokens

    @property
    def uses_controls(self) -> bool:
        """Whether a step must process this row's logits beyond sampling."""
        return (self.repetition_penalty != 1.0 or self.no_repeat_ngram_size > 0 or self.eos_masked_until > 0
                or bool(self.stop))

    def validate(self, max_new_tokens_limit: int) -> None:
        """Check every field in the type and dtype it is computed in.

        Temperature, top-p and the length penalty are applied to float32 scores, so a value
        that passes a float64 check (temperature=1e-300 is > 0) but becomes 0, a subnormal or
        inf in float32 would turn its row's scores into inf or NaN. Such values are refused
        here, so they can never reach a batch shared with other requests."""
        _check_int("max_new_tokens", self.max_new_tokens, 1, max_new_tokens_limit,
                   "(the server's max_new_tokens_limit)")
        if self.strategy not in STRATEGIES:  # the one strategy check, for every edge (gRPC, CLI, engine callers)
            raise InvalidRequestError(
                f"unknown decoding strategy {self.strategy!r}; expected 'greedy', 'beam' or 'sample' "
                "(gRPC: GREEDY, BEAM or SAMPLE)"
            )
        if self.strategy == "beam":
            _check_int("num_beams", self.num_beams, 1, MAX_BEAMS, "")
            bound = max_length_penalty(max_new_tokens_limit)
            value = _float32("length_penalty", self.length_penalty)
            if abs(value) > bound:
                raise InvalidRequestError(
                    f"length_penalty={self.length_penalty} is out of range; expected |length_penalty| <= "
                    f"{bound:.1f}, so that length ** length_penalty stays a finite, non-zero float32 for outputs "
                    f"of up to max_new_tokens_limit={max_new_tokens_limit} tokens (1.0 is neutral)"
                )
        if self.strategy == "sample":
            value = _float32("temperature", self.temperature)
            if not MIN_TEMPERATURE <= value <= MAX_TEMPERATURE:
                raise InvalidRequestError(
                    f"temperature={self.temperature} is invalid; expected a finite value in "
                    f"[{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}] (scores are divided by it in float32: below "
                    "the range they overflow, above it sampling is uniform noise; use strategy='greedy' for "
                    "deterministic output)"
                )
            value = _float32("top_p", self.top_p)
            if not FLOAT32_TINY <= value <= 1:
                raise InvalidRequestError(
                    f"top_p={self.top_p} is invalid; expected {FLOAT32_TINY:.4g} <= top_p <= 1 (it is compared in "
                    "float32, where smaller values are 0 or subnormal); a tiny top_p keeps only the most likely "
                    "token"
                )
            if self.seed is not None:
                _check_int("seed", self.seed, MIN_SEED, MAX_SEED, "(a 64-bit integer)")
            _check_int("top_k", self.top_k, 0, MAX_TOP_K, "(0: off; values above the vocabulary keep every token)")
        self._validate_controls()

    def _validate_controls(self) -> None:
        _check_int("min_new_tokens", self.min_new_tokens, 0, self.max_new_tokens, "(at most max_new_tokens)")
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequestError(f"ignore_eos={self.ignore_eos!r} is not a boolean; expected true or false")
        value = _float32("repetition_penalty", self.repetition_penalty)
        if not MIN_PENALTY <= value <= MAX_PENALTY:
            raise InvalidRequestError(
                f"repetition_penalty={self.repetition_penalty} is invalid; expected a value in [{MIN_PENALTY:g}, "
                f"{MAX_PENALTY:g}] (1.0: off; above 1 discourages tokens already in the output, as in Hugging Face "
                "generate)"
            )
        _check_int("no_repeat_ngram_size", self.no_repeat_ngram_size, 0, MAX_NGRAM,
                   "(0: off; n forbids repeating any n-gram of the output)")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) for s in self.stop):
            raise InvalidRequestError(f"stop={self.stop!r} is invalid; expected a list of strings")
        if len(self.stop) > MAX_STOP_SEQUENCES:
            raise InvalidRequestError(
                f"stop has {len(self.stop)} sequences; expected at most {MAX_STOP_SEQUENCES}"
            )
        for sequence in self.stop:
            size = len(sequence.encode("utf-8", "surrogatepass"))
            if not sequence or size > MAX_STOP_BYTES:
                raise InvalidRequestError(
                    f"stop sequence {sequence[:40]!r} is {size} bytes; expected 1..{MAX_STOP_BYTES} UTF-8 bytes"
                )
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0, MAX_LOGPROBS,
                       "(0: the chosen token's log-probability only; k: also the k most likely tokens)")
            if self.strategy == "beam" and self.num_beams > 1:
                raise InvalidRequestError(
                    "logprobs is not available with beam search; use strategy greedy or sample, or leave logprobs unset"
                )


# Decoding arithmetic runs in float32: the bounds below keep every value normal and finite there.
FLOAT32_TINY = 1.1754943508222875e-38  # smallest normal float32
FLOAT32_MAX = 3.4028234663852886e38
MIN_TEMPERATURE = 1e-4
MAX_TEMPERATURE = 1e4
MAX_BEAMS = 16
MAX_TOP_K = 1 << 20
MIN_PENALTY, MAX_PENALTY = 1e-4, 1e4
MAX_NGRAM = 1024
MAX_STOP_SEQUENCES = 4  # as OpenAI's `stop`
MAX_STOP_BYTES = 256
MAX_LOGPROBS = 20
MAX_CHOICES = 64  # candidates of one scored request
MIN_SEED, MAX_SEED = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts


def max_length_penalty(max_new_tokens_limit: int) -> float:
    """Largest |length_penalty| for which length ** length_penalty is a finite, normal float32
    for every output length up to the limit (plus the decoder start token)."""
    return math.log(FLOAT32_MAX) / math.log(max(max_new_tokens_limit + 1, 2)) * 0.99


def _check_int(name: str, value, low: int, high: int, why: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"{name}={value!r} is not an integer; expected {low}..{high} {why}".rstrip())
    if not low <= value <= high:
        raise InvalidRequestError(f"{name}={value} is out of range; expected {low}..{high} {why}".rstrip())


def _float32(name: str, value) -> float:
    """`value` as the float32 the decoding arithmetic will see; refuses non-numbers and
    values that are not finite in float32."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequestError(f"{name}={value!r} is not a number; expected a finite number")
    if not math.isfinite(value) or abs(value) > FLOAT32_MAX:
        raise InvalidRequestError(f"{name}={value} is invalid; expected a finite number (float32: |x| <= {FLOAT32_MAX:.4g})")
    return struct.unpack("<f", struct.pack("<f", value))[0]


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
    # Scoring instead of generation: each candidate's log-likelihood given the input (teacher
    # forced, its EOS included); the result's text is the most likely candidate.
    choices: tuple[str, ...] = ()

    @property
    def prompt_task_ids(self) -> tuple[str, ...]:
        if self.prompt_segments:
            return tuple(self.prompt_segments)
        return (self.task,) if self.task else ()


@dataclass(frozen=True)
class PreparedRequest:
    """A request that passed validation, tokenized once, with its prompt versions resolved.

    `Engine.prepare` makes it off the event loop when the request is admitted; the schedulers
    and the executors pass it on and never validate or tokenize it again. What they need to
    know about it is a field, derived once here from the three given ones."""

    request: GenerationRequest
    token_ids: tuple[int, ...]  # after truncation
    prompts: tuple[PromptMeta, ...]  # in concatenation order (language, then task)
    choice_ids: tuple[tuple[int, ...], ...] = ()  # each candidate's tokens, EOS included (scored requests)
    tenant: str = field(init=False)
    params: GenerationParams = field(init=False)
    prompt_task_ids: tuple[str, ...] = field(init=False)  # the task references as the caller named them
    encoder_tokens: int = field(init=False)  # prompt rows + input tokens: what its admission costs the encoder
    # Runs in the step loop; False for beam search and scoring (the static path runs them, in
    # StepPlan.static, between steps).
    steppable: bool = field(init=False)

    def __post_init__(self) -> None:
        request, params = self.request, self.request.params
        derived = {
            "tenant": request.tenant,
            "params": params,
            "prompt_task_ids": request.prompt_task_ids,
            "encoder_tokens": sum(m.length for m in self.prompts) + len(self.token_ids),
            "steppable": not (params.strategy == "beam" and params.num_beams > 1) and not self.choice_ids,
        }
        for name, value in derived.items():
            object.__setattr__(self, name, value)


@dataclass(frozen=True)
class PromptVersionRef:
    """Which stored prompt version a request actually used."""

    tenant: str
    task: str
    version: int


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability under the model (log-softmax of its raw logits,
    before any sampling control), and the most likely tokens at that step."""

    token_id: int
    logprob: float
    top: tuple["TokenLogprob", ...] = ()  # the most likely tokens, most likely first (their own top empty)
    text: str = ""  # the token's text (filled in by ModelContext.result)


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
    logprobs: tuple[TokenLogprob, ...] | None = None  # per token, when params.logprobs was set
    # Scored requests: each candidate's log-likelihood, in the request's order; `text` is the best.
    choice_logprobs: tuple[float, ...] = ()


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
