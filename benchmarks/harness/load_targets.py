"""What the load generator talks to: a running server over gRPC (grpc_target.py), or the
engine in this process behind the same batcher (engine_target.py), with no gRPC and no Ray.
Both answer the same calls, so one workload and one load process measure either."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

from .request_records import BatchSample, ServerStats
from .workload import BenchRequest, TaskSpec

Clock = Callable[[], float]


@dataclass
class Outcome:
    """The answer to one request, as the load generator records it."""

    status: str  # "OK" or a gRPC status code name
    output_tokens: int = 0
    input_tokens: int = 0
    first_token_at: float | None = None  # clock time of the first streamed token
    error: str = ""


@dataclass(frozen=True)
class TargetInfo:
    kind: str  # "grpc" or "engine"
    description: str  # e.g. "gRPC 127.0.0.1:9000, application promptmux"
    model: str
    d_model: int
    batching: str
    extra: dict = field(default_factory=dict)
    max_batch_size: int = 0  # rows decoded at once (continuous batching: slots), as the target reports
    dtype: str = ""


class BatchMonitor(Protocol):
    """Watches engine batches during a run (the server's metrics, or the engine itself).
    After stop(), `stats` holds the run's means (None when no batch was seen)."""

    stats: ServerStats | None

    async def start(self, t0: float) -> None: ...

    async def stop(self) -> list[BatchSample]: ...


class Target(Protocol):
    async def info(self) -> TargetInfo: ...

    async def ensure_prompts(self, tasks: Sequence[TaskSpec], d_model: int) -> int:
        """Register every task's prompt the target lacks, wait until it serves them all;
        returns how many were registered."""

    async def generate(self, request: BenchRequest, *, stream: bool, clock: Clock) -> Outcome: ...

    def batch_monitor(self) -> BatchMonitor | None: ...

    async def delete_prompts(self, tasks: Sequence[TaskSpec]) -> int: ...

    async def close(self) -> None: ...
