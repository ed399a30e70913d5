"""One record per benchmark request, written as JSON Lines (gzip-compressed for `.jsonl.gz`),
and what a run's batches did."""
from __future__ import annotations

import dataclasses
import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable


@dataclass
class RequestRecord:
    """What happened to one request. Times are seconds since the run started."""

    run: str  # run name within the scenario
    stream: str  # stream name within the run (one per tenant load process)
    tenant: str
    task: str
    prompt_length: int
    input_chars: int
    max_new_tokens: int
    issued_at: float
    finished_at: float
    status: str  # "OK" or a gRPC status code name
    warmup: bool = False  # issued during the warm-up; excluded from every figure
    output_tokens: int = 0
    input_tokens: int = 0
    ttft_s: float | None = None  # time to the first streamed token (GenerateStream only)
    error: str = ""  # the server's message, for failures

    @property
    def ok(self) -> bool:
        return self.status == "OK"

    @property
    def latency_s(self) -> float:
        return self.finished_at - self.issued_at


@dataclass(frozen=True)
class BatchSample:
    """Engine batches over one interval: from the server's metrics, or the engine itself."""

    at: float  # end of the interval, seconds since the run started
    batches: int
    mean_batch_size: float
    mean_distinct_tasks: float
    mean_compute_s: float = float("nan")  # engine time per batch


@dataclass(frozen=True)
class ServerStats:
    """Means over a whole run, as the replica (or the engine-direct batcher) saw it."""

    batches: int
    mean_batch_size: float
    mean_distinct_tasks: float
    mean_compute_s: float  # engine time per batch
    mean_queue_wait_s: dict[str, float] = field(default_factory=dict)  # by tenant: queued before compute
    # CPU seconds of the replica's own threads over the run, by part (promptmux_host_cpu_seconds):
    # prepare, schedule, execute, update. Empty for engine-direct runs and older servers.
    host_cpu_s: dict[str, float] = field(default_factory=dict)


def _open(path: Path, mode: str):
    """A text file, gzip-compressed when its name ends in `.gz`."""
    return gzip.open(path, mode + "t") if path.suffix == ".gz" else path.open(mode)


def write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with _open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row, sort_keys=True) + "\n")
            count += 1
    return count


def write_records(path: Path, records: Iterable[RequestRecord]) -> int:
    return write_jsonl(path, (dataclasses.asdict(r) for r in records))


def read_records(path: Path) -> list[RequestRecord]:
    with _open(Path(path), "r") as handle:
        return [RequestRecord(**json.loads(line)) for line in handle if line.strip()]
