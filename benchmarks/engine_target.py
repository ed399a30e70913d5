"""The engine in this process as a benchmark target: no gRPC, no Ray.

Requests go through the serving layer's own Batcher (serving/batcher.py) into
`Engine.run_batch`, so batches form exactly as on a replica (same mode, size limit and wait)
and the difference against a server run is the cost of gRPC and Ray Serve alone.
"""
from __future__ import annotations

import asyncio
import time
from typing import Sequence

import torch

from promptmux.prompts.records import content_hash
from promptmux.serving.batcher import Batcher
from promptmux.serving.engine import Engine
from promptmux.serving.errors import PromptmuxError
from promptmux.serving.serving_config import ServingConfig

from .records import BatchSample
from .targets import BatchMonitor, Clock, Outcome, TargetInfo
from .workload import BenchRequest, TaskSpec


class _BatchLog:
    """The batcher's observer: every batch's size and distinct tasks, with its end time."""

    def __init__(self) -> None:
        self.batches: list[tuple[float, int, int]] = []

    def batch_finished(self, batch, stats, compute_seconds: float) -> None:
        if stats.batch_size:
            self.batches.append((time.monotonic(), stats.batch_size, stats.distinct_tasks))

    def request_dropped(self, item, status) -> None:
        pass

    def queue_depth(self, depth: int) -> None:
        pass


class EngineMonitor:
    """Batch samples per interval from the engine's own batch log."""

    def __init__(self, log: _BatchLog, interval_s: float = 1.0) -> None:
        self._log = log
        self.interval_s = interval_s
        self._t0 = 0.0
        self._first = 0

    async def start(self, t0: float) -> None:
        self._t0 = t0
        self._first = len(self._log.batches)

    async def stop(self) -> list[BatchSample]:
        buckets: dict[int, list[tuple[int, int]]] = {}
        for at, size, tasks in self._log.batches[self._first:]:
            buckets.setdefault(int((at - self._t0) // self.interval_s), []).append((size, tasks))
        return [
            BatchSample(
                at=(index + 1) * self.interval_s,
                batches=len(items),
                mean_batch_size=sum(s for s, _ in items) / len(items),
                mean_distinct_tasks=sum(t for _, t in items) / len(items),
            )
            for index, items in sorted(buckets.items())
        ]


class EngineTarget:
    """One loaded engine, reused across runs; each run may use its own serving options."""

    def __init__(
        self, engine: Engine, serving: ServingConfig, *, model_name: str = "", batch_log: _BatchLog | None = None
    ) -> None:
        self.engine = engine
        self.model_name = model_name or engine.loaded.name
        self._log = batch_log or _BatchLog()
        self._serving = serving.resolved(engine.config.max_batch_size)
        self._batcher: Batcher | None = None
        if serving.torch_threads:
            torch.set_num_threads(serving.torch_threads)

    def with_serving(self, serving: ServingConfig) -> "EngineTarget":
        """A target on the same engine with other batching options (a fresh batcher)."""
        return EngineTarget(self.engine, serving, model_name=self.model_name, batch_log=self._log)

    def _ensure_batcher(self) -> Batcher:
        if self._batcher is None:
            self._batcher = Batcher(self._serving, self.engine.run_batch, observer=self._log)
        return self._batcher

    async def info(self) -> TargetInfo:
        return TargetInfo(
            kind="engine",
            description="engine-direct (this process, serving Batcher, no gRPC or Ray)",
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
        from promptmux.serving.requests import GenerationParams, GenerationRequest

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
            self.engine.validate(generation)
            result = await self._ensure_batcher().submit(generation, on_token=on_token if stream else None)
        except PromptmuxError as error:
            return Outcome(error.status, error=str(error))
        return Outcome("OK", result.output_tokens, result.input_tokens, first_token_at=first[0] if first else None)

    def batch_monitor(self) -> BatchMonitor | None:
        return EngineMonitor(self._log)

    async def close(self) -> None:
        if self._batcher is not None:
            await self._batcher.close(grace_s=0)
            self._batcher = None
