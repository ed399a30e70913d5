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
to admit requests while a batch computes: each batch is one `StepPlan(static=...)` for the
static executor (engine/static_decoding.py), the boundary the step scheduler uses too.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from promptmux.prompts.errors import PromptmuxError, UnavailableError

from ..config import ServingConfig
from ..engine.plan import Executor, StepPlan
from .tenant_queues import QueuedRequest, TenantQueues, expired_error

log = logging.getLogger(__name__)


class Batcher(TenantQueues):
    def __init__(self, config: ServingConfig, executor: Executor, **kwargs) -> None:
        super().__init__(config, executor, **kwargs)
        self._arrived = asyncio.Event()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="promptmux-engine")
        self._worker: asyncio.Task | None = None
        self._running = False  # a batch is in the engine

    # ------------------------------------------------------------------ public
    def stalled_for(self, now: float | None = None) -> float:
        """Seconds since the engine last made progress (started or finished a batch) while
        work is queued or running; 0.0 when idle. The replica's health check reads this."""
        if not (self._queued or self._running):
            return 0.0
        now = self._clock() if now is None else now
        return max(0.0, now - self._progress_at)

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
        self._thread.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ admission
    def _enqueue(self, item: QueuedRequest) -> None:
        if not (self._queued or self._running):
            self._progress_at = item.enqueued_at  # idle time is not a stall
        self._push(item)
        self._report_depth()
        self._arrived.set()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._work(), name="promptmux-batcher")

    def _withdraw(self, item: QueuedRequest) -> None:
        if item.started_at is not None or not self._remove_queued(item):
            return
        self._report_depth()
        if self._observer is not None:
            self._observer.request_dropped(item, "CANCELLED")

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

    def _execute(self, plan: StepPlan, stream):
        """The executor's call, on the engine thread, its CPU time counted."""
        started = time.thread_time_ns()
        try:
            return self._executor.execute(plan, stream)
        finally:
            self.cpu_ns["execute"] += time.thread_time_ns() - started

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
        sinks = {item.handle: item.on_token for item in batch if item.on_token is not None}

        def stream(handle: int, token: int) -> None:  # runs on the engine thread
            loop.call_soon_threadsafe(sinks[handle], token)

        plan = StepPlan(static=tuple((item.handle, item.request) for item in batch))
        try:
            try:
                outputs = await loop.run_in_executor(self._thread, self._execute, plan, stream if sinks else None)
            finally:
                self._progress_at = self._clock()
            missing = [item for item in batch if item.handle not in outputs.finished and item.handle not in outputs.errors]
            if missing:
                raise RuntimeError(f"the engine returned no outcome for {len(missing)} of {len(batch)} requests")
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
        for item in batch:
            if item.future.done():
                continue  # the caller went away mid-batch
            if item.handle in outputs.errors:
                item.future.set_exception(outputs.errors[item.handle])
            else:
                item.future.set_result(outputs.finished[item.handle])
        if self._observer is not None:
            self._observer.batch_finished(batch, outputs.static, compute_seconds)
