"""Statistics of a benchmark run: percentiles, the summary of one run's records, CDF points.

Throughput is the rate of replies that arrived inside the measurement window (after the
warm-up, before the load stopped): the steady-state rate, not diluted by the start-up ramp
or the drain at the end, taken as the slope of the cumulative count (see completion_rate). Latency percentiles cover the
requests issued inside the window, including those that finished after it.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from .request_records import RequestRecord

PERCENTILES = (50, 90, 99)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q={q} is out of range; expected 0..100")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    fraction = position - low
    return ordered[low] + (ordered[high] - ordered[low]) * fraction


def cdf_points(values: Iterable[float]) -> tuple[list[float], list[float]]:
    """Sorted values and their cumulative fractions, for a step plot."""
    ordered = sorted(values)
    n = len(ordered)
    return ordered, [(i + 1) / n for i in range(n)]


@dataclass
class Summary:
    """The figures of one run (or one stream of a run) over its measurement window."""

    window_s: float
    issued: int  # requests issued inside the window
    completed: int  # of those, answered OK
    errors: dict[str, int] = field(default_factory=dict)  # status name -> count, issued in window
    throughput_rps: float = 0.0  # OK replies per second that arrived inside the window
    throughput_tps: float = 0.0  # generated tokens per second inside the window
    latency_s: dict[str, float] = field(default_factory=dict)  # p50, p90, p99, max, mean
    ttft_s: dict[str, float] = field(default_factory=dict)  # same keys, streaming runs only
    mean_output_tokens: float = math.nan
    mean_input_tokens: float = math.nan

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def to_dict(self) -> dict:
        return {
            "window_s": self.window_s,
            "issued": self.issued,
            "completed": self.completed,
            "errors": dict(self.errors),
            "throughput_rps": self.throughput_rps,
            "throughput_tps": self.throughput_tps,
            "latency_s": dict(self.latency_s),
            "ttft_s": dict(self.ttft_s),
            "mean_output_tokens": self.mean_output_tokens,
            "mean_input_tokens": self.mean_input_tokens,
        }


def completion_rate(times: Sequence[float], amounts: Sequence[float], window: float) -> float:
    """Amount per second completed, as the least-squares slope of the cumulative amount over
    completion time.

    Replies of one batch arrive together, so counting them in a fixed window is off by up to
    a whole batch depending on where the window's edges fall (a 64-request batch in an 8 s
    window moves req/s by 8 either way). The slope of the cumulative staircase does not
    depend on that phase. With fewer than three completion times, or completions that span
    less than half the window (one batch that took about as long as the window: the slope of
    a single stair is its height over a few milliseconds), it falls back to amount / window.
    """
    if len(set(times)) < 3 or (window > 0 and max(times) - min(times) < window / 2):
        return sum(amounts) / window if window > 0 else math.nan
    cumulative, total = [], 0.0
    for amount in amounts:
        total += amount
        cumulative.append(total)
    n = len(times)
    mean_t, mean_y = sum(times) / n, sum(cumulative) / n
    var_t = sum((t - mean_t) ** 2 for t in times)
    cov = sum((t - mean_t) * (y - mean_y) for t, y in zip(times, cumulative))
    return cov / var_t


def latency_figures(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {}
    figures = {f"p{q}": percentile(values, q) for q in PERCENTILES}
    figures["max"] = max(values)
    figures["mean"] = sum(values) / len(values)
    return figures


def summarize(records: Sequence[RequestRecord], window_start: float, window_end: float) -> Summary:
    """Summarize records whose times are seconds since the run started."""
    measured = [r for r in records if window_start <= r.issued_at < window_end]
    ok = [r for r in measured if r.ok]
    errors = Counter(r.status for r in measured if not r.ok)
    finished_in_window = sorted(
        (r for r in records if r.ok and window_start <= r.finished_at <= window_end), key=lambda r: r.finished_at
    )
    window = window_end - window_start
    if not finished_in_window and ok:
        # A run shorter than one reply (tiny tests): rate over the whole span instead.
        window = max(r.finished_at for r in ok) - window_start
        finished_in_window = sorted(ok, key=lambda r: r.finished_at)
    times = [r.finished_at for r in finished_in_window]
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    return Summary(
        window_s=window,
        issued=len(measured),
        completed=len(ok),
        errors=dict(sorted(errors.items())),
        throughput_rps=completion_rate(times, [1.0] * len(times), window),
        throughput_tps=completion_rate(times, [float(r.output_tokens) for r in finished_in_window], window),
        latency_s=latency_figures([r.latency_s for r in ok]),
        ttft_s=latency_figures(ttfts),
        mean_output_tokens=(sum(r.output_tokens for r in ok) / len(ok)) if ok else math.nan,
        mean_input_tokens=(sum(r.input_tokens for r in ok) / len(ok)) if ok else math.nan,
    )
