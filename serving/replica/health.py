"""A replica's health, as Ray Serve's `check_health` asks for it.

Serve calls `check_health` every `health_check_period_s`; after three failures in a row it
stops routing to the replica, stops it and starts a replacement. A replica is unhealthy when:

- its engine is stuck: work is queued or running, yet no batch has started or finished for
  `serving.engine_stall_timeout_s` (a wedged CUDA call, a batch blocked reading the store);
- its prompt store does not answer: listing the store's root fails, or takes longer than
  `serving.store_check_timeout_s` (an NFS mount that hangs).

The store probe runs in its own daemon thread, at most one at a time: a probe stuck in the
kernel cannot be interrupted, so later checks report it (still stuck, and for how long)
instead of piling up threads behind it.
"""
from __future__ import annotations

import asyncio
import os
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Callable, Protocol

from ..config import ServingConfig


class ReplicaUnhealthyError(RuntimeError):
    """Raised from check_health: Serve marks the replica unhealthy and replaces it."""


class StallClock(Protocol):
    """What the health check reads from the batcher (or the scheduler that replaces it)."""

    queue_depth: int

    def stalled_for(self, now: float | None = None) -> float: ...


def list_store_root(root: Path) -> None:
    """The store probe: one metadata round trip to the volume (stat plus a listing)."""
    os.stat(root)
    os.listdir(root)


class ReplicaHealth:
    def __init__(
        self,
        config: ServingConfig,
        engine: StallClock,
        store_root: str | Path,
        *,
        probe: Callable[[Path], None] = list_store_root,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._engine = engine
        self._store_root = Path(store_root)
        self._probe = probe
        self._clock = clock
        self._probe_future: Future | None = None
        self._probe_started = 0.0

    async def check(self) -> None:
        """Return if healthy; raise ReplicaUnhealthyError saying what is wrong otherwise."""
        self._check_engine()
        await self._check_store()

    def _check_engine(self) -> None:
        stalled = self._engine.stalled_for()
        limit = self._config.engine_stall_timeout_s
        if stalled > limit:
            raise ReplicaUnhealthyError(
                f"the engine has started or finished no batch for {stalled:.1f}s while requests wait "
                f"({self._engine.queue_depth} queued), over serving.engine_stall_timeout_s={limit}: a device "
                "call or a read of the prompt store is stuck. Serve replaces this replica; if batches are "
                "merely long, raise serving.engine_stall_timeout_s above the longest batch time"
            )

    async def _check_store(self) -> None:
        limit = self._config.store_check_timeout_s
        if self._probe_future is None or self._probe_future.done():
            self._probe_future = self._start_probe()
            self._probe_started = self._clock()
        future = self._probe_future
        remaining = self._probe_started + limit - self._clock()
        if not future.done() and remaining > 0:
            try:
                await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), remaining)
            except Exception:
                pass  # judged below, from the probe's own future
        if not future.done():
            waited = self._clock() - self._probe_started
            raise ReplicaUnhealthyError(
                f"listing the prompt store {self._store_root} has not returned after {waited:.1f}s "
                f"(serving.store_check_timeout_s={limit}): the volume is hung. Check the mount (NFS server, "
                "network) on this node"
            )
        error = future.exception()
        if error is not None:
            raise ReplicaUnhealthyError(
                f"the prompt store {self._store_root} cannot be listed: {error}. Check that the store volume "
                "is mounted at store.root on this node"
            ) from error

    def _start_probe(self) -> Future:
        future: Future = Future()

        def run() -> None:
            try:
                self._probe(self._store_root)
            except BaseException as error:  # handed to the awaiting check
                future.set_exception(error)
            else:
                future.set_result(None)

        threading.Thread(target=run, name="promptmux-store-probe", daemon=True).start()
        return future
