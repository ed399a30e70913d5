"""The load generator: open-loop Poisson arrivals or closed-loop clients, on asyncio.

Open loop sends at exponentially distributed intervals whatever the server does, so a slow
server builds a queue (what real traffic does); latency counts from the scheduled arrival,
so a lagging client never hides server delay. Closed loop keeps N requests in flight, each
client sending its next request when the previous reply arrives: the way to find saturation
throughput.

A stream stops issuing at its duration or once it has issued its count of measured
requests (whichever comes first), then waits for its replies up to `drain_timeout_s` and
records the rest as CANCELLED. Requests issued during the warm-up are recorded with
`warmup=True` and left out of every figure.
"""
from __future__ import annotations

import asyncio
import math
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from tqdm import tqdm

from .request_records import RequestRecord
from .load_targets import Clock, Target
from .workload import RequestSampler


@dataclass(frozen=True)
class LoadSpec:
    """How one stream sends: `open` at `rate` requests/s, or `closed` with `concurrency` clients."""

    mode: str = "closed"
    rate: float | None = None
    concurrency: int | None = None
    duration_s: float | None = 10.0
    requests: int | None = None  # measured requests (issued after the warm-up)
    warmup_s: float = 2.0
    stream: bool = False  # GenerateStream (records time to first token) instead of Generate
    drain_timeout_s: float = 120.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("open", "closed"):
            raise ValueError(f"load.mode={self.mode!r} is unknown; expected 'open' (Poisson arrivals) or 'closed'")
        if self.mode == "open" and not (self.rate and self.rate > 0):
            raise ValueError(f"open-loop load needs rate > 0 requests/s, got rate={self.rate}")
        if self.mode == "closed" and not (self.concurrency and self.concurrency >= 1):
            raise ValueError(f"closed-loop load needs concurrency >= 1, got concurrency={self.concurrency}")
        if self.duration_s is None and self.requests is None:
            raise ValueError("a load stream needs a bound: set duration_s, requests, or both")
        if self.duration_s is not None and not self.duration_s > self.warmup_s:
            raise ValueError(f"duration_s={self.duration_s} must exceed warmup_s={self.warmup_s}")
        if self.requests is not None and self.requests < 1:
            raise ValueError(f"requests={self.requests} must be >= 1")
        if self.warmup_s < 0:
            raise ValueError(f"warmup_s={self.warmup_s} must be >= 0")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "LoadSpec":
        names = set(cls.__dataclass_fields__)
        unknown = set(raw) - names
        if unknown:
            raise ValueError(f"unknown load key(s) {sorted(unknown)}; valid keys are {sorted(names)}")
        return cls(**raw)

    def describe(self) -> str:
        how = f"open loop, Poisson {self.rate:g} req/s" if self.mode == "open" else f"closed loop, {self.concurrency} clients"
        bounds = []
        if self.duration_s is not None:
            bounds.append(f"{self.duration_s:g} s")
        if self.requests is not None:
            bounds.append(f"{self.requests} requests")
        return f"{how}, {' or '.join(bounds)}, warm-up {self.warmup_s:g} s"


def poisson_arrivals(rate: float, rng: random.Random) -> Iterator[float]:
    """Arrival times (seconds from 0) of a Poisson process: exponential gaps of mean 1/rate."""
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        yield t


@dataclass
class StreamPlan:
    name: str
    sampler: RequestSampler
    load: LoadSpec
    target: Target


@dataclass
class StreamResult:
    name: str
    records: list[RequestRecord]
    warmup_s: float
    stopped_at: float  # when the stream stopped issuing, seconds since the run started


@dataclass
class _Progress:
    ok: int = 0
    failed: int = 0
    bar: Any = None
    expected: int | None = None

    def done(self, record: RequestRecord) -> None:
        if record.ok:
            self.ok += 1
        else:
            self.failed += 1
        if self.bar is not None and self.expected is not None and not record.warmup:
            self.bar.update(1)


class _Stream:
    """One stream's driver, sharing the run's start time `t0`."""

    def __init__(self, plan: StreamPlan, run: str, t0: float, clock: Clock, progress: _Progress) -> None:
        self.plan = plan
        self.run = run
        self.t0 = t0
        self.clock = clock
        self.progress = progress
        self.records: list[RequestRecord] = []
        self.measured = 0
        self.stopped_at = 0.0

    def now(self) -> float:
        return self.clock() - self.t0

    def _may_issue(self, at: float) -> bool:
        load = self.plan.load
        if load.duration_s is not None and at >= load.duration_s:
            return False
        if at >= load.warmup_s and load.requests is not None and self.measured >= load.requests:
            return False
        return True

    async def _send(self, issued_at: float) -> None:
        load = self.plan.load
        request = self.plan.sampler.next()
        warmup = issued_at < load.warmup_s
        record = RequestRecord(
            run=self.run,
            stream=self.plan.name,
            tenant=request.tenant,
            task=request.task,
            prompt_length=request.prompt_length,
            input_chars=len(request.text),
            max_new_tokens=request.max_new_tokens,
            issued_at=issued_at,
            finished_at=math.nan,
            status="CANCELLED",
            warmup=warmup,
        )
        self.records.append(record)  # recorded first, so a request cut off by the drain still shows
        outcome = await self.plan.target.generate(request, stream=load.stream, clock=self.clock)
        record.finished_at = self.now()
        record.status = outcome.status
        record.output_tokens = outcome.output_tokens
        record.input_tokens = outcome.input_tokens
        record.error = outcome.error[:500]
        if outcome.first_token_at is not None:
            record.ttft_s = outcome.first_token_at - self.t0 - issued_at
        self.progress.done(record)

    def _claim(self, at: float) -> bool:
        """Whether a request may be issued at `at`; counts it when it is a measured one."""
        if not self._may_issue(at):
            return False
        if at >= self.plan.load.warmup_s:
            self.measured += 1
        return True

    async def run_closed(self) -> None:
        async def client() -> None:
            while True:
                at = self.now()
                if not self._claim(at):
                    return
                await self._send(at)

        clients = [asyncio.ensure_future(client()) for _ in range(self.plan.load.concurrency or 1)]
        await self._drain(clients, lambda: all(c.done() for c in clients) or self._stopped())

    def _stopped(self) -> bool:
        return not self._may_issue(self.now())

    async def run_open(self) -> None:
        load = self.plan.load
        rng = random.Random(f"arrivals/{load.seed}/{self.plan.name}")
        pending: set[asyncio.Future] = set()
        for at in poisson_arrivals(load.rate or 1.0, rng):
            if not self._claim(at):
                break
            delay = at - self.now()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.ensure_future(self._send(at))
            pending.add(task)
            task.add_done_callback(pending.discard)
        self.stopped_at = min(self.now(), load.duration_s or math.inf)
        await self._wait(list(pending))

    async def _drain(self, tasks: list[asyncio.Future], stopped: Callable[[], bool]) -> None:
        while not stopped():
            await asyncio.sleep(0.05)
        self.stopped_at = self.now()
        if self.plan.load.duration_s is not None:
            self.stopped_at = min(self.stopped_at, self.plan.load.duration_s)
        await self._wait(tasks)

    async def _wait(self, tasks: list[asyncio.Future]) -> None:
        if not tasks:
            return
        done, pending = await asyncio.wait(tasks, timeout=self.plan.load.drain_timeout_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # a harness or target bug, not a server answer
        for record in self.records:
            if math.isnan(record.finished_at):
                record.finished_at = self.now()  # cut off by the drain timeout: stays CANCELLED


async def run_streams(
    run: str, plans: list[StreamPlan], *, clock: Clock = time.monotonic, progress: bool = True,
    t0: float | None = None, label: str | None = None,
) -> list[StreamResult]:
    """Run every stream at once from a common start; returns each stream's records."""
    t0 = clock() if t0 is None else t0
    state = _Progress()
    streams = [_Stream(plan, run, t0, clock, state) for plan in plans]
    counted = [p.load.requests for p in plans]
    durations = [p.load.duration_s for p in plans]
    ticker = None
    if progress:
        if all(c is not None for c in counted) and not any(d is not None for d in durations):
            state.expected = sum(counted)  # type: ignore[arg-type]
            state.bar = tqdm(total=state.expected, desc=label or run, unit="req", leave=False)
        else:
            total = max(d for d in durations if d is not None)
            state.bar = tqdm(total=round(total), desc=label or run, unit="s", leave=False,
                             bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s {postfix}")
            ticker = asyncio.ensure_future(_tick(state, clock, t0, total))
    try:
        await asyncio.gather(*(s.run_open() if s.plan.load.mode == "open" else s.run_closed() for s in streams))
    finally:
        if ticker is not None:
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)
        if state.bar is not None:
            state.bar.close()
    return [StreamResult(s.plan.name, s.records, s.plan.load.warmup_s, s.stopped_at) for s in streams]


async def _tick(state: _Progress, clock: Clock, t0: float, total: float) -> None:
    while True:
        elapsed = min(clock() - t0, total)
        state.bar.n = elapsed
        state.bar.set_postfix_str(f"ok={state.ok} err={state.failed}", refresh=False)
        state.bar.refresh()
        await asyncio.sleep(0.5)
