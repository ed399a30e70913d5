"""The static path: whole batches decoded to completion inside Hugging Face `generate`.

It runs every batch of the `mixed` and `per_task` modes, and the beam-search requests the step
loop does not run, behind the same boundary as the step executor (`execute(StepPlan) ->
StepOutputs`, engine/plan.py). A bad request fails alone; the rest of the batch still runs.

Choice: the whole batch is encoded once (engine/encode.py); rows are then decoded in groups
that share a decoding program, with per-row parameters inside each group:
- greedy rows: one loop, per-row max_new_tokens;
- sampling rows: one loop, per-row temperature, top-k, top-p, max_new_tokens and random stream
  (PerRowSampler: each row draws from its own seed, so its tokens never depend on its
  batch-mates; the step loop samples with the same function, serving/engine/sampling.py);
- in both, each row's logits controls (PerRowControls: repetition penalty, no-repeat n-grams,
  min_new_tokens / ignore_eos, the step loop's own functions) and stop sequences (PerRowStops);
  log-probabilities come from the raw logits `generate` returns;
- beam rows: one loop per (num_beams, length_penalty, max_new_tokens and the controls), because
  a beam search's result depends on them; the controls are generate's own processors there;
- scored rows (`choices`): one teacher-forced decoder pass over every candidate of every such
  row (engine/scoring.py), no generation.
So a batch runs at most 3 + (number of distinct beam settings) decoder passes, never one per
task or per request.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from transformers import GenerationConfig, LogitsProcessor, StoppingCriteria
from transformers.generation.streamers import BaseStreamer
from transformers.modeling_outputs import BaseModelOutput

from promptmux.prompts.errors import InvalidRequestError

from .context import ModelContext
from .encode import Encoded, encode, own_failure
from .plan import Handle, StepOutputs, StepPlan, TokenStream
from .sampling import (
    SAMPLING_DTYPE, control_logits, row_seed, sample_rows, seed_words, token_logprobs, unpack_logprobs,
)
from .scoring import score_candidates
from .stop_strings import StopMatcher, aligned_tails
from .types import BatchStats, GenerationParams, PreparedRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodeGroupKey:
    strategy: str
    num_beams: int = 1
    length_penalty: float = 1.0
    # Only beam groups are keyed by length and controls (generate's own processors run them).
    max_new_tokens: int = 0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    min_new_tokens: int = 0


def group_key(prepared: PreparedRequest) -> DecodeGroupKey:
    params = prepared.params
    if prepared.choice_ids:
        return DecodeGroupKey("score")
    if params.strategy == "beam" and params.num_beams > 1:
        return DecodeGroupKey("beam", params.num_beams, params.length_penalty, params.max_new_tokens,
                              params.repetition_penalty, params.no_repeat_ngram_size, params.eos_masked_until)
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
        config.repetition_penalty = key.repetition_penalty
        config.no_repeat_ngram_size = key.no_repeat_ngram_size or None
        config.min_new_tokens = key.min_new_tokens or None
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


class PerRowControls(LogitsProcessor):
    """Each row's repetition penalty, no-repeat n-grams and EOS mask (min_new_tokens,
    ignore_eos): `sampling.control_logits`, the step loop's own function, on generate's
    decoder input ids (every row of a group has the same length here)."""

    def __init__(self, params: Sequence[GenerationParams], device: torch.device, eos_token_id: int) -> None:
        self.penalty = torch.tensor([p.repetition_penalty for p in params], dtype=SAMPLING_DTYPE).to(device)  # [Bg]
        self.ngram_sizes = torch.tensor([p.no_repeat_ngram_size for p in params], dtype=torch.long).to(device)
        self.distinct_sizes = sorted({p.no_repeat_ngram_size for p in params} - {0})
        self.eos_until = torch.tensor([p.eos_masked_until for p in params], dtype=torch.long).to(device)  # [Bg]
        self.penalize = any(p.repetition_penalty != 1.0 for p in params)
        self.eos = eos_token_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        lengths = torch.full_like(self.eos_until, input_ids.shape[1])  # [Bg]
        return control_logits(scores, input_ids, lengths, self.penalty, self.ngram_sizes, self.distinct_sizes,
                              self.eos_until, self.eos, penalize=self.penalize, owns_logits=True)


class PerRowStops(StoppingCriteria):
    """Ends each row at the token that completes one of its own stop strings (stop_strings.py),
    and records how many tokens it had then."""

    def __init__(self, params: Sequence[GenerationParams], matcher: StopMatcher, device: torch.device,
                 start_length: int) -> None:
        strings = sorted({s for p in params for s in p.stop})
        self.columns = {s: i for i, s in enumerate(strings)}
        self.member = torch.tensor([[s in p.stop for s in strings] for p in params], dtype=torch.bool).to(device)
        self.matcher, self.span = matcher, matcher.span(strings)
        self.start_length = start_length
        self.stopped_at = torch.zeros(len(params), dtype=torch.long, device=device)  # [Bg] 0: not stopped

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        lengths = torch.full_like(self.stopped_at, input_ids.shape[1])
        hit = self.matcher.hits(aligned_tails(input_ids, lengths, self.span), self.columns, self.member)  # [Bg]
        generated = input_ids.shape[1] - self.start_length
        self.stopped_at = torch.where(hit & (self.stopped_at == 0), generated, self.stopped_at)
        return hit


class PerRowSampler(LogitsProcessor):
    """Samples each row with its own temperature, top-p and random stream
    (`sampling.sample_rows`), then masks every other token: generate's greedy pick takes it.

    A row's k-th token is drawn with the uniform of (its seed, k), exactly as in the step
    loop, so a seeded request gives the same tokens alone, in any batch, on either path."""

    def __init__(self, params: Sequence[GenerationParams], seeds: Sequence[int], device: torch.device,
                 start_length: int) -> None:
        self.temperature = torch.tensor([p.temperature for p in params], dtype=SAMPLING_DTYPE).to(device)  # [Bg]
        self.top_p = torch.tensor([p.top_p for p in params], dtype=SAMPLING_DTYPE).to(device)  # [Bg]
        self.seeds = torch.tensor([seed_words(s) for s in seeds], dtype=torch.long).to(device)  # [Bg, 2]
        self.greedy = torch.zeros(len(params), dtype=torch.bool, device=device)  # [Bg]
        self.filter_top_p = any(p.top_p < 1.0 for p in params)
        self.top_k = torch.tensor([p.top_k for p in params], dtype=torch.long).to(device)  # [Bg]
        self.top_k_max = max(p.top_k for p in params)
        self.start_length = start_length  # decoder tokens before the first generated one

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        counters = torch.full_like(self.seeds[:, 0], input_ids.shape[1] - self.start_length)  # [Bg]
        tokens = sample_rows(scores, self.greedy, self.temperature, self.top_p, self.seeds, counters,
                             filter_top_p=self.filter_top_p, top_k=self.top_k, top_k_max=self.top_k_max)  # [Bg]
        chosen = torch.full_like(scores, float("-inf"))  # [Bg, V]
        return chosen.scatter(1, tokens[:, None], 0.0)


class TokenStreamer(BaseStreamer):
    """Hands each new token of each row to `on_token(row, token_id)` until the row is done.

    Only used when some request streams: it costs one host sync per decode step."""

    def __init__(self, on_token: Callable[[int, int], None], limits: list[int], eos_token_id: int,
                 stops: PerRowStops | None = None) -> None:
        self.on_token = on_token
        self.limits = limits
        self.eos = eos_token_id
        self.stops = stops  # rows it ended are done (read once per step, only when some row has stops)
        self.emitted = [0] * len(limits)
        self.done = [False] * len(limits)
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # the first call carries the decoder start tokens
            self._prompt_seen = True
            return
        stopped = self.stops.stopped_at.tolist() if self.stops is not None else None
        for row, token in enumerate(value.view(-1).tolist()):
            if self.done[row] or (stopped is not None and stopped[row]):
                continue
            self.on_token(row, token)
            self.emitted[row] += 1
            self.done[row] = token == self.eos or self.emitted[row] >= self.limits[row]

    def end(self) -> None:
        pass


class StaticExecutor:
    """Runs a plan's `static` batch to completion; the executor of the `mixed` and `per_task`
    modes, and the step executor's path for beam search. Any thread, one call at a time."""

    slots = 0  # holds no request between calls

    def __init__(self, context: ModelContext) -> None:
        self.context = context

    def execute(self, plan: StepPlan, stream: TokenStream | None = None) -> StepOutputs:
        if plan.admit or plan.cancel or plan.run_first:
            raise ValueError(
                "the static executor runs whole batches only (plan.static); admissions, cancellations and "
                "decoder steps need the step executor (serving.batching: continuous)"
            )
        return self.run(plan.static, stream)

    @torch.inference_mode()
    def run(self, items: Sequence[tuple[Handle, PreparedRequest]], stream: TokenStream | None = None) -> StepOutputs:
        """Encode the batch once, decode it in groups (see the module docstring). Every request
        ends in `finished` or `errors`; `stream` gets each row's tokens as they come."""
        config = self.context.config
        if len(items) > config.max_batch_size:
            raise InvalidRequestError(
                f"batch of {len(items)} requests exceeds engine.max_batch_size={config.max_batch_size}; split it"
            )
        outputs = StepOutputs(static=BatchStats(0, 0, 0.0, 0, 0, 0.0, 0.0))
        if not items:
            return outputs
        started = time.perf_counter()
        encoded, failed = encode(self.context, [prepared for _, prepared in items])
        for position, error in failed.items():
            outputs.errors[items[position][0]] = error
        if encoded is None:
            return outputs
        encode_seconds = time.perf_counter() - started
        rows = [items[position] for position in encoded.rows]  # row j of `encoded` holds rows[j]
        groups: dict[DecodeGroupKey, list[int]] = {}
        for j, (_, prepared) in enumerate(rows):
            groups.setdefault(group_key(prepared), []).append(j)
        streamed: set[Handle] = set()  # rows that already streamed tokens
        tracked = None
        if stream is not None:
            def tracked(handle: Handle, token: int) -> None:
                streamed.add(handle)
                stream(handle, token)
        produced = 0
        for key, group in groups.items():
            try:
                produced += self._decode_group(key, group, encoded, rows, outputs, tracked)
            except Exception as error:  # e.g. one row's scores not finite: sampling raises for the group
                produced += self._decode_rows_alone(key, group, encoded, rows, outputs, tracked, error, streamed)
        tasks = {(m.tenant, m.task) for _, p in rows for m in p.prompts}
        outputs.static = BatchStats(
            batch_size=len(rows),
            distinct_tasks=len(tasks),
            padding_fraction=encoded.padding_fraction,
            input_tokens=sum(len(p.token_ids) for _, p in rows),
            output_tokens=produced,
            encode_seconds=encode_seconds,
            decode_seconds=time.perf_counter() - started - encode_seconds,
            cache_hits=encoded.cache_hits,
            cache_misses=encoded.cache_misses,
            cache_evictions=encoded.cache_evictions,
        )
        return outputs

    def _decode_rows_alone(self, key, group, encoded, rows, outputs, stream, error: Exception,
                           streamed: set[Handle]) -> int:
        """A decoding group failed: decode each of its rows alone, so that a failure belonging
        to one row fails that row only. Rows that already streamed tokens cannot restart
        without repeating them, so they fail with the group's error."""
        log.warning("a decoding group of %d rows failed (%s: %s); decoding its rows one by one",
                    len(group), type(error).__name__, error)
        produced = 0
        for j in group:
            handle = rows[j][0]
            if handle in streamed or len(group) == 1:
                outputs.errors[handle] = own_failure(error, "decoding")
                continue
            try:
                produced += self._decode_group(key, [j], encoded, rows, outputs, stream)
            except Exception as row_error:
                outputs.errors[handle] = own_failure(row_error, "decoding")
        return produced

    def _decode_group(self, key: DecodeGroupKey, group: list[int], encoded: Encoded,
                      rows: list[tuple[Handle, PreparedRequest]], outputs: StepOutputs,
                      stream: TokenStream | None) -> int:
        context = self.context
        handles = [rows[j][0] for j in group]
        prepared = [rows[j][1] for j in group]
        params = [p.params for p in prepared]
        width = max(encoded.lengths[j] for j in group)  # drop columns that are padding for every row
        select = torch.tensor(group, device=encoded.hidden.device)
        hidden = encoded.hidden.index_select(0, select)[:, :width]  # [Bg, Sg, D]
        mask = encoded.attention_mask.index_select(0, select.to(encoded.attention_mask.device))[:, :width]  # [Bg, Sg]
        if key.strategy == "score":
            return self._score_group(handles, prepared, hidden, mask, outputs)
        config = generation_config(key, params, context.model.generation_config)
        kwargs: dict = {}
        processors: list[LogitsProcessor] = []
        stops = None
        if key.strategy != "beam":
            limits = torch.tensor([p.max_new_tokens for p in params], device=hidden.device)
            kwargs["stopping_criteria"] = [PerRowMaxNewTokens(limits, start_length=1)]
            if any(p.uses_controls for p in params):
                processors.append(PerRowControls(params, hidden.device, context.eos_token_id))
            if any(p.stop for p in params):
                stops = PerRowStops(params, context.stops, hidden.device, start_length=1)
                kwargs["stopping_criteria"].append(stops)
        if key.strategy == "sample":
            # Each row its own random stream: a seeded row no longer depends on its batch-mates.
            seeds = [row_seed(p) for p in params]
            processors.append(PerRowSampler(params, seeds, hidden.device, start_length=1))
        if processors:
            kwargs["logits_processor"] = processors
        if stream is not None and key.strategy != "beam":
            kwargs["streamer"] = TokenStreamer(
                lambda row, token: stream(handles[row], token), [p.max_new_tokens for p in params],
                context.eos_token_id, stops,
            )
        want_logprobs = [p.logprobs for p in params if p.logprobs is not None]
        config.return_dict_in_generate = config.output_logits = bool(want_logprobs)
        output = context.model.generate(
            encoder_outputs=BaseModelOutput(last_hidden_state=hidden),
            attention_mask=mask,
            generation_config=config,
            **kwargs,
        )
        sequences = output.sequences if want_logprobs else output
        logprob_rows = None
        if want_logprobs:
            chosen = sequences[:, 1 : 1 + len(output.logits)]  # [Bg, steps]
            logprob_rows = torch.stack([
                token_logprobs(logits, chosen[:, step], max(want_logprobs))
                for step, logits in enumerate(output.logits)  # one vectorised call per step of the group
            ], dim=1).tolist()  # [Bg, steps, 1 + 2k]
        stopped_at = stops.stopped_at.tolist() if stops is not None else [0] * len(group)
        generated = sequences[:, 1:].tolist()  # drop the decoder start token; one host sync per group
        produced = 0
        eos = context.eos_token_id
        for row, (handle, item, tokens) in enumerate(zip(handles, prepared, generated)):
            tokens = tokens[: item.params.max_new_tokens]
            finish = "length"
            end = tokens.index(eos) + 1 if eos in tokens else len(tokens)
            if stopped_at[row] and stopped_at[row] <= end:
                tokens, finish = tokens[: stopped_at[row]], "stop"
            elif eos in tokens:
                tokens, finish = tokens[:end], "eos"
            produced += len(tokens)
            logprobs = None
            if item.params.logprobs is not None:
                logprobs = [unpack_logprobs(token, values, item.params.logprobs)
                            for token, values in zip(tokens, logprob_rows[row])]
            outputs.finished[handle] = context.result(item, tokens, finish, logprobs)
            if stream is not None and key.strategy == "beam":
                for token in tokens:
                    stream(handle, token)
        return produced

    def _score_group(self, handles: list[Handle], prepared: list[PreparedRequest], hidden: torch.Tensor,
                     mask: torch.Tensor, outputs: StepOutputs) -> int:
        """Scored rows: every candidate's log-likelihood in one teacher-forced decoder pass; each
        row's result is its most likely candidate. Produces no tokens."""
        scores = score_candidates(self.context, hidden, mask, [p.choice_ids for p in prepared])
        for handle, item, row in zip(handles, prepared, scores):
            best = max(range(len(row)), key=row.__getitem__)
            outputs.finished[handle] = self.context.result(
                item, list(item.choice_ids[best]), "choice", choice_logprobs=tuple(row), choice=best
            )
        return 0

