"""The step executor: T5 decoding one step at a time over a fixed set of slots.

Where the static path (engine/static_decoding.py) runs a batch to completion inside Hugging
Face `generate`, this executor makes the decode *step* the unit. The scheduler sends one
StepPlan per engine call (engine/plan.py) and gets one StepOutputs back; in between it may
admit newcomers into free slots or cancel requests, and each step advances the active rows by
one token. A request that reaches EOS or its own `max_new_tokens` leaves its slot in that same
step.

- Admission: ONE encoder forward for the newcomers alone (engine/encode.py: their prompts
  leased from the bank, the fused `[prompt; input]` op and its mask), then each decoder layer's
  cross-attention K/V of their encoder output go into free slots (slot_cache.py). A slot never
  reads the bank again: its cross K/V are its own copy.
- A step: one decoder forward over the active rows (t5_step.py, the model's own weights and
  modules, a per-row position bias), then every row's logits controls at once while some row
  uses them (engine/sampling.py's `control_logits`: repetition penalty, no-repeat n-grams, EOS
  masked before min_new_tokens, each row with its own values from the slot cache), then every
  row's next token (greedy, or temperature/top-k/top-p with the row's own counter-based random
  stream), the stop sequences and log-probabilities of the rows that asked, and one host sync
  to hand all of it back.
- Isolation: a request whose prompt cannot be leased (deleted, unreadable, larger than the
  bank) or that the step loop does not run (beam search) fails alone at admission; the others
  are admitted and decode exactly as they would alone. Beam search arrives in `plan.static`
  and runs on the static path, between steps.

Requests arrive prepared and validated once (Engine.prepare): nothing here checks them again.
Not thread-safe: one thread (the scheduler's engine thread) calls `execute`.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch

from promptmux.prompts.errors import InvalidRequestError, ModelLoadError, PromptmuxError

from ..context import ModelContext
from ..encode import encode
from ..plan import AdmissionStats, DecodeStats, Handle, StepOutputs, StepPlan, TokenStream
from ..sampling import (
    SAMPLING_DTYPE, control_logits, row_seed, sample_rows, seed_words, token_logprobs, unpack_logprobs,
)
from ..static_decoding import StaticExecutor
from ..stop_strings import aligned_tails
from ..types import MAX_STOP_SEQUENCES, PreparedRequest, TokenLogprob
from .decode_graphs import make_runner, resolve_decode_graphs
from .slot_cache import SlotCache
from .t5_step import T5DecoderStep


@dataclass
class _Active:
    """Host-side state of one request in a slot (its device state lives in the SlotCache)."""

    handle: Handle
    prepared: PreparedRequest
    sampling: bool
    nucleus: bool  # sampling with top_p < 1
    tokens: list[int] = field(default_factory=list)  # produced so far; len() is its decode position
    logprobs: list[TokenLogprob] | None = None  # per token, when the request asked for them


class _Produced(NamedTuple):
    """What one step hands back to the host, in one sync."""

    tokens: list[int]  # [n]
    stopped: list[bool] | None  # [n] a stop sequence completed (None: no row has one)
    logprobs: list[list[float]] | None  # [n, 1 + 2k] token_logprobs rows (None: no row asked)


class _Controls:
    """Host-side counts of what the active rows ask for, so a step does only the work some row
    needs, and the stop strings' columns in the slot cache's membership mask."""

    def __init__(self, columns: int) -> None:
        self.controlled = 0  # rows with any logits control (their history is kept)
        self.penalized = 0  # rows with repetition_penalty != 1
        self.ngram_sizes: Counter = Counter()  # no_repeat_ngram_size > 0 -> rows
        self.top_k: Counter = Counter()  # sampling rows' top_k > 0 -> rows
        self.logprobs: Counter = Counter()  # logprobs k -> rows
        self.stop_columns: dict[str, int] = {}  # stop string -> its column in SlotCache.stop_member
        self._stop_rows: Counter = Counter()
        self._free_columns = list(range(columns - 1, -1, -1))

    def add(self, prepared: PreparedRequest, sign: int = 1) -> None:
        params = prepared.params
        if params.uses_controls:
            self.controlled += sign
        if params.repetition_penalty != 1.0:
            self.penalized += sign
        for counter, value in ((self.ngram_sizes, params.no_repeat_ngram_size),
                               (self.top_k, params.top_k if params.strategy == "sample" else 0)):
            if value:
                counter[value] += sign
                if not counter[value]:
                    del counter[value]
        if params.logprobs is not None:
            self.logprobs[params.logprobs] += sign
            if not self.logprobs[params.logprobs]:
                del self.logprobs[params.logprobs]
        for stop in params.stop:
            if sign > 0 and stop not in self.stop_columns:
                self.stop_columns[stop] = self._free_columns.pop()
            self._stop_rows[stop] += sign
            if not self._stop_rows[stop]:
                del self._stop_rows[stop]
                self._free_columns.append(self.stop_columns.pop(stop))

    def member_row(self, prepared: PreparedRequest, columns: int) -> list[bool]:
        row = [False] * columns
        for stop in prepared.params.stop:
            row[self.stop_columns[stop]] = True
        return row


class StepExecutor:
    """Iteration-level batching over `slots` (engine.max_batch_size) rows."""

    def __init__(self, context: ModelContext) -> None:
        self.context = context
        model, config = context.model, context.config
        devices = {p.device for p in model.decoder.parameters()} | {model.lm_head.weight.device}
        if len(devices) != 1:
            raise ModelLoadError(
                f"the step loop runs the decoder on one device, but this model's decoder spans "
                f"{sorted(map(str, devices))}; load it on one device or use the static path "
                "(serving.batching: mixed)"
            )
        self.device = devices.pop()
        self.decoder = T5DecoderStep(model, config.max_new_tokens_limit)
        self.cache = SlotCache(
            slots=config.max_batch_size,
            layers=self.decoder.layers,
            heads=self.decoder.heads,
            d_kv=self.decoder.d_kv,
            max_positions=config.max_new_tokens_limit,
            dtype=self.decoder.dtype,
            device=self.device,
            stop_columns=config.max_batch_size * MAX_STOP_SEQUENCES,
        )
        self.slots = self.cache.slots
        self.decode_graphs = resolve_decode_graphs(config.decode_graphs, self.device)
        self._runner = make_runner(self.decode_graphs, self.decoder, self.cache)
        self.static = StaticExecutor(context)  # beam search, between steps
        self._rows: list[_Active] = []  # row i of the cache holds self._rows[i]
        self._row_of: dict[Handle, int] = {}
        self._prompts: Counter = Counter()  # (tenant, prompt ids) -> active rows: distinct tasks per step
        self._controls = _Controls(self.cache.stop_member.shape[1])

    @property
    def active_slots(self) -> int:
        return len(self._rows)

    # ------------------------------------------------------------------ one engine call
    @torch.inference_mode()
    def execute(self, plan: StepPlan, stream: TokenStream | None = None) -> StepOutputs:
        """Cancellations, the static batch, admissions, then one decoder step (engine/plan.py)."""
        outputs = StepOutputs()
        if plan.cancel:
            self._free([self._row_of[h] for h in dict.fromkeys(plan.cancel) if h in self._row_of])
        if plan.static:
            static = self.static.run(plan.static, stream)
            outputs.finished.update(static.finished)
            outputs.errors.update(static.errors)
            outputs.static = static.static
        if plan.admit:
            self._admit(plan.admit, outputs)
        if self._rows:
            if plan.run_first:
                self._put_first([h for h in plan.run_first if h in self._row_of])
            self._step(plan.row_limit, outputs)
        outputs.active_slots = len(self._rows)
        return outputs

    # ------------------------------------------------------------------ admission
    def _admit(self, items: Sequence[tuple[Handle, PreparedRequest]], outputs: StepOutputs) -> None:
        """One encoder forward for these requests only; their cross-attention K/V go into free
        slots. A request that fails here fails alone; the others are admitted."""
        started = time.perf_counter()
        accepted: list[tuple[Handle, PreparedRequest]] = []
        for handle, prepared in items:
            error = self._refusal(handle, prepared, len(accepted))
            if error is not None:
                outputs.errors[handle] = error
            else:
                accepted.append((handle, prepared))
        if not accepted:
            return
        try:
            encoded, failed = encode(self.context, [prepared for _, prepared in accepted])
        except RuntimeError as error:  # e.g. out of memory: these requests fail, the slots stay sound
            for handle, _ in accepted:
                outputs.errors[handle] = PromptmuxError(f"the encoder forward for this admission failed: {error}")
            return
        for position, error in failed.items():
            outputs.errors[accepted[position][0]] = error
        if encoded is None:
            return
        admitted = [accepted[position] for position in encoded.rows]
        cache = self.cache
        hidden = encoded.hidden.to(self.device)  # [B, S, D]
        cross_k, cross_v = self.decoder.project_cross(hidden)  # L x [B, H, S, d]
        start = len(self._rows)
        if cache.ensure_cross_width(max(encoded.lengths), live_rows=start):
            self._runner.reset()
        params = [p.params for _, p in admitted]
        seeds = [seed_words(row_seed(q)) if q.strategy == "sample" else (0, 0) for q in params]
        # One host-to-device copy per field for the whole admission.
        cache.admit_rows(
            start,
            cross_k,
            cross_v,
            encoder_lengths=torch.tensor(encoded.lengths, dtype=torch.long).to(self.device, non_blocking=True),
            decoder_start_token=self.context.decoder_start_token_id,
            greedy=torch.tensor([q.strategy != "sample" for q in params]).to(self.device, non_blocking=True),
            temperature=torch.tensor(
                [q.temperature if q.strategy == "sample" else 1.0 for q in params], dtype=SAMPLING_DTYPE
            ).to(self.device, non_blocking=True),
            top_p=torch.tensor(
                [q.top_p if q.strategy == "sample" else 1.0 for q in params], dtype=SAMPLING_DTYPE
            ).to(self.device, non_blocking=True),
            seeds=torch.tensor(seeds, dtype=torch.long).to(self.device, non_blocking=True),
        )
        controls = self._controls
        for _, prepared in admitted:
            controls.add(prepared)
        self._admit_controls(start, [p for _, p in admitted])
        for handle, prepared in admitted:
            sampling = prepared.params.strategy == "sample"
            self._row_of[handle] = len(self._rows)
            self._rows.append(_Active(handle, prepared, sampling, sampling and prepared.params.top_p < 1.0,
                                      logprobs=None if prepared.params.logprobs is None else []))
            self._prompts[(prepared.tenant, prepared.prompt_task_ids)] += 1
        outputs.admission = AdmissionStats(
            admitted=len(admitted),
            encoder_tokens=sum(encoded.lengths),
            padding_fraction=encoded.padding_fraction,
            seconds=time.perf_counter() - started,
        )

    def _admit_controls(self, start: int, admitted: list[PreparedRequest]) -> None:
        """The admitted rows' logits controls into the slot cache: one copy per field."""
        params = [p.params for p in admitted]
        columns = self.cache.stop_member.shape[1]

        def put(values, dtype):
            return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

        self.cache.admit_controls(
            start,
            self.context.decoder_start_token_id,
            top_k=put([q.top_k if q.strategy == "sample" else 0 for q in params], torch.long),
            repetition_penalty=put([q.repetition_penalty for q in params], SAMPLING_DTYPE),
            ngram_size=put([q.no_repeat_ngram_size for q in params], torch.long),
            eos_until=put([q.eos_masked_until for q in params], torch.long),
            stop_member=put([self._controls.member_row(p, columns) for p in admitted], torch.bool),
        )

    def _refusal(self, handle: Handle, prepared: PreparedRequest, accepted: int) -> PromptmuxError | None:
        """Why this request cannot take a slot now, if it cannot: a scheduler's mistake, never
        the request's parameters (those were validated once, at prepare)."""
        if handle in self._row_of:
            return InvalidRequestError(f"handle {handle!r} is already admitted; give every request its own handle")
        if not prepared.steppable:
            return InvalidRequestError(
                f"beam search (num_beams={prepared.params.num_beams}) does not run in the step loop; "
                "plan it in StepPlan.static (PreparedRequest.steppable tells which requests go there)"
            )
        if len(self._rows) + accepted >= self.cache.slots:
            return InvalidRequestError(
                f"no free slot: all {self.cache.slots} are taken; plan at most the free slots' worth of admissions"
            )
        return None

    # ------------------------------------------------------------------ decoding
    def _step(self, limit: int | None, outputs: StepOutputs) -> None:
        """One decoder forward for the first `limit` active rows (every row when None); each row
        samples with its own parameters and generator; rows that hit EOS or their own
        max_new_tokens are freed at once. A failed forward fails every row that was stepping."""
        started = time.perf_counter()
        # A waiting row inside a padded CUDA-graph shape computes too: its output is ignored,
        # and its one write, K/V at its own current position, is rewritten by its next real
        # step before anything reads it.
        rows = self._rows if limit is None else self._rows[:limit]
        n = len(rows)
        try:
            produced = self._forward(rows)
        except Exception as error:
            failure = error if isinstance(error, PromptmuxError) else PromptmuxError(
                f"the engine failed while decoding {n} requests: {type(error).__name__}: {error}"
            )
            for row in rows:
                outputs.errors[row.handle] = failure
            self._free(list(range(n)))
            return
        eos = self.context.eos_token_id
        finished: list[int] = []
        stopped, logprobs = produced.stopped, produced.logprobs
        for index, (row, token) in enumerate(zip(rows, produced.tokens)):
            row.tokens.append(token)
            if row.logprobs is not None:
                row.logprobs.append(unpack_logprobs(token, logprobs[index], row.prepared.params.logprobs))
            if token == eos:
                finish = "eos"
            elif stopped is not None and stopped[index]:
                finish = "stop"
            elif len(row.tokens) >= row.prepared.params.max_new_tokens:
                finish = "length"
            else:
                continue
            outputs.finished[row.handle] = self.context.result(row.prepared, list(row.tokens), finish, row.logprobs)
            finished.append(index)
        outputs.stepped = [row.handle for row in rows]
        outputs.tokens = produced.tokens
        outputs.decode = DecodeStats(rows=n, waiting=len(self._rows) - n, distinct_tasks=len(self._prompts),
                                     seconds=0.0)
        self._free(finished)
        outputs.decode.seconds = time.perf_counter() - started

    def _forward(self, rows: list[_Active]) -> _Produced:
        """The next token of each of `rows` (the first len(rows) slots), with the stop flags
        and log-probabilities of the rows that asked."""
        n, cache, controls = len(rows), self.cache, self._controls
        columns = max(len(r.tokens) for r in rows) + 1  # self-attention columns any row reads
        width = max(r.prepared.encoder_tokens for r in rows)  # encoder columns any row reads
        logits = self._runner(n, columns, width)  # [n, V]
        scores = logits
        if controls.controlled:
            lengths = cache.positions[:n] + 1  # [n] valid history columns: the start token and the output
            scores = control_logits(
                logits, cache.history[:n, :columns], lengths, cache.repetition_penalty[:n], cache.ngram_size[:n],
                sorted(controls.ngram_sizes), cache.eos_until[:n], self.context.eos_token_id,
                penalize=controls.penalized > 0, owns_logits=not controls.logprobs,  # logprobs read the raw logits
            )  # [n, V] float32
        if any(r.sampling for r in rows):
            next_tokens = sample_rows(
                scores, cache.greedy[:n], cache.temperature[:n], cache.top_p[:n], cache.seeds[:n],
                cache.positions[:n], filter_top_p=any(r.nucleus for r in rows),
                top_k=cache.top_k[:n] if controls.top_k else None, top_k_max=max(controls.top_k, default=0),
            )  # [n]
        else:
            next_tokens = scores.argmax(dim=-1)  # [n]
        extras: list[torch.Tensor] = []
        if controls.controlled:
            cache.history[:n].scatter_(1, lengths[:, None], next_tokens[:, None])
            if controls.stop_columns:
                stops = self.context.stops
                tails = aligned_tails(cache.history[:n, : columns + 1], lengths + 1,
                                      stops.span(list(controls.stop_columns)))  # [n, M]
                extras.append(stops.hits(tails, controls.stop_columns, cache.stop_member[:n])[:, None].double())
        if controls.logprobs:
            extras.append(token_logprobs(logits, next_tokens, max(controls.logprobs)))  # [n, 1 + 2k]
        cache.tokens[:n] = next_tokens
        cache.positions[:n] += 1
        if not extras:
            return _Produced(next_tokens.tolist(), None, None)  # the step's one host sync
        packed = torch.cat([next_tokens[:, None].double(), *extras], dim=1).tolist()  # the step's one host sync
        tokens = [int(row[0]) for row in packed]
        stopped = [row[1] > 0 for row in packed] if controls.stop_columns else None
        first = 2 if controls.stop_columns else 1
        logprobs = [row[first:] for row in packed] if controls.logprobs else None
        return _Produced(tokens, stopped, logprobs)

    def _put_first(self, handles: Sequence[Handle]) -> None:
        """Move these requests into the lowest slots, [0, len(handles)), so a step limited to
        at least len(handles) rows advances them: each one outside swaps with a row inside
        that is not among them (one batched copy per buffer, of the swapped rows only)."""
        wanted = {self._row_of[handle] for handle in handles}
        count = len(wanted)
        outside = sorted(i for i in wanted if i >= count)
        if not outside:
            return
        inside = [i for i in range(count) if i not in wanted][: len(outside)]
        columns = max(len(r.tokens) for r in self._rows) + 1
        width = max(r.prepared.encoder_tokens for r in self._rows)
        # The source rows are gathered before any is written, so this swaps.
        self.cache.move_rows(outside + inside, inside + outside, positions=columns, width=width)
        for a, b in zip(outside, inside):
            self._rows[a], self._rows[b] = self._rows[b], self._rows[a]
            self._row_of[self._rows[a].handle] = a
            self._row_of[self._rows[b].handle] = b

    # ------------------------------------------------------------------ slots
    def _free(self, indices: list[int]) -> None:
        """Free rows `indices`, keeping the active rows compact: the last live rows move
        into the holes below the new row count (one batched copy per buffer)."""
        if not indices:
            return
        old = len(self._rows)
        gone = set(indices)
        new = old - len(gone)
        holes = sorted(i for i in gone if i < new)
        movers = [j for j in range(new, old) if j not in gone]
        for row in (self._rows[i] for i in gone):
            del self._row_of[row.handle]
            self._controls.add(row.prepared, -1)
            key = (row.prepared.tenant, row.prepared.prompt_task_ids)
            self._prompts[key] -= 1
            if not self._prompts[key]:
                del self._prompts[key]
        if holes:
            live = [r for i, r in enumerate(self._rows) if i not in gone]
            columns = max(len(r.tokens) for r in live) + 1
            width = max(r.prepared.encoder_tokens for r in live)
            self.cache.move_rows(holes, movers, positions=columns, width=width)
            for hole, mover in zip(holes, movers):
                self._rows[hole] = self._rows[mover]
                self._row_of[self._rows[hole].handle] = hole
        del self._rows[new:]
        self.cache.clear_rows(new, old)

