"""What the batch-at-a-time Batcher and the step scheduler share: one queue per tenant, a
rotation over the tenants with queued requests, the admission bounds and the in-flight
bookkeeping of `submit`.

A subclass decides when queued requests run (`_enqueue` wakes its worker) and how a caller
that went away is taken back (`_withdraw`). Both drive an executor (engine/plan.py) with plans
and nothing else: a request reaches it as its handle and its prepared form.
"""
from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, ClassVar, Hashable, Protocol, Sequence

from promptmux.prompts.errors import (
    DeadlineExceededError,
    InvalidRequestError,
    PromptmuxError,
    ResourceExhaustedError,
    UnavailableError,
)

from ..config import ServingConfig
from ..engine.plan import Executor
from ..engine.types import BatchStats, GenerationResult, PreparedRequest

TokenSink = Callable[[int], None]  # called on the event loop with each new token id


class BatchObserver(Protocol):
    """What a scheduler reports, for metrics."""

    def batch_finished(self, batch: Sequence["QueuedRequest"], stats: BatchStats, compute_seconds: float) -> None: ...

    def request_dropped(self, item: "QueuedRequest", status: str) -> None: ...

    def queue_depth(self, depth: int) -> None: ...


def refuse_if_over_limits(config: ServingConfig, closing: bool, queued: int, in_flight: int, tenant: str) -> None:
    """The admission bounds: raises UNAVAILABLE or RESOURCE_EXHAUSTED."""
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


def refuse_batch_over_tenant_limit(config: ServingConfig, count: int) -> None:
    """The per-tenant limit for a GenerateBatch: more requests than one tenant may have in flight
    could never be admitted whole, so the call is INVALID_ARGUMENT before any item is queued."""
    limit = config.max_in_flight_per_tenant
    if count > limit:
        raise InvalidRequestError(
            f"GenerateBatch got {count} requests, more than one tenant may have in flight "
            f"(serving.max_in_flight_per_tenant={limit}); split it into calls of at most {limit}"
        )


def expired_error(waited_s: float) -> DeadlineExceededError:
    return DeadlineExceededError(
        f"the request waited {waited_s:.2f}s in the queue, past its deadline, and was dropped "
        "before compute; the server is overloaded: retry later, or add replicas"
    )


@dataclass(eq=False)
class QueuedRequest:
    request: PreparedRequest
    handle: int  # how plans name it (engine/plan.py)
    tenant: str
    group: Hashable  # (tenant, prompt ids): requests of one group may share a per_task batch
    enqueued_at: float
    deadline: float
    future: asyncio.Future
    on_token: TokenSink | None = None
    started_at: float | None = None


class TenantQueues:
    """Per-tenant FIFO queues and the admission bounds, for one event loop."""

    item_type: ClassVar[type[QueuedRequest]] = QueuedRequest

    def __init__(
        self,
        config: ServingConfig,
        executor: Executor,
        *,
        observer: BatchObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if config.max_batch_size is None:
            raise ValueError(f"{type(self).__name__} needs a resolved ServingConfig (call config.resolved(...) first)")
        self.config = config
        self._executor = executor
        self._handles = itertools.count()
        self._observer = observer
        self._clock = clock
        self._queues: dict[str, deque[QueuedRequest]] = {}
        self._rotation: deque[str] = deque()  # tenants with queued requests, next to serve first
        self._queued = 0
        self._in_flight: dict[str, int] = {}  # event loop only
        self._closing = False
        # When the engine last made progress, or work arrived while idle: what the replica's
        # health check measures a stall from.
        self._progress_at = clock()
        # CPU time (thread time, ns) of the engine thread's parts: deciding (schedule), the
        # executor (execute), delivering its outputs (update). Written by the engine thread
        # only; every key exists from the start, so a reader may copy it at any time.
        self.cpu_ns: dict[str, int] = {"schedule": 0, "execute": 0, "update": 0}

    @property
    def queue_depth(self) -> int:
        return self._queued

    @property
    def closing(self) -> bool:
        return self._closing

    def in_flight(self, tenant: str) -> int:
        return self._in_flight.get(tenant, 0)

    async def submit(
        self,
        request: PreparedRequest,
        *,
        on_token: TokenSink | None = None,
        deadline: float | None = None,
    ) -> GenerationResult:
        """Queue one request and wait for its result. Raises the request's PromptmuxError."""
        if not isinstance(request, PreparedRequest):
            raise TypeError(
                f"{type(self).__name__}.submit takes a PreparedRequest (Engine.prepare), got {type(request).__name__}; "
                "requests are prepared once, off the event loop, before they are queued"
            )
        tenant = request.tenant
        in_flight = self._in_flight.get(tenant, 0)
        refuse_if_over_limits(self.config, self._closing, self._queued, in_flight, tenant)
        self._in_flight[tenant] = in_flight + 1
        now = self._clock()
        limit = now + self.config.max_queue_wait_s
        item = self.item_type(
            request=request,
            handle=next(self._handles),
            tenant=tenant,
            group=(tenant, request.prompt_task_ids),
            enqueued_at=now,
            deadline=limit if deadline is None else min(deadline, limit),
            future=asyncio.get_running_loop().create_future(),
            on_token=on_token,
        )
        self._enqueue(item)
        try:
            return await item.future
        except asyncio.CancelledError:
            self._withdraw(item)  # the caller went away: never compute it
            raise
        finally:
            self._in_flight[tenant] -= 1
            if not self._in_flight[tenant]:
                del self._in_flight[tenant]

    # ------------------------------------------------------------------ for subclasses
    def _enqueue(self, item: QueuedRequest) -> None:
        raise NotImplementedError

    def _withdraw(self, item: QueuedRequest) -> None:
        raise NotImplementedError

    def _push(self, item: QueuedRequest) -> None:
        """Append to its tenant's queue; a tenant new to the rotation goes last."""
        queue = self._queues.get(item.tenant)
        if queue is None:
            queue = self._queues[item.tenant] = deque()
            self._rotation.append(item.tenant)
        queue.append(item)
        self._queued += 1

    def _remove_queued(self, item: QueuedRequest) -> bool:
        """Take a queued item out of its tenant's queue; False if it was not queued."""
        queue = self._queues.get(item.tenant)
        if queue is None or item not in queue:
            return False
        queue.remove(item)
        self._queued -= 1
        if not queue:
            self._drop_tenant(item.tenant)
        return True

    def _drop_tenant(self, tenant: str) -> None:
        del self._queues[tenant]
        self._rotation.remove(tenant)

    def _fail(self, item: QueuedRequest, error: PromptmuxError, report: bool = True) -> None:
        if not item.future.done():
            item.future.set_exception(error)
        if report and self._observer is not None:
            self._observer.request_dropped(item, error.status)

    def _report_depth(self) -> None:
        if self._observer is not None:
            self._observer.queue_depth(self._queued)
