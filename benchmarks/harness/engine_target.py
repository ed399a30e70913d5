"""The engine in this process as a benchmark target: no gRPC, no Ray.

Requests go through the serving layer's own scheduler for the variant's `serving.batching`
(the StepScheduler over the step executor for continuous batching, the Batcher into
`Engine.run_batch` otherwise), so batches form exactly as on a replica and the difference
against a server run is the cost of gRPC and Ray Serve alone.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from promptmux.prompts.records import content_hash
from promptmux.serving.engine.core import Engine
from promptmux.prompts.errors import PromptmuxError
from promptmux.serving.config import ServingConfig
from promptmux.serving.scheduling import build_scheduler

from .request_records import BatchSample, ServerStats
from .load_targets import BatchMonitor, Clock, Outcome, TargetInfo
from .workload import BenchRequest, TaskSpec


@dataclass(frozen=True)
class _Batch:
    at: float  # when it finished (time.monotonic)
    size: int
    distinct_tasks: int
    compute_s: float
    waits: tuple[tuple[str, float], ...]  # (tenant, seconds queued before compute) per request


class _BatchLog:
    """The scheduler's observer: every batch (continuous batching: every decoder step), with
    its end time."""

    def __init__(self) -> None:
        self.batches: list[_Batch] = []
        self._admitted: list[tuple[str, float]] = []  # waits of requests admitted since the last step

    def admitted(self, items, stats) -> None:
        self._admitted.extend((item.tenant, item.started_at - item.enqueued_at) for item in items)

    def step_finished(self, stats) -> None:
        if stats.rows:
            waits, self._admitted = tuple(self._admitted), []
            self.batches.append(_Batch(time.monotonic(), stats.rows, stats.distinct_tasks, stats.seconds, waits))

    def first_token(self, item, seconds: float) -> None:
        pass

    def slots(self, active: int, freed) -> None:
        pass

    def batch_finished(self, batch, stats, compute_seconds: float) -> None:
        if stats.batch_size:
            waits = tuple((item.tenant, item.started_at - item.enqueued_at) for item in batch)
            self.batches.append(_Batch(time.monotonic(), stats.batch_size, stats.distinct_tasks, compute_seconds, waits))

    def request_dropped(self, item, error) -> None:
        pass

    def queue_depth(self, depth: int) -> None:
        pass


class EngineMonitor:
    """Batch samples per interval, and the run's means, from the engine's own batch log."""

    def __init__(self, log: _BatchLog, interval_s: float = 1.0) -> None:
        self._log = log
        self.interval_s = interval_s
        self._t0 = 0.0
        self._first = 0
        self.stats: ServerStats | None = None

    async def start(self, t0: float) -> None:
        self._t0 = t0
        self._first = len(self._log.batches)

    async def stop(self) -> list[BatchSample]:
        batches = self._log.batches[self._first:]
        self.stats = _stats(batches)
        buckets: dict[int, list[_Batch]] = {}
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


def _stats(batches: list[_Batch]) -> ServerStats | None:
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
    """One loaded engine, reused across runs; each run may use its own serving options."""

    def __init__(
        self, engine: Engine, serving: ServingConfig, *, model_name: str = "", batch_log: _BatchLog | None = None
    ) -> None:
        self.engine = engine
        self.model_name = model_name or engine.loaded.name
        self._log = batch_log or _BatchLog()
        self._serving = serving.resolved(engine.config.max_batch_size)
        self._batcher = None
        if serving.torch_threads:
            torch.set_num_threads(serving.torch_threads)

    def with_serving(self, serving: ServingConfig) -> "EngineTarget":
        """A target on the same engine with other batching options (a fresh batcher)."""
        return EngineTarget(self.engine, serving, model_name=self.model_name, batch_log=self._log)

    def _ensure_batcher(self):
        if self._batcher is None:
            self._batcher = build_scheduler(self._serving, self.engine, observer=self._log)
        return self._batcher

    async def info(self) -> TargetInfo:
        return TargetInfo(
            kind="engine",
            description="engine-direct (this process, the serving scheduler, no gRPC or Ray)",
            model=self.model_name,
            d_model=self.engine.loaded.d_model,
            batching=self._serving.batching,
            extra={"max_batch_size": self._serving.max_batch_size, "torch_threads": torch.get_num_threads()},
        )

    async def ensure_prompts(self, tasks: Sequence[TaskSpec], d_model: int) -> int:
        def register() -> int:
            store = self.engine.store
            stored = {m.key: m.content_hash for m in store.list()}
            count = 0
            for task in tasks:
                tensor = task.prompt(d_model)
                if stored.get((task.tenant, task.task)) != content_hash(tensor):
                    store.register(task.tenant, task.task, tensor, description="promptmux bench workload prompt")
                    count += 1
            self.engine.refresh_prompts()
            return count

        return await asyncio.to_thread(register)

    async def delete_prompts(self, tasks: Sequence[TaskSpec]) -> int:
        def delete() -> int:
            removed = sum(self.engine.store.delete(t.tenant, t.task) for t in tasks if self._exists(t))
            self.engine.refresh_prompts()
            return removed

        return await asyncio.to_thread(delete)

    def _exists(self, task: TaskSpec) -> bool:
        try:
            self.engine.store.meta(task.tenant, task.task)
            return True
        except PromptmuxError:
            return False

    async def generate(self, request: BenchRequest, *, stream: bool, clock: Clock) -> Outcome:
        from promptmux.serving.engine.types import GenerationParams, GenerationRequest

        first: list[float] = []

        def on_token(_token: int) -> None:
            if not first:
                first.append(clock())

        generation = GenerationRequest(
            tenant=request.tenant,
            text=request.text,
            task=request.task,
            params=GenerationParams(max_new_tokens=request.max_new_tokens),
        )
        try:
            prepared = self.engine.prepare(generation)  # once, as a replica does
            result = await self._ensure_batcher().submit(prepared, on_token=on_token if stream else None)
        except PromptmuxError as error:
            return Outcome(error.status, error=str(error))
        return Outcome("OK", result.output_tokens, result.input_tokens, first_token_at=first[0] if first else None)

    def batch_monitor(self) -> BatchMonitor | None:
        return EngineMonitor(self._log)

    async def close(self) -> None:
        if self._batcher is not None:
            await self._batcher.close(grace_s=0)
            self._batcher = None
