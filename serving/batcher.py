"""A fair asyncio batcher in front of the engine: one per replica, no Ray needed.

Requests wait in one queue per tenant. A batch is formed once `max_batch_size` requests wait
or the oldest has waited `batch_wait_timeout_s`, taking requests round-robin across tenants
(the rotation carries over between batches), so one tenant's flood cannot starve another.
In `per_task` mode a batch holds requests for one task only; the task is picked round-robin
across tenants too.

Admission is bounded: a full queue, or a tenant at its in-flight limit, answers
RESOURCE_EXHAUSTED at once instead of queueing without bound. A request that waited past
its deadline is dropped before compute (DEADLINE_EXCEEDED); one whose caller went away
(cancelled: a gRPC deadline or disconnect) leaves the queue at once. After `close()` new
requests get UNAVAILABLE.

The engine runs in one dedicated thread, one batch at a time, so the event loop stays free
to admit requests while a batch computes.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Protocol, Sequence

from .errors import (
    DeadlineExceededError,
    PromptmuxError,
    ResourceExhaustedError,
    UnavailableError,
)
from .requests import BatchStats, GenerationRequest, GenerationResult, PreparedRequest
from .serving_config import ServingConfig

log = logging.getLogger(__name__)

TokenSink = Callable[[int], None]  # called on the event loop with each new token id
Submittable = GenerationRequest | PreparedRequest  # prepared ones are never tokenized again
RunBatch = Callable[[list[Submittable], Callable[[int, int], None] | None], Any]  # -> BatchOutput


class BatchObserver(Protocol):
    """What the batcher reports, for metrics."""

    def batch_finished(self, batch: Sequence["QueuedRequest"], stats: BatchStats, compute_seconds: float) -> None: ...

    def request_dropped(self, item: "QueuedRequest", status: str) -> None: ...

    def queue_depth(self, depth: int) -> None: ...


def refuse_if_over_limits(config: ServingConfig, closing: bool, queued: int, in_flight: int, tenant: str) -> None:
    """Admission bounds shared by the Batcher and the step scheduler: raises UNAVAILABLE or
    RESOURCE_EXHAUSTED."""
    if closing:
        raise UnavailableError("this replica is shutting down and takes no new requests; retry, another replica will serve it")
    if queued >= config.max_queue_size:
        raise ResourceExhaustedError(
            f"the request queue is full ({queued} waiting, serving.max_queue_size="
            f"{config.max_queue_size}); retry with backoff, or add replicas"
        )
    if in_flight >= config.max_in_flight_per_tenant:
        raise ResourceExhaustedError(
            f"tenant {tenant!r} has {in_flight} requests in flight, the per-tenant limit "
            f"(serving.max_in_flight_per_tenant={config.max_in_flight_per_tenant}); wait for some to "
            "finish or send them with backoff"
        )


def expired_error(waited_s: float) -> DeadlineExceededError:
    return DeadlineExceededError(
        f"the request waited {waited_s:.2f}s in the queue, past its deadline, and was dropped "
        "before compute; the server is overloaded: retry later, or add replicas"
    )


@dataclass(eq=False)
class QueuedRequest:
    request: Submittable
    group: Hashable  # requests of one group may share a per_task batch
    enqueued_at: float
    deadline: float
    future: asyncio.Future
    on_token: TokenSink | None = None
    started_at: float | None = None

    @property
    def tenant(self) -> str:
        return self.request.tenant


class Batcher:
    def __init__(
        self,
        config: ServingConfig,
        run_batch: RunBatch,
        *,
        observer: BatchObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if config.max_batch_size is None:
            raise ValueError("Batcher needs a resolved ServingConfig (call config.resolved(...) first)")
        self.config = config
        self._run_batch = run_batch
        self._observer = observer
        self._clock = clock
        self._queues: dict[str, deque[QueuedRequest]] = {}
        self._rotation: deque[str] = deque()  # tenants with queued requests, next to serve first
        self._queued = 0
        self._in_flight: dict[str, int] = {}
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="promptmux-engine")
        self._worker: asyncio.Task | None = None
        self._closing = False
        self._running = False  # a batch is in the engine
        # When the engine last made progress (started or finished a batch), or work arrived
        # at an idle batcher: what the replica's health check measures a stall from.
        self._progress_at = clock()

    # ------------------------------------------------------------------ public
    @property
    def queue_depth(self) -> int:
        return self._queued

    @property
    def closing(self) -> bool:
        return self._closing

    def in_flight(self, tenant: str) -> int:
        return self._in_flight.get(tenant, 0)

    def stalled_for(self, now: float | None = None) -> float:
        """Seconds since the engine last made progress (started or finished a batch) while
        work is queued or running; 0.0 when idle. The replica's health check reads this."""
        if not (self._queued or self._running):
            return 0.0
        now = self._clock() if now is None else now
        return max(0.0, now - self._progress_at)

    async def submit(
        self,
        request: Submittable,
        *,
        on_token: TokenSink | None = None,
        deadline: float | None = None,
    ) -> GenerationResult:
        """Queue one request and wait for its result. Raises the request's PromptmuxError."""
        self._admit(request.tenant)
        now = self._clock()
        limit = now + self.config.max_queue_wait_s
        item = QueuedRequest(
            request=request,
            group=(request.tenant, request.prompt_task_ids),
            enqueued_at=now,
            deadline=limit if deadline is None else min(deadline, limit),
            future=asyncio.get_running_loop().create_future(),
            on_token=on_token,
        )
        self._enqueue(item)
        try:
            return await item.future
        except asyncio.CancelledError:
            self._discard(item)  # the caller went away: never compute it
            raise
        finally:
            self._in_flight[request.tenant] -= 1
            if not self._in_flight[request.tenant]:
                del self._in_flight[request.tenant]

    async def close(self, grace_s: float | None = None) -> None:
        """Refuse new requests; let queued and running ones finish for up to `grace_s`, then
        fail the rest with UNAVAILABLE."""
        self._closing = True
        grace = self.config.shutdown_grace_s if grace_s is None else grace_s
        end = self._clock() + grace
        while (self._queued or self._running) and self._clock() < end and self._worker is not None and not self._worker.done():
            await asyncio.sleep(0.01)
        for tenant in list(self._queues):
            for item in self._queues.pop(tenant):
                self._fail(item, UnavailableError("the replica shut down before running this request; retry it"))
        self._rotation.clear()
        self._queued = 0
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ admission
    def _admit(self, tenant: str) -> None:
        in_flight = self._in_flight.get(tenant, 0)
        refuse_if_over_limits(self.config, self._closing, self._queued, in_flight, tenant)
        self._in_flight[tenant] = in_flight + 1

    def _enqueue(self, item: QueuedRequest) -> None:
        if not (self._queued or self._running):
            self._progress_at = item.enqueued_at  # idle time is not a stall
        queue = self._queues.get(item.tenant)
        if queue is None:
            queue = self._queues[item.tenant] = deque()
            self._rotation.append(item.tenant)
        queue.append(item)
        self._queued += 1
        self._report_depth()
        self._arrived.set()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._work(), name="promptmux-batcher")

    def _discard(self, item: QueuedRequest) -> None:
        queue = self._queues.get(item.tenant)
        if queue is None or item.started_at is not None:
            return
        try:
            queue.remove(item)
        except ValueError:
            return
        self._queued -= 1
        if not queue:
            self._drop_tenant(item.tenant)
        self._report_depth()
        if self._observer is not None:
            self._observer.request_dropped(item, "CANCELLED")

    def _drop_tenant(self, tenant: str) -> None:
        del self._queues[tenant]
        self._rotation.remove(tenant)

    # ------------------------------------------------------------------ batching
    async def _work(self) -> None:
        while True:
            await self._wait_for_batch()
            try:
                batch = self._take_batch()
                if batch:
                    self._running = True
                    try:
                        await self._compute(batch)
                    finally:
                        self._running = False
            except Exception:  # a metrics or bookkeeping bug must not stop the replica serving
                log.exception("batcher iteration failed; continuing")

    async def _wait_for_batch(self) -> None:
        while not self._queued:
            self._arrived.clear()
            await self._arrived.wait()
        oldest = min(q[0].enqueued_at for q in self._queues.values())
        while self._queued < self.config.max_batch_size:
            remaining = oldest + self.config.batch_wait_timeout_s - self._clock()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _take_batch(self) -> list[QueuedRequest]:
        now = self._clock()
        batch = self._take_one_task(now) if self.config.batching == "per_task" else self._take_round_robin(now)
        self._report_depth()
        return batch

    def _take_round_robin(self, now: float) -> list[QueuedRequest]:
        batch: list[QueuedRequest] = []
        while len(batch) < self.config.max_batch_size and self._rotation:
            tenant = self._rotation[0]
            item = self._pop_head(tenant, now)
            if item is None:
                continue  # the tenant's queue held only dead requests and is gone
            batch.append(item)
            if tenant in self._queues:
                self._rotation.rotate(-1)  # next pick (and next batch) starts at the next tenant
        return batch

    def _take_one_task(self, now: float) -> list[QueuedRequest]:
        while self._rotation:
            tenant = self._rotation[0]
            first = self._pop_head(tenant, now)
            if first is None:
                continue
            batch = [first]
            queue = self._queues.get(tenant)
            if queue is None:
                return batch
            kept: deque[QueuedRequest] = deque()
            for item in queue:
                if item.future.done():
                    self._queued -= 1
                elif now > item.deadline:
                    self._queued -= 1
                    self._fail(item, expired_error(now - item.enqueued_at))
                elif item.group == first.group and len(batch) < self.config.max_batch_size:
                    self._queued -= 1
                    batch.append(item)
                else:
                    kept.append(item)
            if kept:
                self._queues[tenant] = kept
                self._rotation.rotate(-1)
            else:
                self._drop_tenant(tenant)
            return batch
        return []

    def _pop_head(self, tenant: str, now: float) -> QueuedRequest | None:
        """The tenant's oldest live request; expired ones fail on the way, cancelled ones vanish."""
        queue = self._queues[tenant]
        picked = None
        while queue:
            item = queue.popleft()
            self._queued -= 1
            if item.future.done():
                continue
            if now > item.deadline:
                self._fail(item, expired_error(now - item.enqueued_at))
                continue
            picked = item
            break
        if not queue:
            self._drop_tenant(tenant)
        return picked

    async def _compute(self, batch: list[QueuedRequest]) -> None:
        loop = asyncio.get_running_loop()
        started = self._clock()
        self._progress_at = started
        for item in batch:
            item.started_at = started
        sinks = {i: item.on_token for i, item in enumerate(batch) if item.on_token is not None}

        def on_token(index: int, token: int) -> None:  # runs on the engine thread
            sink = sinks.get(index)
            if sink is not None:
                loop.call_soon_threadsafe(sink, token)

        requests = [item.request for item in batch]
        try:
            try:
                output = await loop.run_in_executor(
                    self._executor, self._run_batch, requests, on_token if sinks else None
                )
            finally:
                self._progress_at = self._clock()
            if len(output.results) != len(batch):
                raise RuntimeError(f"the engine returned {len(output.results)} results for {len(batch)} requests")
        except asyncio.CancelledError:  # close() stopped waiting for this batch
            for item in batch:
                self._fail(item, UnavailableError("the replica shut down while running this request; retry it"))
            raise
        except Exception as error:  # the whole batch failed: every request learns why
            failure = error if isinstance(error, PromptmuxError) else PromptmuxError(
                f"the engine failed on a batch of {len(batch)} requests: {type(error).__name__}: {error}"
            )
            for item in batch:
                self._fail(item, failure, report=False)
            return
        compute_seconds = self._clock() - started
        for item, result in zip(batch, output.results):
            if item.future.done():
                continue  # the caller went away mid-batch
            if isinstance(result, BaseException):
                item.future.set_exception(result)
            else:
                item.future.set_result(result)
        if self._observer is not None:
            self._observer.batch_finished(batch, output.stats, compute_seconds)

    def _fail(self, item: QueuedRequest, error: PromptmuxError, report: bool = True) -> None:
        if not item.future.done():
            item.future.set_exception(error)
        if report and self._observer is not None:
            self._observer.request_dropped(item, error.status)

    def _report_depth(self) -> None:
        if self._observer is not None:
            self._observer.queue_depth(self._queued)
