"""Engine-level figures the suite explains its end-to-end results with, measured with
`Engine.run_batch` in this process (no batcher, no gRPC, no Ray):

- batch scaling: how throughput grows with batch size, the ceiling on what any batching
  policy can gain on a given model and machine;
- the mixing penalty: a batch whose rows all use different prompts against the same batch on
  one shared prompt (identical texts), alternated many times. Short alternating batches see
  the same machine, so their median ratio resolves what minutes-long server runs cannot on a
  shared CPU.

Sizes (and the two penalty batches) are measured in turn and repeated, so drift on a shared
machine hits each alike.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Sequence

from .workload import Popularity, RequestSampler, WorkloadSpec, build_tasks

SIZES = (1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class ScalingPoint:
    batch_size: int
    seconds_per_batch: float

    @property
    def requests_per_s(self) -> float:
        return self.batch_size / self.seconds_per_batch


@dataclass(frozen=True)
class MixingPenalty:
    batch_size: int
    distinct_prompts: int
    repeats: int
    single_s: list[float]  # seconds per batch, every repeat, one shared prompt
    mixed_s: list[float]  # the same texts, every row on its own prompt

    @property
    def median_ratio(self) -> float:
        """Mixed throughput over single-prompt throughput (time single / time mixed), by medians."""
        return statistics.median(self.single_s) / statistics.median(self.mixed_s)

    @property
    def best_ratio(self) -> float:
        return min(self.single_s) / min(self.mixed_s)


class EngineBench:
    """One engine on a private store, loaded once for every engine-level figure."""

    def __init__(self, model: dict[str, Any], engine: dict[str, Any], torch_threads: int | None = 1,
                 max_batch_size: int = 64) -> None:
        from ..engine_direct import DirectEngine

        self._direct = DirectEngine(
            model, {**engine, "max_batch_size": max(max_batch_size, engine.get("max_batch_size", 64))},
            torch_threads=torch_threads, seed=None,
        )
        self.engine = self._direct.engine

    def requests(self, workload: WorkloadSpec, count: int, seed: str = "engine-figures"):
        from promptmux.serving.engine.types import GenerationParams, GenerationRequest

        store, d_model = self.engine.store, self.engine.loaded.d_model
        known = {m.key for m in store.list()}
        for task in build_tasks(workload):
            if (task.tenant, task.task) not in known:
                store.register(task.tenant, task.task, task.prompt(d_model))
        self.engine.refresh_prompts()
        sampler = RequestSampler(workload, seed=seed)
        return [
            GenerationRequest(tenant=r.tenant, text=r.text, task=r.task,
                              params=GenerationParams(max_new_tokens=r.max_new_tokens))
            for r in (sampler.next() for _ in range(count))
        ]

    def _time(self, requests) -> float:
        start = time.perf_counter()
        self.engine.run_batch(requests)
        return time.perf_counter() - start

    def batch_scaling(self, workload: WorkloadSpec, sizes: Sequence[int] = SIZES, repeats: int = 3) -> list[ScalingPoint]:
        requests = self.requests(workload, max(sizes))
        self._time(requests)  # warm-up
        best = {size: float("inf") for size in sizes}
        for _ in range(repeats):
            for size in sizes:
                best[size] = min(best[size], self._time(requests[:size]))
        return [ScalingPoint(size, best[size]) for size in sizes]

    def mixing_penalty(self, workload: WorkloadSpec, batch_size: int = 64, repeats: int = 8) -> MixingPenalty:
        import dataclasses

        single = self.requests(dataclasses.replace(workload, tasks=1), batch_size)
        mixed = self.requests(dataclasses.replace(workload, tasks=batch_size, popularity=Popularity("cycle")), batch_size)
        self._time(single), self._time(mixed)  # warm-up, both prompts sets cached
        single_s, mixed_s = [], []
        for i in range(repeats):
            order = ((single, single_s), (mixed, mixed_s)) if i % 2 == 0 else ((mixed, mixed_s), (single, single_s))
            for requests, times in order:
                times.append(self._time(requests))
        return MixingPenalty(batch_size, len({r.task for r in mixed}), repeats, single_s, mixed_s)

    def close(self) -> None:
        self._direct.close()


def measure_batch_scaling(model: dict[str, Any], engine: dict[str, Any], workload: WorkloadSpec, *,
                          sizes: Sequence[int] = SIZES, repeats: int = 3, torch_threads: int | None = 1) -> list[ScalingPoint]:
    bench = EngineBench(model, engine, torch_threads, max(sizes))
    try:
        return bench.batch_scaling(workload, sizes, repeats)
    finally:
        bench.close()


def rate_at(points: Sequence[ScalingPoint], batch_size: float) -> float:
    """Requests/s at a (possibly fractional) batch size, interpolating seconds per batch."""
    ordered = sorted(points, key=lambda p: p.batch_size)
    if batch_size <= ordered[0].batch_size:
        return ordered[0].requests_per_s * batch_size / ordered[0].batch_size
    for low, high in zip(ordered, ordered[1:]):
        if batch_size <= high.batch_size:
            fraction = (batch_size - low.batch_size) / (high.batch_size - low.batch_size)
            seconds = low.seconds_per_batch + fraction * (high.seconds_per_batch - low.seconds_per_batch)
            return batch_size / seconds
    return ordered[-1].requests_per_s


def scaling_markdown(points: Sequence[ScalingPoint], description: str) -> str:
    base = points[0]
    lines = [
        "## Engine batch scaling",
        "",
        f"{description} Each batch size measured in turn, best of the repeats, engine-direct "
        "(`Engine.run_batch`, no batcher, no gRPC).",
        "",
        f"| batch size | ms per batch | requests/s | gain over batch {base.batch_size} |",
        "|---:|---:|---:|---:|",
    ]
    for p in points:
        lines.append(f"| {p.batch_size} | {p.seconds_per_batch * 1000:.0f} | {p.requests_per_s:.1f} | "
                     f"{p.requests_per_s / base.requests_per_s:.1f}x |")
    return "\n".join(lines) + "\n"


def penalty_markdown(penalty: MixingPenalty) -> str:
    ms = lambda values: ", ".join(f"{v * 1000:.0f}" for v in values)
    return "\n".join([
        "## Engine mixing penalty",
        "",
        f"A batch of {penalty.batch_size} requests on {penalty.distinct_prompts} different prompts against the same "
        f"texts on one shared prompt, alternated {penalty.repeats} times each, engine-direct. Mixed / single-prompt "
        f"throughput: **{penalty.median_ratio:.3f}** by median batch time ({penalty.best_ratio:.3f} by best).",
        "",
        f"- one shared prompt, ms per batch: {ms(penalty.single_s)}",
        f"- {penalty.distinct_prompts} prompts, ms per batch: {ms(penalty.mixed_s)}",
    ]) + "\n"
