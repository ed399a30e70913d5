"""The step scheduler: iteration-level batching in front of the step engine, one per replica.

Where the Batcher (serving/scheduling/batcher.py) runs a batch to completion, this scheduler makes the
decoder step the unit of scheduling. One dedicated engine thread runs the loop:

1. free the slots of requests whose callers went away (StepEngine.cancel);
2. admit newcomers into free slots, the tenant holding the fewest slots first and
   round-robin among equals (the rotation carries over between steps), within
   `serving.max_encoder_tokens_per_step` encoder tokens (a single bigger request is admitted
   alone), so a burst of long inputs spreads over several steps and decoding never stalls
   for long. Fewest-slots-first is what keeps a light tenant's latency near its latency
   alone: a flood's tenant holds most slots, so the next freed slot goes to the newcomer,
   however many of the flood's requests queued before it;
3. run beam-search requests, which the step loop does not run, on today's static path
   (Engine.run_batch) between steps;
4. one StepEngine.step() for every active slot;
5. hand each row's new tokens to its stream and complete finished requests, in one callback
   onto the event loop per engine call.

Admission is bounded exactly as in the Batcher, with the same messages: a full queue, or a
tenant at its in-flight limit, answers RESOURCE_EXHAUSTED at once. A request that waited
past its deadline is dropped before compute (DEADLINE_EXCEEDED). A caller that goes away
leaves the queue at once, or frees its slot before the next step. After `close()` new
requests get UNAVAILABLE. With nothing queued or decoding, the engine thread sleeps on an
event: no busy loop.

Queues are shared between the event loop (submit, cancel, close) and the engine thread
(admission), under one lock held only for bookkeeping, never across engine compute.
Futures, token sinks and the observer are touched on the event loop only.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Protocol, Sequence

from .batcher import Batcher
from promptmux.prompts.errors import PromptmuxError, UnavailableError
from ..engine.types import GenerationResult, PreparedRequest
from ..config import ServingConfig
from .tenant_queues import BatchObserver, QueuedRequest, RunBatch, TenantQueues, expired_error

log = logging.getLogger(__name__)

# How often queued requests are checked for a passed deadline while every slot is busy.
_EXPIRY_SWEEP_S = 0.05


class StepEngineLike(Protocol):
    """What the scheduler uses of serving/engine/step/executor.py's StepEngine."""

    @property
    def free_slots(self) -> int: ...

    @property
    def active_slots(self) -> int: ...

    @property
    def last_stats(self) -> Any: ...  # StepStats

    def encoder_tokens(self, prepared: PreparedRequest) -> int: ...

    def supports(self, prepared: PreparedRequest) -> bool: ...

    def admit(self, items: Sequence[tuple[Hashable, PreparedRequest]]) -> list: ...  # [StepEvent]

    def step(self, limit: int | None = None) -> list: ...  # [StepEvent]

    def put_first(self, handles: Sequence[Hashable]) -> None: ...

    def cancel(self, handle: Hashable) -> bool: ...


class StepObserver(BatchObserver, Protocol):
    """What the scheduler reports, for metrics, beyond the Batcher's reports (which it also
    makes: queue depth, drops, and the static batches of beam requests)."""

    def admitted(self, items: Sequence["ScheduledRequest"], stats: Any, padding_fraction: float) -> None: ...

    def step_finished(self, stats: Any, rows: int, distinct_tasks: int, waiting: int = 0) -> None: ...

    def first_token(self, item: "ScheduledRequest", seconds: float) -> None: ...

    def slots(self, active: int, freed: dict[str, int]) -> None: ...


@dataclass(eq=False)
class ScheduledRequest(QueuedRequest):
    """A queued request, then a slot's occupant. It is its own handle in the step engine."""

    first_token_at: float | None = None
    withdrawn: bool = False  # the caller went away; never start it, free its slot
    finished: bool = False  # its last event was handled (engine thread)

    def __hash__(self) -> int:
        return id(self)


# (item, new tokens, done) for one request, from one engine call
_Delivery = tuple[ScheduledRequest, list[int], GenerationResult | PromptmuxError | None]


class StepScheduler(TenantQueues):
    item_type = ScheduledRequest

    def __init__(self, config: ServingConfig, step_engine: StepEngineLike, run_batch: RunBatch, **kwargs) -> None:
        super().__init__(config, run_batch, **kwargs)
        if config.shared_step_rows == "auto":
            raise ValueError("StepScheduler needs serving.shared_step_rows as a number of rows: build_scheduler "
                             "resolves \"auto\" for the engine's device")
        self._engine = step_engine
        self._lock = threading.Lock()
        self._wake = threading.Event()
        # Shared with the engine thread, under _lock: the tenant queues, the rotation, the
        # queued count and the progress time of TenantQueues, and:
        self._active: set[ScheduledRequest] = set()
        self._to_cancel: list[ScheduledRequest] = []
        self._running = False  # the engine thread is inside an engine call
        self._stopping = False
        # Event loop only:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        # Engine thread only:
        self._active_tasks: Counter = Counter()  # (tenant, prompt ids) -> active rows
        self._held: Counter = Counter()  # tenant -> slots it holds
        # Rows the last step was limited to while a light tenant decoded (None: every row).
        self._limit: int | None = None
        self._next_sweep = 0.0
        # Rows a step may hold: the engine's slots, capped by serving.max_batch_size.
        self._max_rows = config.max_batch_size

    # ------------------------------------------------------------------ public
    @property
    def active(self) -> int:
        """Requests holding a slot now."""
        return len(self._active)

    def stalled_for(self, now: float | None = None) -> float:
        """Seconds since the engine thread last made progress while work is queued or
        running; 0.0 when idle."""
        with self._lock:
            if not (self._queued or self._active or self._running):
                return 0.0
            since = self._progress_at
        return max(0.0, (self._clock() if now is None else now) - since)

    def _check_submittable(self, request) -> None:
        if not isinstance(request, PreparedRequest):
            raise TypeError(
                f"StepScheduler.submit takes a PreparedRequest (Engine.prepare), got {type(request).__name__}; "
                "requests are prepared once, off the event loop, before they are queued"
            )

    async def close(self, grace_s: float | None = None) -> None:
        """Refuse new requests; let queued and running ones finish for up to `grace_s`, then
        fail the rest with UNAVAILABLE."""
        self._closing = True
        grace = self.config.shutdown_grace_s if grace_s is None else grace_s
        end = self._clock() + grace
        while self._busy() and self._clock() < end and self._thread is not None and self._thread.is_alive():
            await asyncio.sleep(0.01)
        with self._lock:
            self._stopping = True
            queued = [item for queue in self._queues.values() for item in queue]
            running = list(self._active)
            self._queues.clear()
            self._rotation.clear()
            self._queued = 0
        self._wake.set()
        for item in queued:
            self._fail(item, UnavailableError("the replica shut down before running this request; retry it"))
        for item in running:
            self._fail(item, UnavailableError("the replica shut down while running this request; retry it"), report=False)
        self._report_depth()

    # ------------------------------------------------------------------ event loop side
    def _busy(self) -> bool:
        with self._lock:
            return bool(self._queued or self._active or self._running)

    def _enqueue(self, item: ScheduledRequest) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("a StepScheduler serves one event loop; create one per loop")
        with self._lock:
            if not (self._queued or self._active or self._running):
                self._progress_at = item.enqueued_at  # idle time is not a stall
            self._push(item)
        self._report_depth()
        if self._thread is None:
            self._thread = threading.Thread(target=self._engine_loop, name="promptmux-step-engine", daemon=True)
            self._thread.start()
        self._wake.set()

    def _withdraw(self, item: ScheduledRequest) -> None:
        with self._lock:
            item.withdrawn = True
            dropped = self._remove_queued(item)
            if not dropped and item in self._active:
                self._to_cancel.append(item)
        if dropped:
            self._report_depth()
            if self._observer is not None:
                self._observer.request_dropped(item, "CANCELLED")
        else:
            self._wake.set()

    def _deliver(self, deliveries: list[_Delivery], report: Callable[[], None] | None = None) -> None:
        """On the event loop: tokens to their sinks, results to their futures, then metrics."""
        for item, tokens, done in deliveries:
            if item.future.done():
                continue  # the caller went away, or close() failed it
            if tokens and item.on_token is not None:
                for token in tokens:
                    try:
                        item.on_token(token)
                    except Exception:  # one stream's sink must not break the others
                        log.exception("a token sink failed; its stream misses tokens")
            if done is None:
                continue
            if isinstance(done, BaseException):
                item.future.set_exception(done)
            else:
                item.future.set_result(done)
        if report is not None and self._observer is not None:
            try:
                report()
            except Exception:  # a metrics bug must not stop serving
                log.exception("reporting step metrics failed")

    def _post(self, callback: Callable[..., None], *args: Any) -> None:
        """From the engine thread onto the event loop; dropped once the loop has closed."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop closed in between
            pass

    # ------------------------------------------------------------------ engine thread
    def _engine_loop(self) -> None:
        while True:
            self._wake.clear()
            try:
                if not self._iterate():
                    with self._lock:
                        if self._stopping:
                            return
                        waiting = self._queued
                    # Queued but unadmittable (every slot busy and nothing decoding cannot
                    # happen; a dead head can): look again soon. Idle: sleep until woken.
                    self._wake.wait(_EXPIRY_SWEEP_S if waiting else None)
            except Exception:  # a bookkeeping or metrics bug must not stop the replica serving
                log.exception("step scheduler iteration failed; continuing")
                time.sleep(0.01)
            with self._lock:
                if self._stopping:
                    return

    def _iterate(self) -> bool:
        """One loop turn: cancellations, admission, beam batch, one step. False: nothing ran."""
        self._free_withdrawn()
        now = self._clock()
        with self._lock:
            if self._stopping:
                return False
            expired = self._sweep_expired(now) if now >= self._next_sweep else []
            admits, beams = self._pick(now, expired)
            depth_changed = bool(expired or admits or beams)
        if expired or depth_changed:
            self._post(self._deliver, [(item, [], expired_error(now - item.enqueued_at)) for item in expired],
                       self._report_after_pick(expired))
        ran = False
        if beams:
            self._run_beams(beams)
            ran = True
        if admits:
            self._admit(admits)
            ran = True
        if self._active:
            self._step()
            ran = True
        return ran

    def _report_after_pick(self, expired: list[ScheduledRequest]) -> Callable[[], None]:
        observer = self._observer

        def report() -> None:
            for item in expired:
                observer.request_dropped(item, "DEADLINE_EXCEEDED")
            observer.queue_depth(self._queued)

        return report

    # -- admission (under _lock)
    def _sweep_expired(self, now: float) -> list[ScheduledRequest]:
        self._next_sweep = now + _EXPIRY_SWEEP_S
        expired: list[ScheduledRequest] = []
        for tenant in list(self._queues):
            queue = self._queues[tenant]
            if not any(now > item.deadline for item in queue):
                continue
            kept = deque(item for item in queue if now <= item.deadline)
            expired.extend(item for item in queue if now > item.deadline)
            self._queued -= len(queue) - len(kept)
            if kept:
                self._queues[tenant] = kept
            else:
                self._drop_tenant(tenant)
        return expired

    def _pick(
        self, now: float, expired: list[ScheduledRequest]
    ) -> tuple[list[ScheduledRequest], list[ScheduledRequest]]:
        """Fewest slots first, round-robin among tenants holding as many: step requests into
        free slots within the encoder-token budget (a lone bigger one still goes alone), beam
        requests into one static batch. Heads past their deadline go to `expired` on the way.
        Picked step requests hold their slots from here on, so a caller leaving now frees its
        slot at the next step."""
        free = min(self._engine.free_slots, self._max_rows - len(self._active))
        budget = self.config.max_encoder_tokens_per_step
        admits: list[ScheduledRequest] = []
        beams: list[ScheduledRequest] = []
        spent = 0
        # While steps are limited for a light tenant, heavier tenants only refill the rows a
        # step runs: a request admitted beyond them would wait in its slot, its encoder pass
        # spent early on the light tenant's time.
        heavy_room = None if self._limit is None else self._limit - len(self._active)
        light_max = self._light_max()
        while self._rotation:
            # O(tenants queued) per pick; the rotation order breaks ties
            tenant = min(self._rotation, key=self._held.__getitem__)
            if heavy_room is not None and self._held[tenant] > light_max:
                if heavy_room <= 0:
                    break  # fewest slots first: every other queued tenant holds as many or more
                heavy_room -= 1
            item = self._queues[tenant][0]
            if now > item.deadline:
                expired.append(item)
                self._pop_head(tenant, now, rotate=False)
                continue
            if self._engine.supports(item.request):
                cost = self._engine.encoder_tokens(item.request)
                if len(admits) >= free or (admits and spent + cost > budget):
                    break
                spent += cost
                admits.append(item)
                self._held[tenant] += 1
            else:
                if len(beams) >= self.config.max_batch_size:
                    break
                beams.append(item)
            self._pop_head(tenant, now)
            if spent >= budget:
                break
        self._active.update(admits)
        return admits, beams

    def _pop_head(self, tenant: str, now: float, rotate: bool = True) -> None:
        queue = self._queues[tenant]
        item = queue.popleft()
        item.started_at = now
        self._queued -= 1
        if queue:
            if rotate:  # the tenant goes last among those holding as many slots
                self._rotation.remove(tenant)
                self._rotation.append(tenant)
        else:
            self._drop_tenant(tenant)

    # -- engine calls (outside _lock)
    def _admit(self, items: list[ScheduledRequest]) -> None:
        with self._lock:
            self._running = True
        for item in items:
            self._active_tasks[item.group] += 1
        try:
            events = self._engine.admit([(item, item.request) for item in items])
        except Exception as error:  # the whole admission failed: each request learns why
            self._engine_failed(items, error, "admitting")
            return
        finally:
            self._end_call()
        stats = self._engine.last_stats
        deliveries, freed = self._collect(events)
        lengths = [self._engine.encoder_tokens(item.request) for item in items]
        padding = 1.0 - sum(lengths) / (len(lengths) * max(lengths)) if lengths and max(lengths) else 0.0
        observer, active = self._observer, len(self._active)

        def report() -> None:
            observer.admitted(items, stats, padding)
            observer.slots(active, freed)

        self._post(self._deliver, deliveries, report)

    def _light_max(self) -> float:
        """The most slots a light tenant holds: half an equal share of the slots in use. (A
        fixed count would not do: a light tenant whose requests were slowed by a flood holds
        more of them at once, and would stop counting as light just when it needs to.)"""
        return len(self._active) / (2 * len(self._held)) if self._held else 0.0

    def _step_limit(self) -> tuple[int | None, list[ScheduledRequest]]:
        """(rows this step runs, the light tenants' requests) while a light tenant decodes
        next to a heavier one and more than serving.shared_step_rows rows are active; (None,
        []) otherwise. Light rows all run; heavier tenants' rows fill the rest, at least a
        quarter of the limit, so a stream of light tenants cannot stop them."""
        cap = self.config.shared_step_rows
        if not cap or len(self._active) <= cap:
            return None, []
        light_max = self._light_max()
        light = [item for item in self._active if self._held[item.tenant] <= light_max]
        if not light or len(light) == len(self._active):
            return None, []
        limit = max(cap, len(light) + cap // 4)
        return (limit, light) if limit < len(self._active) else (None, [])

    def _step(self) -> None:
        limit, light = self._step_limit()
        self._limit = limit
        rows = len(self._active) if limit is None else limit
        waiting = len(self._active) - rows  # rows that keep their slots and wait this step
        tasks = len(self._active_tasks)
        with self._lock:
            self._running = True
        try:
            if limit is None:
                events = self._engine.step()
            else:
                self._engine.put_first(light)
                events = self._engine.step(limit)
        except Exception as error:
            self._engine_failed(list(self._active), error, "decoding")
            return
        finally:
            self._end_call()
        stats = self._engine.last_stats
        now = self._clock()
        firsts = []
        for event in events:
            item = event.handle
            if event.new_tokens and item.first_token_at is None:
                item.first_token_at = now
                firsts.append(item)
        deliveries, freed = self._collect(events)
        observer, active = self._observer, len(self._active)

        def report() -> None:
            observer.step_finished(stats, rows, tasks, waiting)
            for item in firsts:
                observer.first_token(item, item.first_token_at - item.enqueued_at)
            observer.slots(active, freed)

        self._post(self._deliver, deliveries, report)

    def _collect(self, events: list) -> tuple[list[_Delivery], dict[str, int]]:
        """Deliveries for the loop; requests with a done-event leave their slots."""
        deliveries: list[_Delivery] = []
        freed: Counter = Counter()
        for event in events:
            item = event.handle
            if item.finished:
                continue
            deliveries.append((item, list(event.new_tokens), event.done))
            if event.done is not None:
                freed["error" if isinstance(event.done, BaseException) else event.done.finish_reason] += 1
                self._release(item)
        return deliveries, dict(freed)

    def _release(self, item: ScheduledRequest) -> None:
        item.finished = True
        with self._lock:
            self._active.discard(item)
            self._held[item.tenant] -= 1
            if not self._held[item.tenant]:
                del self._held[item.tenant]
        self._active_tasks[item.group] -= 1
        if not self._active_tasks[item.group]:
            del self._active_tasks[item.group]

    def _free_withdrawn(self) -> None:
        """Callers that went away leave their slots before the next step."""
        with self._lock:
            withdrawn, self._to_cancel = self._to_cancel, []
        if not withdrawn:
            return
        cancelled = 0
        for item in withdrawn:
            if item.finished:
                continue
            self._engine.cancel(item)
            self._release(item)
            cancelled += 1
        self._touch()
        if cancelled and self._observer is not None:
            observer, active = self._observer, len(self._active)
            self._post(self._deliver, [], lambda: observer.slots(active, {"cancelled": cancelled}))

    def _run_beams(self, items: list[ScheduledRequest]) -> None:
        """Beam requests on the static path, as one batch between steps."""
        with self._lock:
            self._running = True
        streamed: dict[int, list[int]] = {i: [] for i, item in enumerate(items) if item.on_token is not None}

        def on_token(index: int, token: int) -> None:
            if index in streamed:
                streamed[index].append(token)

        started = self._clock()
        try:
            output = self._run_batch([item.request for item in items], on_token if streamed else None)
            if len(output.results) != len(items):
                raise RuntimeError(f"the engine returned {len(output.results)} results for {len(items)} requests")
        except Exception as error:
            failure = error if isinstance(error, PromptmuxError) else PromptmuxError(
                f"the engine failed on a batch of {len(items)} beam-search requests: {type(error).__name__}: {error}"
            )
            self._post(self._deliver, [(item, [], failure) for item in items])
            return
        finally:
            self._end_call()
        seconds = self._clock() - started
        deliveries = [(item, streamed.get(i, []), result) for i, (item, result) in enumerate(zip(items, output.results))]
        observer = self._observer
        self._post(self._deliver, deliveries, lambda: observer.batch_finished(items, output.stats, seconds))

    def _engine_failed(self, items: list[ScheduledRequest], error: Exception, doing: str) -> None:
        """An engine call raised: its requests fail and leave their slots; serving goes on."""
        log.exception("the step engine failed while %s %d requests", doing, len(items), exc_info=error)
        failure = error if isinstance(error, PromptmuxError) else PromptmuxError(
            f"the engine failed while {doing} {len(items)} requests: {type(error).__name__}: {error}"
        )
        for item in items:
            try:
                self._engine.cancel(item)
            except Exception:
                log.exception("freeing a failed request's slot failed")
            self._release(item)
        observer, active = self._observer, len(self._active)
        report = (lambda: observer.slots(active, {"error": len(items)})) if observer is not None else None
        self._post(self._deliver, [(item, [], failure) for item in items], report)

    def _end_call(self) -> None:
        with self._lock:
            self._running = False
            self._progress_at = self._clock()

    def _touch(self) -> None:
        with self._lock:
            self._progress_at = self._clock()


def build_scheduler(config: ServingConfig, engine, observer=None):
    """The replica's scheduler for `serving.batching`: the StepScheduler over a StepEngine
    for "continuous", the batch-at-a-time Batcher for "mixed" and "per_task"."""
    if config.batching == "continuous":
        from ..engine.step.executor import StepEngine

        if config.shared_step_rows == "auto":
            config = dataclasses.replace(config, shared_step_rows=0 if engine.device.type == "cuda" else 16)
        return StepScheduler(config, StepEngine(engine), engine.run_batch, observer=observer)
    return Batcher(config, engine.run_batch, observer=observer)
