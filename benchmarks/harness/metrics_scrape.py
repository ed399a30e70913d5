"""What the replica's batches did during a run, from a server's Prometheus endpoint.

A replica records histograms of batch size, distinct tasks per batch, engine time per batch
and, per tenant, time spent queued before compute (serving/replica/metrics.py); Ray exports them
prefixed `ray_`. Scraping every interval and taking the change of each series between
scrapes gives figures per interval, and over the whole run.

Ray (2.60) records a histogram observation as the midpoint of its bucket, so a histogram's
`_sum` is an estimate: a batch of 64 in the bucket (32, 64] adds 48. Hence:
- mean batch size is exact: completed requests (`promptmux_requests_total`, status OK) over
  batches (the batch-size histogram's `_count`, which is exact); over a run, that is, since
  within one scrape interval the two may land in different report cycles;
- distinct tasks per batch is estimated from the bucket counts, knowing the values are
  whole numbers (the bucket (2, 4] holds 3s and 4s: 3.5), so one task per batch reads 1;
- engine time per batch and queue wait are Ray's midpoint estimates (marked ≈ in reports).
Under continuous batching (serving/scheduling/step_scheduler.py) a "batch" is one decoder step: its
size (rows) and tasks come from the bucket counts, engine time is the step's, and queue wait
is the wait for admission into a slot.
Ray pushes replica metrics to its endpoint every `metrics_report_interval_ms` (10 s by
default; the harness's own server uses 1 s), so intervals shorter than that read as bursts.
"""
from __future__ import annotations

import asyncio
import logging
import math
import re
import time
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field

from .request_records import BatchSample, ServerStats

log = logging.getLogger(__name__)

# Histogram base names (without Ray's `ray_` prefix) -> the key they are summed under.
HISTOGRAMS = {
    "promptmux_batch_size": "batch_size",
    "promptmux_batch_distinct_tasks": "batch_tasks",
    "promptmux_batch_compute_seconds": "compute_s",
    "promptmux_queue_wait_seconds": "queue_wait_s",  # tagged by tenant
    "promptmux_step_seconds": "step_s",  # continuous batching: decoder steps only (phase="decode")
}
_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of every sample line in Prometheus' text format."""
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _LINE.match(line)
        if not match:
            continue
        name, _, labels, value = match.groups()
        try:
            number = float(value)
        except ValueError:
            continue
        samples.append((name, dict(_LABEL.findall(labels or "")), number))
    return samples


@dataclass
class Totals:
    """Cumulative series: histogram `_sum`/`_count` keyed (histogram, tenant or ""), cumulative
    bucket counts of the whole-number histograms, and completed requests."""

    sums: dict[tuple[str, str], float] = field(default_factory=lambda: defaultdict(float))
    counts: dict[tuple[str, str], float] = field(default_factory=lambda: defaultdict(float))
    buckets: dict[str, dict[float, float]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(float)))
    ok_requests: float = 0.0
    host_cpu_s: dict[str, float] = field(default_factory=lambda: defaultdict(float))  # replica CPU by part

    @property
    def batches(self) -> float:
        return self.counts.get(("batch_size", ""), 0.0)

    def minus(self, earlier: "Totals") -> "Totals":
        out = Totals(ok_requests=self.ok_requests - earlier.ok_requests)
        for part, value in self.host_cpu_s.items():
            out.host_cpu_s[part] = value - earlier.host_cpu_s.get(part, 0.0)
        for key, value in self.sums.items():
            out.sums[key] = value - earlier.sums.get(key, 0.0)
        for key, value in self.counts.items():
            out.counts[key] = value - earlier.counts.get(key, 0.0)
        for name, cumulative in self.buckets.items():
            before = earlier.buckets.get(name, {})
            for le, value in cumulative.items():
                out.buckets[name][le] = value - before.get(le, 0.0)
        return out

    def mean(self, histogram: str, tenant: str = "") -> float:
        count = self.counts.get((histogram, tenant), 0.0)
        return self.sums.get((histogram, tenant), 0.0) / count if count > 0 else float("nan")

    def whole_number_mean(self, histogram: str) -> float:
        """Mean of a histogram of whole numbers >= 1 from its buckets: the bucket (lo, hi]
        counts as the middle of the whole numbers it holds."""
        cumulative = sorted(self.buckets.get(histogram, {}).items())
        total, weighted, below, low = 0.0, 0.0, 0.0, 0.0
        for le, count in cumulative:
            n = count - below
            if n > 0 and math.isfinite(le):
                weighted += n * (math.floor(low) + 1 + math.floor(le)) / 2
                total += n
            elif n > 0:  # the +Inf bucket: above the last bound, count it at that bound
                weighted += n * low
                total += n
            below, low = count, le
        return weighted / total if total > 0 else float("nan")

    @property
    def continuous(self) -> bool:
        """A step scheduler's figures: a "batch" is one decoder step, whose rows are not
        requests (a request spans many steps), so batch size comes from the histogram."""
        return self.counts.get(("step_s", ""), 0.0) > 0

    def mean_compute_s(self) -> float:
        return self.mean("step_s") if self.continuous else self.mean("compute_s")

    def mean_batch_size(self) -> float:
        if self.continuous:
            return self.whole_number_mean("batch_size")
        if self.batches > 0 and self.ok_requests > 0:
            return self.ok_requests / self.batches
        return self.whole_number_mean("batch_size")


_GENERATE_METHODS = {"Generate", "GenerateStream", "GenerateBatch"}


def histogram_totals(text: str, application: str | None = None) -> Totals:
    """Totals over every replica (of one application, where the series carry that label)."""
    totals = Totals()
    for name, labels, value in parse_prometheus(text):
        if application is not None and labels.get("application", application) != application:
            continue
        base = name.removeprefix("ray_")
        if base == "promptmux_requests_total":
            if labels.get("status") == "OK" and labels.get("method") in _GENERATE_METHODS:
                totals.ok_requests += value
            continue
        if base == "promptmux_host_cpu_seconds_total":
            totals.host_cpu_s[labels.get("part", "")] += value
            continue
        for histogram, key in HISTOGRAMS.items():
            if base == f"{histogram}_sum":
                target = totals.sums
            elif base == f"{histogram}_count":
                target = totals.counts
            elif base == f"{histogram}_bucket" and key in ("batch_size", "batch_tasks"):
                totals.buckets[key][float(labels.get("le", "inf").replace("+Inf", "inf"))] += value
                continue
            else:
                continue
            if key == "step_s" and labels.get("phase") != "decode":
                continue
            tenant = labels.get("tenant", "") if key == "queue_wait_s" else ""
            target[(key, tenant)] += value
    return totals


def samples_from_totals(points: list[tuple[float, Totals]]) -> list[BatchSample]:
    """One sample per interval between consecutive scrapes that saw new batches."""
    out = []
    for (_, before), (at, after) in zip(points, points[1:]):
        delta = after.minus(before)
        if delta.batches <= 0:
            continue
        out.append(BatchSample(
            at=at,
            batches=int(round(delta.batches)),
            mean_batch_size=delta.mean_batch_size(),
            mean_distinct_tasks=delta.whole_number_mean("batch_tasks"),
            mean_compute_s=delta.mean_compute_s(),
        ))
    return out


def run_stats(points: list[tuple[float, Totals]]) -> ServerStats | None:
    """Means over the whole run: first scrape to last."""
    if len(points) < 2:
        return None
    delta = points[-1][1].minus(points[0][1])
    if delta.batches <= 0:
        return None
    tenants = sorted(t for (h, t) in delta.counts if h == "queue_wait_s" and t and delta.counts[(h, t)] > 0)
    return ServerStats(
        batches=int(round(delta.batches)),
        mean_batch_size=delta.mean_batch_size(),
        mean_distinct_tasks=delta.whole_number_mean("batch_tasks"),
        mean_compute_s=delta.mean_compute_s(),
        mean_queue_wait_s={t: delta.mean("queue_wait_s", t) for t in tenants},
        host_cpu_s={part: s for part, s in delta.host_cpu_s.items() if s > 0},
    )


def fetch(url: str, timeout_s: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return response.read().decode()


class PrometheusMonitor:
    """Scrapes a metrics URL every `interval_s` (in a thread) while a run goes on."""

    def __init__(self, url: str, application: str | None = None, interval_s: float = 1.0) -> None:
        self.url = url
        self.application = application
        self.interval_s = interval_s
        self._points: list[tuple[float, Totals]] = []
        self._task: asyncio.Task | None = None
        self._t0 = 0.0
        self.failures = 0
        self.stats: ServerStats | None = None

    async def start(self, t0: float) -> None:
        self._t0 = t0
        self._points = []
        await self._scrape_once()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> list[BatchSample]:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        # Ray reports with a delay: one more scrape after the run catches the last batches.
        await asyncio.sleep(self.interval_s * 1.5)
        await self._scrape_once()
        self.stats = run_stats(self._points)
        return samples_from_totals(self._points)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self._scrape_once()

    async def _scrape_once(self) -> None:
        try:
            text = await asyncio.to_thread(fetch, self.url)
        except Exception as error:  # a missing endpoint must not fail the benchmark
            self.failures += 1
            if self.failures == 1:
                log.warning("could not scrape %s (%s); batch figures will be empty", self.url, error)
            return
        self._points.append((time.monotonic() - self._t0, histogram_totals(text, self.application)))
