"""How the engine's throughput grows with batch size: the ceiling on what any batching policy
can gain on a given model and machine.

Batches of 1, 2, 4, ... requests (mixed tasks, the suite's workload) go straight to
`Engine.run_batch` in this process; sizes are measured in turn and repeated, and each keeps
its best time, so drift on a shared machine hits every size alike.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .workload import RequestSampler, WorkloadSpec, build_tasks

SIZES = (1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class ScalingPoint:
    batch_size: int
    seconds_per_batch: float

    @property
    def requests_per_s(self) -> float:
        return self.batch_size / self.seconds_per_batch


def measure_batch_scaling(
    model: dict[str, Any],
    engine: dict[str, Any],
    workload: WorkloadSpec,
    *,
    sizes: Sequence[int] = SIZES,
    repeats: int = 3,
    torch_threads: int | None = 1,
) -> list[ScalingPoint]:
    from promptmux.serving.config import PromptmuxConfig
    from promptmux.serving.engine import Engine
    from promptmux.serving.requests import GenerationParams, GenerationRequest

    if torch_threads:
        torch.set_num_threads(torch_threads)
    with tempfile.TemporaryDirectory(prefix="promptmux-scaling-") as root:
        config = PromptmuxConfig.from_dict({
            "model": dict(model),
            "store": {"root": str(Path(root)), "max_prompt_length": 1024},
            "engine": {**engine, "max_batch_size": max(max(sizes), engine.get("max_batch_size", 64))},
        })
        runner = Engine.from_config(config)
        for task in build_tasks(workload):
            runner.store.register(task.tenant, task.task, task.prompt(runner.loaded.d_model))
        runner.refresh_prompts()
        sampler = RequestSampler(workload, seed="scaling")
        requests = [
            GenerationRequest(tenant=r.tenant, text=r.text, task=r.task, params=GenerationParams(max_new_tokens=r.max_new_tokens))
            for r in (sampler.next() for _ in range(max(sizes)))
        ]
        runner.run_batch(requests[: max(sizes)])  # warm-up
        best = {size: float("inf") for size in sizes}
        for _ in range(repeats):
            for size in sizes:
                start = time.perf_counter()
                runner.run_batch(requests[:size])
                best[size] = min(best[size], time.perf_counter() - start)
    return [ScalingPoint(size, best[size]) for size in sizes]


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
