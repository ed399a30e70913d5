"""The step scheduler: iteration-level batching in front of the step executor, one per replica.

Where the Batcher (serving/scheduling/batcher.py) runs a batch to completion, this scheduler makes the
decoder step the unit of scheduling. One dedicated engine thread runs the loop the way vLLM v1's
engine core does: `schedule()` makes one StepPlan, the executor runs it
(`execute(plan) -> StepOutputs`, engine/plan.py), `update()` delivers what came back. The
scheduler holds no tensors and calls nothing else on the executor. A plan:

1. frees the slots of requests whose callers went away;
2. admits newcomers into free slots, the tenant holding the fewest slots first and
   round-robin among equals (the rotation carries over between steps), within
   `serving.max_encoder_tokens_per_step` encoder tokens (a single bigger request is admitted
   alone), so a burst of long inputs spreads over several steps and decoding never stalls
   for long. Fewest-slots-first is what keeps a light tenant's latency near its latency
   alone: a flood's tenant holds most slots, so the next freed slot goes to the newcomer,
   however many of the flood's requests queued before it;
3. runs beam-search requests, which the step loop does not run, on the static path between
   steps (`StepPlan.static`);
4. runs one decoder step over the active slots (while a light tenant decodes next to a heavier
   one, over the light tenant's rows first and a limited number of rows: `run_first`,
   `row_limit`).

`update` hands each row's new tokens to its stream and completes finished requests, in one
callback onto the event loop per engine call.

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
import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

from promptmux.prompts.errors import PromptmuxError, UnavailableError

from ..config import ServingConfig
from ..engine.plan import AdmissionStats, DecodeStats, Executor, StepOutputs, StepPlan
from ..engine.types import GenerationResult
from .tenant_queues import BatchObserver, QueuedRequest, TenantQueues, expired_error

log = logging.getLogger(__name__)

# How often queued requests are checked for a passed deadline while every slot is busy.
_EXPIRY_SWEEP_S = 0.05


class StepObserver(BatchObserver, Protocol):
    """What the scheduler reports, for metrics, beyond the Batcher's reports (which it also
    makes: queue depth, drops, and the static batches of beam requests)."""

    def admitted(self, items: Sequence["ScheduledRequest"], stats: AdmissionStats | None) -> None: ...

    def step_finished(self, stats: DecodeStats) -> None: ...

    def first_token(self, item: "ScheduledRequest", seconds: float) -> None: ...

    def slots(self, active: int, freed: dict[str, int]) -> None: ...


@dataclass(eq=False)
class ScheduledRequest(QueuedRequest):
    """A queued request, then a slot's occupant (named by its `handle` in plans)."""

    first_token_at: float | None = None
    withdrawn: bool = False  # the caller went away; never start it, free its slot
    finished: bool = False  # its last outcome was handled (engine thread)


# (item, new tokens, done) for one request, from one engine call
_Delivery = tuple[ScheduledRequest, list[int], GenerationResult | PromptmuxError | None]


class StepScheduler(TenantQueues):
    item_type = ScheduledRequest

    def __init__(self, config: ServingConfig, executor: Executor, **kwargs) -> None:
        super().__init__(config, executor, **kwargs)
        if config.shared_step_rows == "auto":
            raise ValueError("StepScheduler needs serving.shared_step_rows as a number of rows: build_scheduler "
                             "resolves \"auto\" for the engine's device")
        self._lock = threading.Lock()
        self._wake = threading.Event()
        # Shared with the engine thread, under _lock: the tenant queues, the rotation, the
        # queued count and the progress time of TenantQueues, and:
        self._active: dict[int, ScheduledRequest] = {}  # handle -> request holding a slot
        self._to_cancel: list[ScheduledRequest] = []
        self._running = False  # the engine thread is inside an engine call
        self._stopping = False
        # Event loop only:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        # Engine thread only:
        self._held: Counter = Counter()  # tenant -> slots it holds
        self._orphans: list[int] = []  # handles a failed engine call may have left in slots
        # Rows the last step was limited to while a light tenant decoded (None: every row).
        self._limit: int | None = None
        self._next_sweep = 0.0
        # Rows a step may hold: the executor's slots, capped by serving.max_batch_size.
        self._max_rows = min(executor.slots, config.max_batch_size)

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
            running = list(self._active.values())
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
            if not dropped and item.handle in self._active:
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
        """One engine call: schedule, execute, update. False: there was nothing to run."""
        started = time.thread_time_ns()
        scheduled = self.schedule()
        planned = time.thread_time_ns()
        self.cpu_ns["schedule"] += planned - started
        if scheduled is None:
            return False
        plan, admits, beams, cancelled = scheduled
        streamed: dict[int, list[int]] = {item.handle: [] for item in beams if item.on_token is not None}

        def stream(handle: int, token: int) -> None:  # static-path tokens, delivered with their result
            if handle in streamed:
                streamed[handle].append(token)

        with self._lock:
            self._running = True
        try:
            outputs = self._executor.execute(plan, stream if streamed else None)
        except Exception as error:  # a bug or a broken device: this call's requests learn why
            self._engine_failed(admits + beams, error)
            return True
        finally:
            self._end_call()
            executed = time.thread_time_ns()
            self.cpu_ns["execute"] += executed - planned
        self.update(outputs, admits, beams, streamed, cancelled)
        self.cpu_ns["update"] += time.thread_time_ns() - executed
        return True

    def schedule(self) -> tuple[StepPlan, list[ScheduledRequest], list[ScheduledRequest], int] | None:
        """The next engine call's plan (and the requests it admits, the beam requests it runs,
        how many slots it frees for callers that left), or None when nothing is to run."""
        cancel, cancelled = self._take_withdrawn()
        now = self._clock()
        with self._lock:
            if self._stopping:
                return None
            expired = self._sweep_expired(now) if now >= self._next_sweep else []
            admits, beams = self._pick(now, expired)
            depth_changed = bool(expired or admits or beams)
        if expired or depth_changed:
            self._post(self._deliver, [(item, [], expired_error(now - item.enqueued_at)) for item in expired],
                       self._report_after_pick(expired))
        if not (cancel or admits or beams or self._active):
            return None
        limit, light = self._step_limit()
        self._limit = limit
        plan = StepPlan(
            cancel=tuple(cancel),
            static=tuple((item.handle, item.request) for item in beams),
            admit=tuple((item.handle, item.request) for item in admits),
            run_first=tuple(item.handle for item in light),
            row_limit=limit,
        )
        return plan, admits, beams, cancelled

    def update(self, outputs: StepOutputs, admits: list[ScheduledRequest], beams: list[ScheduledRequest],
               streamed: dict[int, list[int]], cancelled: int) -> None:
        """Deliver one engine call's outputs: tokens to streams, results and errors to their
        callers (their slots are free already), metrics to the observer."""
        now = self._clock()
        deliveries: list[_Delivery] = []
        freed: Counter = Counter()
        if cancelled:
            freed["cancelled"] = cancelled
        ends = {**outputs.finished, **outputs.errors}
        firsts: list[ScheduledRequest] = []
        for handle, token in zip(outputs.stepped, outputs.tokens):
            item = self._active.get(handle)
            if item is None or item.finished:
                continue
            if item.first_token_at is None:
                item.first_token_at = now
                firsts.append(item)
            done = ends.pop(handle, None)
            deliveries.append((item, [token], done))
            if done is not None:
                self._release(item)
                freed[_freed_reason(done)] += 1
        for handle, done in ends.items():  # requests that ended without a step token this call
            item = self._active.get(handle)
            if item is not None:
                if item.finished:
                    continue
                self._release(item)
                freed[_freed_reason(done)] += 1
                deliveries.append((item, [], done))
        for item in beams:
            if item.handle in ends:
                deliveries.append((item, streamed.get(item.handle, []), ends[item.handle]))
        if not deliveries and not freed and outputs.admission is None and outputs.decode is None:
            return
        observer, active = self._observer, outputs.active_slots

        def report() -> None:
            if outputs.static is not None:
                seconds = outputs.static.encode_seconds + outputs.static.decode_seconds
                observer.batch_finished(beams, outputs.static, seconds)
            if admits:
                observer.admitted(admits, outputs.admission)
            if outputs.decode is not None:
                observer.step_finished(outputs.decode)
            for item in firsts:
                observer.first_token(item, item.first_token_at - item.enqueued_at)
            observer.slots(active, dict(freed))

        self._post(self._deliver, deliveries, report)

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
        free slots within the encoder-token budget (a lone bigger one still goes alone; a light
        tenant's requests without a heavier tenant's beside them), beam requests into one static
        batch. Heads past their deadline go to `expired` on the way.
        Picked step requests hold their slots from here on, so a caller leaving now frees its
        slot at the next step."""
        free = self._max_rows - len(self._active)
        budget = self.config.max_encoder_tokens_per_step
        admits: list[ScheduledRequest] = []
        beams: list[ScheduledRequest] = []
        spent = 0
        # While steps are limited for a light tenant, heavier tenants only refill the rows a
        # step runs: a request admitted beyond them would wait in its slot, its encoder pass
        # spent early on the light tenant's time.
        heavy_room = None if self._limit is None else self._limit - len(self._active)
        light_max = self._light_max()
        # Where steps are shared (more than serving.shared_step_rows rows active), a light
        # tenant's admission runs its encoder pass alone: a heavier tenant's newcomers, which
        # would make that pass several times longer before the light request's first token,
        # wait for the next step.
        cap = self.config.shared_step_rows
        shared = bool(cap) and len(self._active) > cap
        heavy_tenants = {t for t, held in self._held.items() if held > light_max} if shared else set()
        light_admitted = False
        while self._rotation:
            # O(tenants queued) per pick; the rotation order breaks ties
            tenant = min(self._rotation, key=self._held.__getitem__)
            heavy = tenant in heavy_tenants
            if heavy and light_admitted:
                break
            if heavy_room is not None and heavy:
                if heavy_room <= 0:
                    break  # fewest slots first: every other queued tenant holds as many or more
                heavy_room -= 1
            item = self._queues[tenant][0]
            if now > item.deadline:
                expired.append(item)
                self._pop_head(tenant, now, rotate=False)
                continue
            if item.request.steppable:
                cost = item.request.encoder_tokens
                if len(admits) >= free or (admits and spent + cost > budget):
                    break
                spent += cost
                admits.append(item)
                self._held[tenant] += 1
                light_admitted = light_admitted or (bool(heavy_tenants) and not heavy)
            else:
                if len(beams) >= self.config.max_batch_size:
                    break
                beams.append(item)
            self._pop_head(tenant, now)
            if spent >= budget:
                break
        self._active.update((item.handle, item) for item in admits)
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

    # -- the step's rows (engine thread)
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
        light = [item for item in self._active.values() if self._held[item.tenant] <= light_max]
        if not light or len(light) == len(self._active):
            return None, []
        limit = max(cap, len(light) + cap // 4)
        return (limit, light) if limit < len(self._active) else (None, [])

    # -- bookkeeping (engine thread)
    def _release(self, item: ScheduledRequest) -> None:
        item.finished = True
        with self._lock:
            self._active.pop(item.handle, None)
            self._held[item.tenant] -= 1
            if not self._held[item.tenant]:
                del self._held[item.tenant]

    def _take_withdrawn(self) -> tuple[list[int], int]:
        """(handles whose slots the next plan frees, how many of them were callers that went
        away): requests withdrawn since the last plan leave their slots before the next step,
        and so do the slots a failed engine call may have left taken."""
        with self._lock:
            withdrawn, self._to_cancel = self._to_cancel, []
        handles, self._orphans = self._orphans, []
        cancelled = 0
        for item in withdrawn:
            if item.finished:
                continue
            self._release(item)
            handles.append(item.handle)
            cancelled += 1
        if withdrawn:
            self._touch()
        return handles, cancelled

    def _engine_failed(self, items: list[ScheduledRequest], error: Exception) -> None:
        """An engine call raised: its requests and every active one fail and leave their slots
        (the next plan frees them in the executor too); serving goes on."""
        failing = list(dict.fromkeys([*items, *self._active.values()]))
        log.exception("the step executor failed on an engine call of %d requests", len(failing), exc_info=error)
        failure = error if isinstance(error, PromptmuxError) else PromptmuxError(
            f"the engine failed while running {len(failing)} requests: {type(error).__name__}: {error}"
        )
        stepping = [item for item in failing if item.handle in self._active]
        for item in stepping:
            self._release(item)
        self._orphans.extend(item.handle for item in stepping)
        observer = self._observer
        report = (lambda: observer.slots(0, {"error": len(stepping)})) if observer is not None else None
        self._post(self._deliver, [(item, [], failure) for item in failing], report)

    def _end_call(self) -> None:
        with self._lock:
            self._running = False
            self._progress_at = self._clock()

    def _touch(self) -> None:
        with self._lock:
            self._progress_at = self._clock()


def _freed_reason(done: GenerationResult | PromptmuxError) -> str:
    return "error" if isinstance(done, BaseException) else done.finish_reason
