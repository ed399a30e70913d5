"""One replica of the service: a frozen model, its engine, the scheduler, and the RPCs.

The class is plain Python. Serve deploys it as it is (`serve.deployment(PromptmuxServer)
.bind(config)`, serving/replica/app.py) and it builds its parts from the config inside the
replica's process (a model is not shipped through `bind`); tests and other hosts may hand it
parts of their own (`ReplicaParts`). Its methods carry the RPC names of
serving/rpc/promptmux.proto, so Ray Serve's gRPC proxy routes each call here with the
caller's metadata in `grpc_context`.

Errors: each PromptmuxError becomes its gRPC status code with its message as details, set on
`grpc_context` (the proxy copies both to the client). Unary methods then return an empty
reply; the streaming method raises, which Serve turns into the same status. One wrapper
(`rpc`, `_Observed`) does this, and the metrics, for every RPC.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

import grpc

from promptmux.prompts.records import Registration

from .access_log import AccessLog
from .auth import KeyRing, Principal, require_owner_or_admin
from ..config import API_KEYS_ENV, AppConfig
from ..engine.core import Engine
from promptmux.prompts.errors import InvalidRequestError, PermissionDeniedError, PromptmuxError
from ..rpc.convert import (
    batch_item_to_pb,
    pb,
    prompt_info_to_pb,
    prompt_owner_from_pb,
    prompt_task_from_pb,
    register_item_to_pb,
    reply_to_pb,
    request_from_pb,
    request_message,
    score_reply_to_pb,
    score_request_from_pb,
    similar_reply_to_pb,
    similar_request_from_pb,
    stream_delta_to_pb,
    stream_final_to_pb,
    task_info_to_pb,
    tensor_from_pb,
)
from .health import ReplicaHealth
from .metrics import ServingMetrics, task_label
from ..rpc.pagination import page
from .preparer import Preparer
from .prompt_admin import PromptAdmin
from ..scheduling import build_scheduler
from ..rpc.streaming import TextDeltas
from .task_similarity import TaskSimilarity
from ..scheduling.tenant_queues import refuse_batch_over_tenant_limit

log = logging.getLogger(__name__)

# Trailing metadata on every unary reply: which replica answered.
REPLICA_METADATA = "promptmux-replica"
_REPLICA_ID = f"{socket.gethostname()}:{os.getpid()}"
MAX_PROMPTS_PER_REGISTER_CALL = 1000  # serving/rpc/promptmux.proto, RegisterPromptsRequest.prompts


class _Call:
    """What the metrics need to know about one RPC."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.started = time.perf_counter()
        self.tenant = ""
        self.task = ""
        self.status = "OK"


def _reject(call: _Call, grpc_context, error: PromptmuxError) -> None:
    call.status = error.status
    grpc_context.set_code(getattr(grpc.StatusCode, error.status, grpc.StatusCode.INTERNAL))
    grpc_context.set_details(str(error))


def _internal(method: str, error: Exception) -> PromptmuxError:
    log.exception("%s failed", method, exc_info=error)
    return PromptmuxError(
        f"internal error in {method} ({type(error).__name__}); the replica log has the traceback"
    )


class _Observed:
    """The one error and metrics handling of every RPC, unary or streaming.

    A PromptmuxError becomes the call's status and details, any other exception INTERNAL with
    the traceback logged; a cancelled call is CANCELLED. A unary call then returns its empty
    reply (the error suppressed here); a streaming one raises, which Serve turns into the same
    status. Either way the call's metrics are recorded once, on the way out."""

    def __init__(self, server: "PromptmuxServer", call: _Call, grpc_context, *, streaming: bool) -> None:
        self._server, self._call, self._context, self._streaming = server, call, grpc_context, streaming

    def __enter__(self) -> _Call:
        return self._call

    def __exit__(self, kind, error, traceback) -> bool:
        call = self._call
        try:
            if error is None or not isinstance(error, (Exception, asyncio.CancelledError)):
                return False  # finished, or a generator closed early (GeneratorExit): no status to set
            if isinstance(error, asyncio.CancelledError):  # the caller's deadline passed or it went away
                call.status = "CANCELLED"
                return False
            if isinstance(error, PromptmuxError):
                _reject(call, self._context, error)
                return not self._streaming
            failure = _internal(call.method, error)
            _reject(call, self._context, failure)
            if self._streaming:
                raise failure from error
            return True
        finally:
            # A GenerateBatch or RegisterPrompts that ran counted each item already; one that
            # failed whole did not.
            itemized = call.method in ("GenerateBatch", "RegisterPrompts") and call.status == "OK"
            seconds = time.perf_counter() - call.started
            self._server._metrics.rpc_finished(call.method, call.tenant, call.task, call.status, seconds,
                                               count=not itemized)
            self._server._access.record("grpc", call.method, call.tenant, call.status, seconds)


def rpc(reply_type: Callable[[], Any] | None = None):
    """Turn `method(self, request, grpc_context, call)` into a Serve gRPC handler: a coroutine
    for a unary RPC (returns `reply_type()` after an error), or an async generator for a
    server-streaming one. Both decode the request bytes and go through `_Observed`."""

    def wrap(method: Callable[..., Any]):
        if inspect.isasyncgenfunction(method):
            async def handler(self: "PromptmuxServer", request, grpc_context):
                call = _Call(method.__name__)
                with _Observed(self, call, grpc_context, streaming=True):
                    async for reply in method(self, request_message(call.method, request), grpc_context, call):
                        yield reply
        else:
            async def handler(self: "PromptmuxServer", request, grpc_context):
                call = _Call(method.__name__)
                grpc_context.set_trailing_metadata([(REPLICA_METADATA, _REPLICA_ID)])
                with _Observed(self, call, grpc_context, streaming=False):
                    return await method(self, request_message(call.method, request), grpc_context, call)
                return reply_type()

        handler.__name__ = method.__name__
        handler.__doc__ = method.__doc__
        return handler

    return wrap


@dataclass
class ReplicaParts:
    """What a replica serves with besides its config: built from the config inside the replica
    (`from_config`), or handed in by a test or another host."""

    engine: Engine
    prompts: PromptAdmin
    similarity: TaskSimilarity
    keys: KeyRing

    @classmethod
    def from_config(cls, config: AppConfig) -> "ReplicaParts":
        import torch

        from ..demo.prompts import seed_demo_prompts_if_embedded

        serving = config.serving
        # The path was resolved where the app was built; a replica's own environment may name it too.
        keys_file = serving.api_keys_file or os.environ.get(API_KEYS_ENV)
        if not keys_file:
            raise ValueError(
                f"no API key file: set serving.api_keys_file or ${API_KEYS_ENV} (the service never runs "
                "without authentication; `promptmux serve` makes a demo key file for local use)"
            )
        if serving.torch_threads:
            torch.set_num_threads(serving.torch_threads)
        keys = KeyRing.from_file(keys_file)
        engine = Engine.from_config(config.promptmux)
        # Replicas seed too (KubeRay starts no `promptmux serve`); two replicas racing at most
        # register the same content twice.
        seed_demo_prompts_if_embedded(config.promptmux.model, engine.store)
        engine.refresh_prompts()
        return cls(
            engine=engine,
            prompts=PromptAdmin(engine.store, engine.tasks),
            similarity=TaskSimilarity(engine.loaded, engine.store, config.promptmux.task_embedding),
            keys=keys,
        )


class PromptmuxServer:
    """A replica: one frozen model shared by every tenant and task.

    Its parts (the engine, prompt administration, task similarity and the API key ring) are
    built from the config unless they are given."""

    def __init__(self, config: AppConfig, parts: ReplicaParts | None = None) -> None:
        serving = config.serving
        parts = parts if parts is not None else ReplicaParts.from_config(config)
        self._config = config
        self._keys = parts.keys
        self._engine = parts.engine
        self._prompts = parts.prompts
        self._similarity = parts.similarity
        self._metrics = ServingMetrics()
        self._access = AccessLog(serving.access_log)
        # serving.batching: the step scheduler (continuous) or the batch-at-a-time Batcher.
        self._scheduler = build_scheduler(serving, self._engine, observer=self._metrics)
        self._preparer = Preparer(self._engine.prepare)
        self._health = ReplicaHealth(serving, self._scheduler, config.promptmux.store.root)
        self._stop = threading.Event()
        self._refresher = threading.Thread(target=self._refresh_loop, name="promptmux-refresh", daemon=True)
        self._refresher.start()
        self._key_reloader = threading.Thread(target=self._key_reload_loop, name="promptmux-keys", daemon=True)
        self._key_reloader.start()
        log.info("replica ready: model %s, %d API keys, batching %s", config.promptmux.model.source,
                 len(self._keys), serving.batching)

    # ------------------------------------------------------------------ background
    def _refresh_loop(self) -> None:
        """Pick up prompts other replicas registered or deleted."""
        interval = self._config.promptmux.store.refresh_interval_s
        tiers_published: dict = {}
        cpu_published: dict = {}
        while not self._stop.wait(interval):
            try:
                self._engine.refresh_prompts()
                tiers_published = self._metrics.prompt_tiers(self._engine.bank.tier_stats(), tiers_published)
                cpu = {**self._scheduler.cpu_ns, "prepare": self._preparer.cpu_ns}
                cpu_published = self._metrics.host_cpu_parts(cpu, cpu_published)
            except Exception:  # a transient store error must not end refreshing
                log.exception("refreshing prompts failed; retrying in %.1fs", interval)

    def _key_reload_loop(self) -> None:
        """Pick up rotated keys, on its own thread: a slow or failing prompt store never holds
        back key rotation (reload_if_changed logs a file it cannot use)."""
        interval = self._config.promptmux.store.refresh_interval_s
        while not self._stop.wait(interval):
            try:
                self._keys.reload_if_changed()
            except Exception:
                log.exception("reloading the API key file failed; retrying in %.1fs", interval)

    async def check_health(self) -> None:
        """Serve calls this every health_check_period_s; raising marks the replica unhealthy, and
        Serve replaces it (serving/replica/health.py: a stalled engine, a hung or missing store)."""
        await self._health.check()

    async def shutdown(self) -> None:
        """Refuse new work (UNAVAILABLE), let queued work finish within serving.shutdown_grace_s."""
        self._stop.set()
        self._preparer.close()
        await self._scheduler.close()

    def __del__(self):
        # Serve calls __del__ on shutdown from the replica's event loop and awaits what it
        # returns. Plain garbage collection (no running loop) has nothing to drain.
        stop = getattr(self, "_stop", None)
        if stop is None:
            return None  # __init__ failed before anything started
        stop.set()
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return None
        return self.shutdown()

    # ------------------------------------------------------------------ helpers
    def _authenticate(self, grpc_context, call: _Call) -> Principal:
        principal = self._keys.authenticate(grpc_context.invocation_metadata())
        call.tenant = principal.tenant
        return principal

    def _authorize_owner(self, request, grpc_context, call: _Call, action: str, *, with_task: bool = True):
        """The preamble of every prompt RPC: who calls, whose prompts (the request's tenant, or the
        caller's own), which task; the caller must be that owner or an admin."""
        principal = self._authenticate(grpc_context, call)
        owner = prompt_owner_from_pb(request, principal.tenant)
        task = prompt_task_from_pb(request) if with_task else ""
        call.task = task
        require_owner_or_admin(principal, owner, action)
        return principal, owner, task

    async def _prepare(self, request_pb, principal: Principal, call: _Call | None, convert=request_from_pb):
        """The engine request of a GenerateRequest (or, with `convert`, a ScoreRequest),
        validated and tokenized once, off the event loop (the preparer's thread, in batches),
        before it takes a queue place: (request, prepared)."""
        request = convert(request_pb, principal.tenant)
        if call is not None:
            call.task = task_label(request)
        return request, await self._preparer.prepare(request)

    async def _generate_one(self, request_pb, principal: Principal, call: _Call | None = None):
        request, prepared = await self._prepare(request_pb, principal, call)
        result = await self._scheduler.submit(prepared)
        self._metrics.tokens(request, result)
        return result

    # ------------------------------------------------------------------ generation RPCs
    @rpc(pb.GenerateReply)
    async def Generate(self, request, grpc_context, call: _Call):
        principal = self._authenticate(grpc_context, call)
        return reply_to_pb(await self._generate_one(request, principal, call))

    @rpc()
    async def GenerateStream(self, request, grpc_context, call: _Call) -> AsyncIterator[Any]:
        principal = self._authenticate(grpc_context, call)
        generation, prepared = await self._prepare(request, principal, call)
        tokens: asyncio.Queue[int | None] = asyncio.Queue()
        job = asyncio.ensure_future(self._scheduler.submit(prepared, on_token=tokens.put_nowait))
        job.add_done_callback(lambda _: tokens.put_nowait(None))  # after every token: they come first
        deltas = TextDeltas(self._engine.detokenize, prepared.params.stop)
        try:
            finished = False
            while not finished:
                new = [await tokens.get()]
                while not tokens.empty():
                    new.append(tokens.get_nowait())  # under load, several tokens share one message
                if new[-1] is None:
                    finished, new = True, new[:-1]
                delta = deltas.push(new) if new else ""
                if delta:
                    yield stream_delta_to_pb(delta, deltas.token_count)
            result = job.result()
        finally:
            job.cancel()  # no-op once done; drops the request if the client went away
        self._metrics.tokens(generation, result)
        yield stream_final_to_pb(deltas.finish(result.text), result)

    @rpc(pb.GenerateBatchReply)
    async def GenerateBatch(self, request, grpc_context, call: _Call):
        principal = self._authenticate(grpc_context, call)
        refuse_batch_over_tenant_limit(self._config.serving, len(request.requests))

        async def one(item):
            try:
                result = await self._generate_one(item, principal)
                status = "OK"
            except PromptmuxError as error:
                result, status = error, error.status
            self._metrics.count(call.method, principal.tenant, item.task, status)
            return result

        outcomes = await asyncio.gather(*(one(item) for item in request.requests))
        return pb.GenerateBatchReply(items=[batch_item_to_pb(o) for o in outcomes])

    @rpc(pb.ScoreReply)
    async def Score(self, request, grpc_context, call: _Call):
        principal = self._authenticate(grpc_context, call)
        scored, prepared = await self._prepare(request, principal, call, convert=score_request_from_pb)
        result = await self._scheduler.submit(prepared)
        self._metrics.tokens(scored, result)
        return score_reply_to_pb(result)

    # ------------------------------------------------------------------ prompt RPCs
    @rpc(pb.PromptInfo)
    async def RegisterPrompt(self, request, grpc_context, call: _Call):
        principal = self._authenticate(grpc_context, call)
        call.task = prompt_task_from_pb(request)
        # Shape, dtype and d_model are checked from the declared shape before any byte is
        # copied; the copy, the store's checks and the index update run off the event loop.
        outcome = (await asyncio.to_thread(self._register, [self._registration(principal, request)]))[0]
        if isinstance(outcome, PromptmuxError):
            raise outcome
        return prompt_info_to_pb(outcome)

    @rpc(pb.RegisterPromptsReply)
    async def RegisterPrompts(self, request, grpc_context, call: _Call):
        principal = self._authenticate(grpc_context, call)
        if len(request.prompts) > MAX_PROMPTS_PER_REGISTER_CALL:
            raise InvalidRequestError(
                f"RegisterPrompts got {len(request.prompts)} prompts, more than {MAX_PROMPTS_PER_REGISTER_CALL} in one "
                f"call; split it into calls of at most {MAX_PROMPTS_PER_REGISTER_CALL}"
            )
        items: list = []
        for item in request.prompts:
            try:
                items.append(self._registration(principal, item))
            except PromptmuxError as error:
                items.append(error)
        outcomes = await asyncio.to_thread(self._register, items)
        for item, outcome in zip(request.prompts, outcomes):
            self._metrics.count(call.method, principal.tenant, item.task, getattr(outcome, "status", "OK"))
        return pb.RegisterPromptsReply(items=[register_item_to_pb(o) for o in outcomes])

    def _registration(self, principal: Principal, request) -> Callable[[], Registration]:
        """The checks of one registration that need no copy of its tensor; returns what builds it."""
        owner, task = prompt_owner_from_pb(request, principal.tenant), prompt_task_from_pb(request)
        require_owner_or_admin(principal, owner, "register")
        if request.publish and not principal.admin:
            raise PermissionDeniedError(
                f"tenant {principal.tenant!r} may not publish task ids in the global namespace (publish=true "
                "needs an admin key); set shared=true instead and other tenants call it as "
                f"'{owner}/{task}'"
            )
        prompts = self._prompts
        prompts.check_description(owner, request.description)  # before copying the tensor
        return lambda: Registration(
            owner, task, tensor_from_pb(request.tensor, d_model=prompts.d_model, max_length=prompts.max_length),
            shared=request.shared, publish=request.publish, description=request.description,
        )

    def _register(self, items: list) -> list:
        """Copy each tensor, store the group, and make it usable on this replica at once (other
        replicas within a refresh). `items`: builders from _registration, or an item's error."""
        outcomes: list = list(items)
        built: list[tuple[int, Registration]] = []
        for i, item in enumerate(items):
            if isinstance(item, PromptmuxError):
                continue
            try:
                built.append((i, item()))
            except PromptmuxError as error:
                outcomes[i] = error
        stored = self._prompts.register_many([registration for _, registration in built])
        for (i, _), outcome in zip(built, stored):
            outcomes[i] = outcome
        return outcomes

    @rpc(pb.ListPromptsReply)
    async def ListPrompts(self, request, grpc_context, call: _Call):
        _, owner, _ = self._authorize_owner(request, grpc_context, call, "list", with_task=False)
        metas = [(m.task, m) for m in await asyncio.to_thread(self._prompts.tenant_prompts, owner)]
        chosen, next_token = page(metas, request.page_size, request.page_token, f"prompts:{owner}")
        return pb.ListPromptsReply(prompts=[prompt_info_to_pb(m) for m in chosen], next_page_token=next_token)

    @rpc(pb.PromptInfo)
    async def GetPrompt(self, request, grpc_context, call: _Call):
        _, owner, task = self._authorize_owner(request, grpc_context, call, "read")
        meta = await asyncio.to_thread(self._prompts.meta, owner, task, request.version or None)
        return prompt_info_to_pb(meta)

    @rpc(pb.DeletePromptReply)
    async def DeletePrompt(self, request, grpc_context, call: _Call):
        _, owner, task = self._authorize_owner(request, grpc_context, call, "delete")
        removed = await asyncio.to_thread(self._prompts.delete, owner, task)
        return pb.DeletePromptReply(tenant=owner, task=task, versions_removed=removed)

    @rpc(pb.ListTasksReply)
    async def ListTasks(self, request, grpc_context, call: _Call):
        principal = self._authenticate(grpc_context, call)
        visible = await asyncio.to_thread(self._prompts.visible_to, principal.tenant)  # O(callable tasks)
        callable_tasks = [(name, (name, meta)) for name, meta in visible]
        chosen, next_token = page(callable_tasks, request.page_size, request.page_token, f"tasks:{principal.tenant}")
        return pb.ListTasksReply(tasks=[task_info_to_pb(name, meta) for name, meta in chosen],
                                 next_page_token=next_token)

    @rpc(pb.SimilarTasksReply)
    async def SimilarTasks(self, request, grpc_context, call: _Call):
        principal = self._authenticate(grpc_context, call)
        examples, top_k = similar_request_from_pb(request)
        self._similarity.check_examples(examples)  # fail fast, before a worker thread is taken
        # A short tuning run: off the event loop, so generation keeps batching meanwhile.
        answer = await asyncio.to_thread(self._similarity.similar, self._prompts.tasks, principal.tenant, examples,
                                         top_k)
        return similar_reply_to_pb(answer)

    @rpc(pb.HealthReply)
    async def Health(self, request, grpc_context, call: _Call):
        model = self._config.promptmux.model.source
        return pb.HealthReply(
            status="NOT_SERVING" if self._scheduler.closing else "SERVING",
            model=model,
            d_model=self._prompts.d_model,
            queue_depth=self._scheduler.queue_depth,
            batching=self._config.serving.batching,
            max_batch_size=self._scheduler.config.max_batch_size,
            dtype=self._config.promptmux.model.dtype,
        )
