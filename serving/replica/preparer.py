"""Requests prepared off the event loop, on one thread of their own, in batches.

`Engine.prepare` (validate, tokenize, resolve the prompts, fill the host tier) is CPU work
proportional to the text, so it must not run on the event loop. Handing each request to a
thread pool (`asyncio.to_thread`) costs a pool hand-off, a future and a callback per request.
Here every request that arrived while the previous batch was being prepared goes into the next
batch: a burst costs one wake-up of the thread and one callback onto the loop, however many
requests it holds. The preparer also counts the CPU time it spends (`cpu_ns`), for the host-path
figures.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from typing import Callable

from promptmux.prompts.errors import UnavailableError

from ..engine.types import GenerationRequest, PreparedRequest

_Pending = tuple[GenerationRequest, asyncio.Future, asyncio.AbstractEventLoop]


class Preparer:
    def __init__(self, prepare: Callable[[GenerationRequest], PreparedRequest]) -> None:
        self._prepare = prepare
        self._pending: deque[_Pending] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.cpu_ns = 0  # CPU time of the preparing thread, read by the metrics flush
        self.prepared = 0

    async def prepare(self, request: GenerationRequest) -> PreparedRequest:
        """The prepared request; raises its PromptmuxError (or UNAVAILABLE after close)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            if self._closed:
                raise UnavailableError("this replica is shutting down and takes no new requests; retry it")
            self._pending.append((request, future, loop))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="promptmux-prepare", daemon=True)
                self._thread.start()
        self._wake.set()
        return await future

    def close(self) -> None:
        """Stop the thread once the requests already handed in are prepared."""
        with self._lock:
            self._closed = True
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            with self._lock:
                batch, self._pending = self._pending, deque()
                closed = self._closed
            if batch:
                self._prepare_batch(batch)
            if closed:
                with self._lock:
                    if not self._pending:
                        return
                self._wake.set()

    def _prepare_batch(self, batch: deque[_Pending]) -> None:
        started = time.thread_time_ns()
        settled: dict[asyncio.AbstractEventLoop, list] = {}
        for request, future, loop in batch:
            try:
                outcome: PreparedRequest | BaseException = self._prepare(request)
            except Exception as error:  # the request's own fault (or a bug it alone hit): it alone fails
                outcome = error
            settled.setdefault(loop, []).append((future, outcome))
        self.cpu_ns += time.thread_time_ns() - started
        self.prepared += len(batch)
        for loop, outcomes in settled.items():
            try:
                loop.call_soon_threadsafe(_settle, outcomes)
            except RuntimeError:  # that loop has closed: nobody waits for these any more
                pass


def _settle(outcomes: list) -> None:
    for future, outcome in outcomes:
        if future.done():
            continue  # the caller went away
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
