"""A running promptmux server, over gRPC (`grpc.aio`), as a benchmark target.

Every call sends `application: <name>` (Ray Serve's gRPC proxy routes by it) and each
tenant's own `authorization: Bearer <key>`: the key decides the tenant, so the harness needs
a key for every tenant of its workload. Requests are spread over a few channels so that
hundreds of concurrent calls are not limited by one HTTP/2 connection's stream cap.
"""
from __future__ import annotations

import asyncio
import time
from itertools import cycle
from typing import Mapping, Sequence

import grpc

from promptmux.prompts.records import content_hash
from promptmux.serving.rpc.convert import pb, tensor_to_pb
from promptmux.serving.rpc.proto_gen import promptmux_pb2_grpc

from .metrics_scrape import PrometheusMonitor
from .load_targets import BatchMonitor, Clock, Outcome, TargetInfo
from .workload import BenchRequest, TaskSpec

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # prompt uploads: 1000 rows x 4096 x 4 bytes is 16 MiB
REGISTER_CONCURRENCY = 8


class GrpcTarget:
    def __init__(
        self,
        address: str,
        keys: Mapping[str, str],
        *,
        application: str = "promptmux",
        metrics_url: str | None = None,
        channels: int = 4,
        request_timeout_s: float = 120.0,
        visible_timeout_s: float = 60.0,
    ) -> None:
        self.address = address
        self.keys = dict(keys)
        self.application = application
        self.metrics_url = metrics_url
        self.request_timeout_s = request_timeout_s
        self.visible_timeout_s = visible_timeout_s
        options = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
        # Distinct channel args keep grpc from folding the channels into one connection.
        self._channels = [
            grpc.aio.insecure_channel(address, options=[*options, ("promptmux.bench.channel", i)])
            for i in range(max(1, channels))
        ]
        self._stubs = [promptmux_pb2_grpc.PromptmuxStub(c) for c in self._channels]
        self._next_stub = cycle(self._stubs)

    # ------------------------------------------------------------------ helpers
    def metadata(self, tenant: str | None) -> tuple[tuple[str, str], ...]:
        md = [("application", self.application)]
        if tenant is not None:
            key = self.keys.get(tenant)
            if key is None:
                raise KeyError(
                    f"no API key for tenant {tenant!r}; give one per workload tenant (--key TENANT=KEY or a "
                    f"keys file), known tenants: {sorted(self.keys)}"
                )
            md.append(("authorization", f"Bearer {key}"))
        return tuple(md)

    def _stub(self):
        return next(self._next_stub)

    # ------------------------------------------------------------------ Target
    async def info(self) -> TargetInfo:
        reply = await self._stub().Health(pb.HealthRequest(), metadata=self.metadata(None), timeout=30)
        return TargetInfo(
            kind="grpc",
            description=f"gRPC {self.address}, application {self.application}",
            model=reply.model,
            d_model=reply.d_model,
            batching=reply.batching,
            extra={"status": reply.status, "queue_depth": reply.queue_depth},
            max_batch_size=reply.max_batch_size,
            dtype=reply.dtype,
        )

    async def wait_until_serving(self, timeout_s: float = 120.0) -> TargetInfo:
        end = time.monotonic() + timeout_s
        while True:
            try:
                info = await self.info()
                if info.extra.get("status") == "SERVING":
                    return info
            except grpc.aio.AioRpcError as error:
                if time.monotonic() > end:
                    raise TimeoutError(
                        f"the server at {self.address} (application {self.application!r}) did not answer Health "
                        f"within {timeout_s:.0f}s: {error.code().name} {error.details()}"
                    ) from error
            if time.monotonic() > end:
                raise TimeoutError(f"the server at {self.address} did not report SERVING within {timeout_s:.0f}s")
            await asyncio.sleep(0.25)

    async def ensure_prompts(self, tasks: Sequence[TaskSpec], d_model: int) -> int:
        by_tenant: dict[str, list[TaskSpec]] = {}
        for task in tasks:
            by_tenant.setdefault(task.tenant, []).append(task)
        missing: list[tuple[TaskSpec, object]] = []
        for tenant, owned in by_tenant.items():
            reply = await self._stub().ListPrompts(pb.ListPromptsRequest(), metadata=self.metadata(tenant), timeout=60)
            stored = {p.task: p.content_hash for p in reply.prompts}
            for task in owned:
                tensor = task.prompt(d_model)
                if stored.get(task.task) != content_hash(tensor):
                    missing.append((task, tensor))
        gate = asyncio.Semaphore(REGISTER_CONCURRENCY)

        async def register(task: TaskSpec, tensor) -> None:
            async with gate:
                request = pb.RegisterPromptRequest(
                    task=task.task, tensor=tensor_to_pb(tensor), description="promptmux bench workload prompt"
                )
                await self._stub().RegisterPrompt(request, metadata=self.metadata(task.tenant), timeout=60)

        await asyncio.gather(*(register(t, x) for t, x in missing))
        await self._wait_visible(by_tenant)
        return len(missing)

    async def _wait_visible(self, by_tenant: Mapping[str, Sequence[TaskSpec]]) -> None:
        """Until this application's replica lists every task (other apps sharing the store
        pick up new prompts on their next refresh)."""
        end = time.monotonic() + self.visible_timeout_s
        for tenant, owned in by_tenant.items():
            wanted = {t.task for t in owned}
            while True:
                reply = await self._stub().ListTasks(pb.ListTasksRequest(), metadata=self.metadata(tenant), timeout=60)
                absent = wanted - {t.task for t in reply.tasks}
                if not absent:
                    break
                if time.monotonic() > end:
                    raise TimeoutError(
                        f"{len(absent)} registered task(s) of tenant {tenant!r} (e.g. {sorted(absent)[0]!r}) are still "
                        f"not served by application {self.application!r} after {self.visible_timeout_s:.0f}s; is "
                        "its prompt store the one RegisterPrompt wrote to?"
                    )
                await asyncio.sleep(0.25)

    async def delete_prompts(self, tasks: Sequence[TaskSpec]) -> int:
        removed = 0
        for task in tasks:
            try:
                reply = await self._stub().DeletePrompt(
                    pb.DeletePromptRequest(task=task.task), metadata=self.metadata(task.tenant), timeout=60
                )
                removed += reply.versions_removed
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.NOT_FOUND:
                    raise
        return removed

    async def generate(self, request: BenchRequest, *, stream: bool, clock: Clock) -> Outcome:
        message = pb.GenerateRequest(
            task=request.task, text=request.text, params=pb.GenerationParams(max_new_tokens=request.max_new_tokens)
        )
        metadata = self.metadata(request.tenant)
        try:
            if not stream:
                reply = await self._stub().Generate(message, metadata=metadata, timeout=self.request_timeout_s)
                return Outcome("OK", output_tokens=reply.output_tokens, input_tokens=reply.input_tokens)
            first = None
            final = None
            async for part in self._stub().GenerateStream(message, metadata=metadata, timeout=self.request_timeout_s):
                if first is None and part.output_tokens:
                    first = clock()
                if part.done:
                    final = part.result
            if final is None:
                return Outcome("INTERNAL", error="the stream ended without its final `done` message")
            return Outcome("OK", final.output_tokens, final.input_tokens, first_token_at=first)
        except grpc.aio.AioRpcError as error:
            return Outcome(error.code().name, error=error.details() or "")

    def batch_monitor(self) -> BatchMonitor | None:
        if not self.metrics_url:
            return None
        return PrometheusMonitor(self.metrics_url, application=self.application)

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._channels))
