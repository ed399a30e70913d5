"""Prometheus metrics of a replica, through `ray.util.metrics`.

Ray exports them on its metrics export port (8080 in this project), prefixed `ray_`, with
Serve's own tags (application, deployment, replica) added. Tenant and task tags appear
only where the set is bounded by registered prompts: requests that fail authentication or
name an unknown task are counted with empty tags, so a caller cannot grow the series count
by sending made-up ids.
"""
from __future__ import annotations

from typing import Sequence

from ray.util.metrics import Counter, Gauge, Histogram

from .batcher import QueuedRequest
from .requests import BatchStats, GenerationRequest, GenerationResult

_LATENCY_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
_BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
_FRACTIONS = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
# Failures that happen before the request's ids are known to be real.
_UNTRUSTED_IDS = {"UNAUTHENTICATED", "NOT_FOUND", "INVALID_ARGUMENT", "PERMISSION_DENIED"}


def task_label(request: GenerationRequest) -> str:
    return "+".join(request.prompt_task_ids)


class ServingMetrics:
    """Every metric a replica records. Also the batcher's observer."""

    def __init__(self) -> None:
        self.requests = Counter(
            "promptmux_requests", "RPCs handled, by method and final status code",
            tag_keys=("method", "tenant", "task", "status"),
        )
        self.queue_wait = Histogram(
            "promptmux_queue_wait_seconds", "Time a request waited for its batch", boundaries=_LATENCY_S,
            tag_keys=("tenant",),
        )
        self.batch_compute = Histogram(
            "promptmux_batch_compute_seconds", "Engine time per batch (encode and decode)", boundaries=_LATENCY_S,
        )
        self.end_to_end = Histogram(
            "promptmux_request_latency_seconds", "Replica time per RPC, from arrival to reply",
            boundaries=_LATENCY_S, tag_keys=("method", "tenant"),
        )
        self.batch_size = Histogram("promptmux_batch_size", "Requests per engine batch", boundaries=_BATCH_SIZES)
        self.batch_tasks = Histogram(
            "promptmux_batch_distinct_tasks", "Distinct prompts per engine batch", boundaries=_BATCH_SIZES,
        )
        self.padding = Histogram(
            "promptmux_batch_padding_fraction", "Share of encoder positions that are padding", boundaries=_FRACTIONS,
        )
        self.input_tokens = Counter(
            "promptmux_input_tokens", "Input tokens of completed requests", tag_keys=("tenant", "task"),
        )
        self.output_tokens = Counter(
            "promptmux_output_tokens", "Generated tokens of completed requests", tag_keys=("tenant", "task"),
        )
        self.cache_hits = Counter("promptmux_prompt_cache_hits", "Prompt lookups served by the device cache")
        self.cache_misses = Counter("promptmux_prompt_cache_misses", "Prompt lookups loaded from host or disk")
        self.cache_evictions = Counter("promptmux_prompt_cache_evictions", "Prompts evicted from the device cache")
        self.depth = Gauge("promptmux_queue_depth", "Requests waiting for a batch on this replica")
        self.dropped = Counter(
            "promptmux_requests_dropped", "Requests dropped before compute: DEADLINE_EXCEEDED (waited too long), CANCELLED (the caller's deadline passed or it left), UNAVAILABLE (shutdown)", tag_keys=("status",),
        )

    # ------------------------------------------------------------------ per RPC
    def rpc_finished(
        self, method: str, tenant: str, task: str, status: str, seconds: float, *, count: bool = True
    ) -> None:
        """One RPC ended. `count=False` when its requests were counted one by one (GenerateBatch)."""
        if count:
            self.count(method, tenant, task, status)
        self.end_to_end.observe(seconds, tags={"method": method, "tenant": "" if status == "UNAUTHENTICATED" else tenant})

    def count(self, method: str, tenant: str, task: str, status: str) -> None:
        if status in _UNTRUSTED_IDS:
            task = ""
            if status == "UNAUTHENTICATED":
                tenant = ""
        self.requests.inc(1, tags={"method": method, "tenant": tenant, "task": task, "status": status})

    def tokens(self, request: GenerationRequest, result: GenerationResult) -> None:
        tags = {"tenant": request.tenant, "task": task_label(request)}
        self.input_tokens.inc(result.input_tokens, tags=tags)
        if result.output_tokens:
            self.output_tokens.inc(result.output_tokens, tags=tags)

    # ------------------------------------------------------------------ BatchObserver
    def batch_finished(self, batch: Sequence[QueuedRequest], stats: BatchStats, compute_seconds: float) -> None:
        for item in batch:
            self.queue_wait.observe(item.started_at - item.enqueued_at, tags={"tenant": item.tenant})
        self.batch_compute.observe(compute_seconds)
        if stats.batch_size:
            self.batch_size.observe(stats.batch_size)
            self.batch_tasks.observe(stats.distinct_tasks)
            self.padding.observe(stats.padding_fraction)
        for counter, value in (
            (self.cache_hits, stats.cache_hits),
            (self.cache_misses, stats.cache_misses),
            (self.cache_evictions, stats.cache_evictions),
        ):
            if value:
                counter.inc(value)

    def request_dropped(self, item: QueuedRequest, status: str) -> None:
        self.dropped.inc(1, tags={"status": status})

    def queue_depth(self, depth: int) -> None:
        self.depth.set(depth)
