"""Iteration-level batching: T5 decoding one step at a time over a fixed set of slots.

Where `Engine.run_batch` runs a batch to completion inside Hugging Face `generate`, the
StepEngine makes the decode *step* the unit. Between two steps the caller (the step
scheduler) may admit newcomers into free slots or cancel requests; each step advances every
active request by one token, and a request that reaches EOS or its own `max_new_tokens`
leaves its slot in that same step.

- Admission (`admit`): the newcomers' prompts are leased from the engine's PromptBank, ONE
  encoder forward runs for them alone (the fused `[prompt; input]` op and its mask,
  kernels/prompt_concat.py), and each decoder layer's cross-attention K/V of their encoder
  output go into free slots (serving/engine/step/slot_cache.py). The prompt leases are released right
  after that encoder forward: a slot never reads the bank again (its cross K/V are its own
  copy), so pinning a bank page any longer would only shrink the cache. On CUDA the release
  happens after the encoder's kernels are *queued*; a later bank write that reuses the page
  is queued on the same stream, hence runs after them.
- A step (`step`): one decoder forward over every active slot (serving/t5_step.py, the
  model's own weights and modules, a per-row position bias), then every row's next token
  at once (serving/engine/sampling.py: greedy, or temperature/top-p with the row's own counter-based
  random stream), then one host sync to hand the tokens back.
- Isolation: a request whose prompt cannot be leased (deleted, unreadable, larger than the
  bank), whose parameters do not hold in the compute dtype (a temperature that is 0 in
  float32) or that the step loop does not run (beam search) fails alone in `admit` with a
  done-event; the others are admitted and decode exactly as they would alone.

Not thread-safe: exactly one thread (the scheduler's engine thread) calls it, and the static
path (`Engine.run_batch`, e.g. for beam search) should run on that same thread.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Hashable, Sequence

import torch

from promptmux.kernels.prompt_concat import build_encoder_inputs, pack_segments

from .decode_graphs import make_runner, resolve_decode_graphs
from ..core import Engine
from promptmux.prompts.errors import InvalidRequestError, ModelLoadError, PromptmuxError
from ..prompt_bank import Lease
from ..types import GenerationResult, PreparedRequest, PromptVersionRef
from ..sampling import SAMPLING_DTYPE, check_sampling_params, row_seed, sample_rows, seed_words
from .slot_cache import SlotCache
from .t5_step import T5DecoderStep


@dataclass
class StepEvent:
    """What one admit() or step() call did for one request."""

    handle: Hashable  # the caller's handle, given at admit()
    new_tokens: list[int]  # tokens this call produced for the request (0 or 1 per step)
    # Set exactly once, on the request's last event: its result (EOS or its own
    # max_new_tokens reached), or the PromptmuxError that failed it ALONE (its prompt was
    # deleted or could not be loaded, the prompt bank could not fit it, ...). Its slot is
    # already free when this event is returned.
    done: GenerationResult | PromptmuxError | None = None


@dataclass
class StepStats:
    """What the last admit() or step() call did, for metrics."""

    active_slots: int  # slots decoding after the call
    admitted: int  # requests admitted by the call (admit only)
    encoder_tokens: int  # encoder positions computed by the call (admit only)
    seconds: float  # wall time of the call
    tokens: int  # tokens produced by the call


@dataclass
class _Active:
    """Host-side state of one request in a slot (its device state lives in the SlotCache)."""

    handle: Hashable
    prepared: PreparedRequest
    encoder_length: int  # prompt rows + input tokens
    sampling: bool
    nucleus: bool  # sampling with top_p < 1
    tokens: list[int] = field(default_factory=list)  # produced so far; len() is its decode position


class StepEngine:
    """Iteration-level batching over a fixed number of slots (engine.max_batch_size).

    Not thread-safe: exactly one thread (the scheduler's engine thread) calls it."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        model = engine.model
        config = engine.config
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
            dtype=self.decoder.blocks[0].layer[0].SelfAttention.k.weight.dtype,
            device=self.device,
        )
        self.decode_graphs = resolve_decode_graphs(config.decode_graphs, self.device)
        self._runner = make_runner(self.decode_graphs, self.decoder, self.cache)
        self.decoder_start_token_id = model.config.decoder_start_token_id
        self._rows: list[_Active] = []  # row i of the cache holds self._rows[i]
        self._row_of: dict[Hashable, int] = {}
        self._last = StepStats(active_slots=0, admitted=0, encoder_tokens=0, seconds=0.0, tokens=0)

    # ------------------------------------------------------------------ state
    @property
    def free_slots(self) -> int:
        return self.cache.slots - len(self._rows)

    @property
    def active_slots(self) -> int:
        return len(self._rows)

    @property
    def last_stats(self) -> StepStats:
        return self._last

    def encoder_tokens(self, prepared: PreparedRequest) -> int:
        """Encoder positions this request costs at admission: its prompt rows + input tokens."""
        return sum(m.length for m in prepared.prompts) + len(prepared.token_ids)

    def supports(self, prepared: PreparedRequest) -> bool:
        """False for requests the step loop does not run (beam search): the scheduler sends
        those to Engine.run_batch, today's static path."""
        params = prepared.params
        return not (params.strategy == "beam" and params.num_beams > 1)

    # ------------------------------------------------------------------ admission
    @torch.inference_mode()
    def admit(self, items: Sequence[tuple[Hashable, PreparedRequest]]) -> list[StepEvent]:
        """One encoder forward for these requests only (the fused [prompt; input] op and its
        mask); their cross-attention K/V go into free slots. len(items) <= free_slots.
        A request that fails here fails alone (a done-event with its error); the others are
        admitted. Produces no tokens: admitted requests get no event here."""
        started = time.perf_counter()
        if len(items) > self.free_slots:
            raise InvalidRequestError(
                f"admit() got {len(items)} requests but only {self.free_slots} of {self.cache.slots} slots are "
                "free; admit at most free_slots requests per call"
            )
        events: list[StepEvent] = []
        accepted: list[tuple[Hashable, PreparedRequest, Lease]] = []
        seen: set = set()
        for handle, prepared in items:
            try:
                self._check(handle, prepared, seen)
                lease = self._lease(prepared)
            except PromptmuxError as error:
                events.append(StepEvent(handle, [], error))
                continue
            seen.add(handle)
            accepted.append((handle, prepared, lease))
        encoder_tokens = 0
        if accepted:
            try:
                encoder_tokens = self._encode_into_slots(accepted)
            except RuntimeError as error:  # e.g. out of memory: these requests fail, the slots stay sound
                events.extend(
                    StepEvent(handle, [], PromptmuxError(f"the encoder forward for this admission failed: {error}"))
                    for handle, _, _ in accepted
                )
                accepted = []
        self._last = StepStats(
            active_slots=len(self._rows),
            admitted=len(accepted),
            encoder_tokens=encoder_tokens,
            seconds=time.perf_counter() - started,
            tokens=0,
        )
        return events

    def _check(self, handle: Hashable, prepared: PreparedRequest, seen: set) -> None:
        if handle in self._row_of or handle in seen:
            raise InvalidRequestError(f"handle {handle!r} is already admitted; give every request its own handle")
        if not self.supports(prepared):
            raise InvalidRequestError(
                f"beam search (num_beams={prepared.params.num_beams}) does not run in the step loop; "
                "send it to Engine.run_batch (StepEngine.supports() tells which requests to route there)"
            )
        # Prepared requests were validated once; checked again here because a slot's cache
        # holds max_new_tokens_limit positions and the sampler runs in float32, whoever built it.
        prepared.params.validate(self.cache.max_positions)
        check_sampling_params(prepared.params)

    def _lease(self, prepared: PreparedRequest) -> Lease:
        """Pin this request's prompts in the bank (its own lease, so its failure is its own)."""
        try:
            return self.engine.bank.lease(list(prepared.prompts))
        except PromptmuxError:
            raise
        except Exception as error:  # a prompt file the store cannot read
            names = ", ".join(f"{m.tenant}/{m.task} v{m.version}" for m in prepared.prompts)
            raise PromptmuxError(f"the prompt(s) {names} could not be loaded: {error}") from error

    def _encode_into_slots(self, accepted: list[tuple[Hashable, PreparedRequest, Lease]]) -> int:
        engine, cache = self.engine, self.cache
        try:
            prepared = [p for _, p, _ in accepted]
            rows = [
                [seg for m in p.prompts for seg in lease.segments[(m.tenant, m.task, m.version)]]
                for _, p, lease in accepted
            ]
            segments = pack_segments(rows, engine.device)
            input_lengths = [len(p.token_ids) for p in prepared]
            total_lengths = [pl + il for pl, il in zip(segments.prompt_lengths, input_lengths)]
            width = max(input_lengths)
            padded = [list(p.token_ids) + [engine.pad_token_id] * (width - len(p.token_ids)) for p in prepared]
            input_ids = torch.tensor(padded, dtype=torch.long).to(engine.device, non_blocking=True)  # [B, T]
            lengths = torch.tensor(input_lengths, dtype=torch.long).to(engine.device, non_blocking=True)  # [B]
            inputs = build_encoder_inputs(
                input_ids, lengths, engine.embedding, engine.bank.rows, segments, max(total_lengths),
                backend=engine.config.concat_backend,
            )
            encoded = engine.model.get_encoder()(
                inputs_embeds=inputs.embeds, attention_mask=inputs.attention_mask
            ).last_hidden_state  # [B, S, D]
        finally:
            for _, _, lease in accepted:  # the encoder pass was the prompts' last reader
                engine.bank.release(lease)
        encoded = encoded.to(self.device)
        cross_k, cross_v = self.decoder.project_cross(encoded)  # L x [B, H, S, d]
        start = len(self._rows)
        if cache.ensure_cross_width(max(total_lengths), live_rows=start):
            self._runner.reset()
        params = [p.params for p in prepared]
        seeds = [seed_words(row_seed(q)) if q.strategy == "sample" else (0, 0) for q in params]
        # One host-to-device copy per field for the whole admission.
        cache.admit_rows(
            start,
            cross_k,
            cross_v,
            encoder_lengths=torch.tensor(total_lengths, dtype=torch.long).to(self.device, non_blocking=True),
            decoder_start_token=self.decoder_start_token_id,
            greedy=torch.tensor([q.strategy != "sample" for q in params]).to(self.device, non_blocking=True),
            temperature=torch.tensor(
                [q.temperature if q.strategy == "sample" else 1.0 for q in params], dtype=SAMPLING_DTYPE
            ).to(self.device, non_blocking=True),
            top_p=torch.tensor(
                [q.top_p if q.strategy == "sample" else 1.0 for q in params], dtype=SAMPLING_DTYPE
            ).to(self.device, non_blocking=True),
            seeds=torch.tensor(seeds, dtype=torch.long).to(self.device, non_blocking=True),
        )
        for (handle, p, _), length in zip(accepted, total_lengths):
            sampling = p.params.strategy == "sample"
            self._row_of[handle] = len(self._rows)
            self._rows.append(_Active(handle, p, length, sampling, sampling and p.params.top_p < 1.0))
        return sum(total_lengths)

    # ------------------------------------------------------------------ decoding
    @torch.inference_mode()
    def step(self, limit: int | None = None) -> list[StepEvent]:
        """One decoder forward for every active slot, or for the first `limit` of them (the
        rest keep their slots and state and wait: see `put_first`); each row samples with
        its own parameters and its own generator; rows that hit EOS or their own
        max_new_tokens are freed at once. One event per request that stepped."""
        started = time.perf_counter()
        # A waiting row inside a padded CUDA-graph shape computes too: its output is ignored,
        # and its one write, K/V at its own current position, is rewritten by its next real
        # step before anything reads it.
        rows = self._rows if limit is None else self._rows[:limit]
        n = len(rows)
        if n == 0:
            self._last = StepStats(active_slots=0, admitted=0, encoder_tokens=0, seconds=0.0, tokens=0)
            return []
        cache = self.cache
        columns = max(len(r.tokens) for r in rows) + 1  # self-attention columns any row reads
        width = max(r.encoder_length for r in rows)  # encoder columns any row reads
        logits = self._runner(n, columns, width)  # [n, V]
        if any(r.sampling for r in rows):
            next_tokens = sample_rows(
                logits, cache.greedy[:n], cache.temperature[:n], cache.top_p[:n], cache.seeds[:n],
                cache.positions[:n], filter_top_p=any(r.nucleus for r in rows),
            )  # [n]
        else:
            next_tokens = logits.argmax(dim=-1)  # [n]
        cache.tokens[:n] = next_tokens
        cache.positions[:n] += 1
        produced = next_tokens.tolist()  # the step's one host sync
        eos = self.engine.eos_token_id
        events: list[StepEvent] = []
        finished: list[int] = []
        for index, (row, token) in enumerate(zip(rows, produced)):
            row.tokens.append(token)
            event = StepEvent(row.handle, [token])
            if token == eos or len(row.tokens) >= row.prepared.params.max_new_tokens:
                event.done = self._result(row, "eos" if token == eos else "length")
                finished.append(index)
            events.append(event)
        self._free(finished)
        self._last = StepStats(
            active_slots=len(self._rows), admitted=0, encoder_tokens=0,
            seconds=time.perf_counter() - started, tokens=n,
        )
        return events

    @torch.inference_mode()
    def put_first(self, handles: Sequence[Hashable]) -> None:
        """Move these requests into the lowest slots, [0, len(handles)), so a `step(limit)`
        with limit >= len(handles) advances them: each one outside swaps with a row inside
        that is not among them (one batched copy per buffer, of the swapped rows only)."""
        wanted = {self._row_of[handle] for handle in handles}
        count = len(wanted)
        outside = sorted(i for i in wanted if i >= count)
        if not outside:
            return
        inside = [i for i in range(count) if i not in wanted][: len(outside)]
        columns = max(len(r.tokens) for r in self._rows) + 1
        width = max(r.encoder_length for r in self._rows)
        # The source rows are gathered before any is written, so this swaps.
        self.cache.move_rows(outside + inside, inside + outside, positions=columns, width=width)
        for a, b in zip(outside, inside):
            self._rows[a], self._rows[b] = self._rows[b], self._rows[a]
            self._row_of[self._rows[a].handle] = a
            self._row_of[self._rows[b].handle] = b

    @torch.inference_mode()
    def cancel(self, handle: Hashable) -> bool:
        """Free the request's slot now (the caller went away). No event. False if unknown."""
        index = self._row_of.get(handle)
        if index is None:
            return False
        self._free([index])
        return True

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
        for handle in (self._rows[i].handle for i in gone):
            del self._row_of[handle]
        if holes:
            live = [r for i, r in enumerate(self._rows) if i not in gone]
            columns = max(len(r.tokens) for r in live) + 1
            width = max(r.encoder_length for r in live)
            self.cache.move_rows(holes, movers, positions=columns, width=width)
            for hole, mover in zip(holes, movers):
                self._rows[hole] = self._rows[mover]
                self._row_of[self._rows[hole].handle] = hole
        del self._rows[new:]
        self.cache.clear_rows(new, old)

    def _result(self, row: _Active, finish: str) -> GenerationResult:
        prepared = row.prepared
        return GenerationResult(
            request_id=prepared.request.request_id,
            text=self.engine.detokenize(row.tokens),
            token_ids=list(row.tokens),
            finish_reason=finish,  # type: ignore[arg-type]
            prompt_tokens=sum(m.length for m in prepared.prompts),
            input_tokens=len(prepared.token_ids),
            output_tokens=len(row.tokens),
            prompt_versions=tuple(PromptVersionRef(m.tenant, m.task, m.version) for m in prepared.prompts),
        )
