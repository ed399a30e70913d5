"""The engine as a benchmark target: no gRPC, no Ray.

Requests go through the serving layer's own scheduler for the variant's `serving.batching`
(the StepScheduler over the step executor for continuous batching, the Batcher over the static
executor otherwise), so batches form exactly as on a replica and the difference against a
server run is the cost of gRPC and Ray Serve alone. The engine runs in a process of its own
(engine_host.py), so that it does not compete with the load generator for the GIL.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

from promptmux.serving.config import ServingConfig

from .engine_host import Batch, EngineHost
from .load_targets import BatchMonitor, Clock, Outcome, TargetInfo
from .request_records import BatchSample, ServerStats
from .workload import BenchRequest, TaskSpec


class EngineMonitor:
    """Batch samples per interval, and the run's means, from the engine process's batch log."""

    def __init__(self, host: EngineHost, interval_s: float = 1.0) -> None:
        self._host = host
        self.interval_s = interval_s
        self._t0 = 0.0
        self._first = 0
        self.stats: ServerStats | None = None

    async def start(self, t0: float) -> None:
        self._t0 = t0
        self._first = await self._host.call("batch_count")

    async def stop(self) -> list[BatchSample]:
        batches = await self._host.call("batches", self._first)
        self.stats = _stats(batches)
        buckets: dict[int, list[Batch]] = {}
        for batch in batches:
            buckets.setdefault(int((batch.at - self._t0) // self.interval_s), []).append(batch)
        return [
            BatchSample(
                at=(index + 1) * self.interval_s,
                batches=len(items),
                mean_batch_size=sum(b.size for b in items) / len(items),
                mean_distinct_tasks=sum(b.distinct_tasks for b in items) / len(items),
                mean_compute_s=sum(b.compute_s for b in items) / len(items),
            )
            for index, items in sorted(buckets.items())
        ]



def _stats(batches: list[Batch]) -> ServerStats | None:
    if not batches:
        return None
    waits: dict[str, list[float]] = {}
    for batch in batches:
        for tenant, seconds in batch.waits:
            waits.setdefault(tenant, []).append(seconds)
    n = len(batches)
    return ServerStats(
        batches=n,
        mean_batch_size=sum(b.size for b in batches) / n,
        mean_distinct_tasks=sum(b.distinct_tasks for b in batches) / n,
        mean_compute_s=sum(b.compute_s for b in batches) / n,
        mean_queue_wait_s={t: sum(v) / len(v) for t, v in sorted(waits.items())},
    )


class EngineTarget:
    """One engine process, reused across runs; each run may use its own serving options."""

    def __init__(self, host: EngineHost, serving: ServingConfig, *, torch_threads: int | None = None) -> None:
        self.host = host
        self.model_name = host.model_name
        self._serving = {f.name: getattr(serving, f.name) for f in dataclasses.fields(serving)
                         if f.name != "api_keys_file"}
        self._batching = serving.batching
        self._torch_threads = torch_threads
        self._ready = False

    def with_serving(self, serving: ServingConfig) -> "EngineTarget":
        """A target on the same engine with other batching options (a scheduler of its own)."""
        return EngineTarget(self.host, serving, torch_threads=self._torch_threads)

    async def _ensure_scheduler(self) -> None:
        if not self._ready:
            await self.host.call("serving", self._serving)
            self._ready = True

    async def info(self) -> TargetInfo:
        return TargetInfo(
            kind="engine",
            description="engine-direct (a process of its own, the serving scheduler, no gRPC or Ray)",
            model=self.model_name,
            d_model=self.host.d_model,
            batching=self._batching,
            extra={"max_batch_size": self._serving.get("max_batch_size"), "torch_threads": self._torch_threads},
            max_batch_size=self._serving.get("max_batch_size") or 0,
        )

    async def ensure_prompts(self, tasks: Sequence[TaskSpec], d_model: int) -> int:
        return await self.host.call("prompts", list(tasks))

    async def delete_prompts(self, tasks: Sequence[TaskSpec]) -> int:
        return await self.host.call("delete", list(tasks))

    async def generate(self, request: BenchRequest, *, stream: bool, clock: Clock) -> Outcome:
        await self._ensure_scheduler()
        first: list[float] = []
        status, output_tokens, input_tokens, error = await self.host.call(
            "generate", (self._serving, request.tenant, request.text, request.task, request.max_new_tokens, stream),
            on_first=(lambda: first.append(clock())) if stream else None,
        )
        if status != "OK":
            return Outcome(status, error=error)
        return Outcome("OK", output_tokens, input_tokens, first_token_at=first[0] if first else None)

    def batch_monitor(self) -> BatchMonitor | None:
        return EngineMonitor(self.host)

    async def close(self) -> None:
        pass  # the host outlives its targets: the environment stops it
