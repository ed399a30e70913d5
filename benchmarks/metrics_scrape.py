"""Batch size and tasks per batch over time, from a server's Prometheus endpoint.

A replica records `promptmux_batch_size` and `promptmux_batch_distinct_tasks` histograms
(serving/metrics.py); Ray exports them prefixed `ray_`. Scraping every interval and taking
the change in each histogram's `_sum` and `_count` gives the mean over that interval. Ray
pushes replica metrics to its endpoint every `metrics_report_interval_ms` (10 s by default;
the harness's own server uses 1 s), so intervals shorter than that read as bursts.
"""
from __future__ import annotations

import asyncio
import logging
import math
import re
import time
import urllib.request
from dataclasses import dataclass

from .records import BatchSample

log = logging.getLogger(__name__)

BATCH_SIZE = "promptmux_batch_size"
BATCH_TASKS = "promptmux_batch_distinct_tasks"
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


@dataclass(frozen=True)
class HistogramTotals:
    batches: float
    size_sum: float
    tasks_sum: float


def histogram_totals(text: str, application: str | None = None) -> HistogramTotals:
    """Totals of the batch histograms over every replica (of one application, if given)."""
    totals = {"size_count": 0.0, "size_sum": 0.0, "tasks_sum": 0.0}
    for name, labels, value in parse_prometheus(text):
        if application is not None and labels.get("application", application) != application:
            continue
        base = name.removeprefix("ray_")
        if base == f"{BATCH_SIZE}_count":
            totals["size_count"] += value
        elif base == f"{BATCH_SIZE}_sum":
            totals["size_sum"] += value
        elif base == f"{BATCH_TASKS}_sum":
            totals["tasks_sum"] += value
    return HistogramTotals(totals["size_count"], totals["size_sum"], totals["tasks_sum"])


def samples_from_totals(points: list[tuple[float, HistogramTotals]]) -> list[BatchSample]:
    """One sample per interval between consecutive scrapes that saw new batches."""
    out = []
    for (_, before), (at, after) in zip(points, points[1:]):
        batches = after.batches - before.batches
        if batches <= 0:
            continue
        out.append(
            BatchSample(
                at=at,
                batches=int(round(batches)),
                mean_batch_size=(after.size_sum - before.size_sum) / batches,
                mean_distinct_tasks=(after.tasks_sum - before.tasks_sum) / batches,
            )
        )
    return out


def fetch(url: str, timeout_s: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return response.read().decode()


class PrometheusMonitor:
    """Scrapes a metrics URL every `interval_s` in a thread while a run goes on."""

    def __init__(self, url: str, application: str | None = None, interval_s: float = 1.0) -> None:
        self.url = url
        self.application = application
        self.interval_s = interval_s
        self._points: list[tuple[float, HistogramTotals]] = []
        self._task: asyncio.Task | None = None
        self._t0 = 0.0
        self.failures = 0

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
        await asyncio.sleep(self.interval_s)
        await self._scrape_once()
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
                log.warning("could not scrape %s (%s); batch-size plots will be empty", self.url, error)
            return
        totals = histogram_totals(text, self.application)
        if not math.isfinite(totals.batches):
            return
        self._points.append((time.monotonic() - self._t0, totals))
