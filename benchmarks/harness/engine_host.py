"""The engine-direct target's engine, in a process of its own.

Engine-direct runs measure the engine behind the serving layer's own scheduler with no gRPC and
no Ray. If the engine shared the load generator's process, its engine thread would compete for
the GIL with the generator's event loop (hundreds of clients recording latencies), and every
decoder step would wait for it: engine-direct figures would measure the load generator. So the
engine lives here, in a child process: the harness sends each request over a pipe and gets its
outcome back, and the child's event loop and engine thread serve nothing else.

Messages (plain tuples over a `multiprocessing` pipe):
- parent -> child: (call id, verb, payload); verbs: `serving` (make a scheduler for a serving
  config), `generate`, `prompts`, `delete`, `batches`, `batch_count`, `stop`;
- child -> parent: ("reply", call id, value) or ("error", call id, message), and ("first",
  call id) as soon as a streamed request's first token arrives.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import multiprocessing
import threading
import time
from dataclasses import dataclass
from typing import Any

_STOP = "stop"


@dataclass(frozen=True)
class Batch:
    at: float  # when it finished (time.monotonic, the same clock in every process)
    size: int
    distinct_tasks: int
    compute_s: float
    waits: tuple[tuple[str, float], ...]  # (tenant, seconds queued before compute) per request


class BatchLog:
    """The scheduler's observer in the child: every batch (continuous batching: every decoder
    step), with its end time."""

    def __init__(self) -> None:
        self.batches: list[Batch] = []
        self._admitted: list[tuple[str, float]] = []  # waits of requests admitted since the last step

    def admitted(self, items, stats) -> None:
        self._admitted.extend((item.tenant, item.started_at - item.enqueued_at) for item in items)

    def step_finished(self, stats) -> None:
        if stats.rows:
            waits, self._admitted = tuple(self._admitted), []
            self.batches.append(Batch(time.monotonic(), stats.rows, stats.distinct_tasks, stats.seconds, waits))

    def batch_finished(self, batch, stats, compute_seconds: float) -> None:
        if stats.batch_size:
            waits = tuple((item.tenant, item.started_at - item.enqueued_at) for item in batch)
            self.batches.append(Batch(time.monotonic(), stats.batch_size, stats.distinct_tasks, compute_seconds, waits))

    def first_token(self, item, seconds: float) -> None:
        pass

    def slots(self, active: int, freed) -> None:
        pass

    def request_dropped(self, item, error) -> None:
        pass

    def queue_depth(self, depth: int) -> None:
        pass


# ---------------------------------------------------------------------- the child
def _child(conn, args: dict) -> None:
    """The engine's process: load the model, then answer calls until `stop`."""
    import torch

    from ..engine_direct import DirectEngine

    if args["torch_threads"]:
        torch.set_num_threads(args["torch_threads"])  # before the model exists, as a replica does
    direct = DirectEngine(args["model"], args["engine"], store=args["store"], torch_threads=None, seed=None)
    host = _Host(direct.engine, conn)
    conn.send(("ready", direct.engine.loaded.d_model, direct.config.model.source))
    try:
        asyncio.run(host.serve())
    finally:
        direct.close()


class _Host:
    def __init__(self, engine, conn) -> None:
        self.engine, self.conn = engine, conn
        self.log = BatchLog()
        self.schedulers: dict[str, Any] = {}
        self._send_lock = threading.Lock()

    def send(self, message: tuple) -> None:
        with self._send_lock:
            self.conn.send(message)

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()
        threading.Thread(target=self._read, args=(loop, inbox), daemon=True).start()
        tasks = set()
        while True:
            call, verb, payload = await inbox.get()
            if verb == _STOP:
                for scheduler in self.schedulers.values():
                    await scheduler.close(grace_s=0)
                if call is not None:  # None: the harness already went away
                    self.send(("reply", call, None))
                return
            task = asyncio.ensure_future(self._answer(call, verb, payload))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    def _read(self, loop, inbox: asyncio.Queue) -> None:
        while True:
            try:
                message = self.conn.recv()
            except EOFError:  # the harness went away: stop
                message = (None, _STOP, None)
            loop.call_soon_threadsafe(inbox.put_nowait, message)
            if message[1] == _STOP:
                return

    async def _answer(self, call, verb: str, payload) -> None:
        try:
            value = await getattr(self, f"_{verb}")(call, payload)
            self.send(("reply", call, value))
        except Exception as error:  # the harness's bug or the engine's: the caller learns why
            self.send(("error", call, f"{type(error).__name__}: {error}"))

    async def _serving(self, call, serving: dict) -> None:
        from promptmux.serving.config import ServingConfig
        from promptmux.serving.scheduling import build_scheduler

        key = json.dumps(serving, sort_keys=True)
        if key not in self.schedulers:
            config = ServingConfig(**serving).resolved(self.engine.config.max_batch_size)
            self.schedulers[key] = build_scheduler(config, self.engine, observer=self.log)

    async def _generate(self, call, payload) -> tuple:
        from promptmux.prompts.errors import PromptmuxError
        from promptmux.serving.engine.types import GenerationParams, GenerationRequest

        serving, tenant, text, task, max_new_tokens, stream = payload
        scheduler = self.schedulers[json.dumps(serving, sort_keys=True)]
        first: list[bool] = []

        def on_token(_token: int) -> None:
            if not first:
                first.append(True)
                self.send(("first", call))

        request = GenerationRequest(tenant=tenant, text=text, task=task,
                                    params=GenerationParams(max_new_tokens=max_new_tokens))
        try:
            prepared = self.engine.prepare(request)  # once, as a replica does
            result = await scheduler.submit(prepared, on_token=on_token if stream else None)
        except PromptmuxError as error:
            return (error.status, 0, 0, str(error))
        return ("OK", result.output_tokens, result.input_tokens, "")

    async def _prompts(self, call, tasks) -> int:
        from promptmux.prompts.records import content_hash

        def register() -> int:
            store = self.engine.store
            stored = {m.key: m.content_hash for m in store.list()}
            count = 0
            for task in tasks:
                tensor = task.prompt(self.engine.loaded.d_model)
                if stored.get((task.tenant, task.task)) != content_hash(tensor):
                    store.register(task.tenant, task.task, tensor, description="promptmux bench workload prompt")
                    count += 1
            self.engine.refresh_prompts()
            return count

        return await asyncio.to_thread(register)

    async def _delete(self, call, tasks) -> int:
        from promptmux.prompts.errors import PromptmuxError

        def delete() -> int:
            store, removed = self.engine.store, 0
            for task in tasks:
                try:
                    removed += store.delete(task.tenant, task.task)
                except PromptmuxError:
                    pass
            self.engine.refresh_prompts()
            return removed

        return await asyncio.to_thread(delete)

    async def _batches(self, call, since: int) -> list[Batch]:
        return self.log.batches[since:]

    async def _batch_count(self, call, _payload) -> int:
        return len(self.log.batches)


# ---------------------------------------------------------------------- the parent
class EngineHost:
    """The harness's handle on the engine's process: start it, call it, stop it."""

    def __init__(self, model: dict, engine: dict, store: dict, torch_threads: int | None) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self.process = context.Process(
            target=_child, name="promptmux-engine-direct", daemon=True,
            args=(child_conn, {"model": model, "engine": engine, "store": store, "torch_threads": torch_threads}),
        )
        self.process.start()
        child_conn.close()
        ready = self._conn.recv()
        if ready[0] != "ready":
            raise RuntimeError(f"the engine-direct process failed to start: {ready!r}")
        _, self.d_model, self.model_name = ready
        self._ids = itertools.count()
        self._waiting: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._on_first: dict[int, Any] = {}
        self._lock = threading.Lock()
        threading.Thread(target=self._read, name="promptmux-engine-direct-reader", daemon=True).start()

    @property
    def pid(self) -> int:
        return self.process.pid

    async def call(self, verb: str, payload=None, on_first=None):
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        call = next(self._ids)
        with self._lock:
            self._waiting[call] = (loop, future)
            if on_first is not None:
                self._on_first[call] = on_first
            self._conn.send((call, verb, payload))
        return await future

    def _read(self) -> None:
        while True:
            try:
                kind, call, *rest = self._conn.recv()
            except (EOFError, OSError):  # the child is gone: every waiting call learns it
                with self._lock:
                    waiting, self._waiting = self._waiting, {}
                for loop, future in waiting.values():
                    loop.call_soon_threadsafe(_settle, future, RuntimeError("the engine-direct process exited"))
                return
            with self._lock:
                if kind == "first":
                    on_first = self._on_first.pop(call, None)
                    loop = self._waiting.get(call, (None, None))[0]
                    if on_first is not None and loop is not None:
                        loop.call_soon_threadsafe(on_first)
                    continue
                self._on_first.pop(call, None)
                loop, future = self._waiting.pop(call)
            value = RuntimeError(rest[0]) if kind == "error" else rest[0]
            loop.call_soon_threadsafe(_settle, future, value)

    async def stop(self) -> None:
        if self.process.is_alive():
            try:
                await asyncio.wait_for(self.call(_STOP), 30)
            except (asyncio.TimeoutError, RuntimeError, OSError):
                pass
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)


def _settle(future: asyncio.Future, value) -> None:
    if future.done():
        return
    if isinstance(value, BaseException):
        future.set_exception(value)
    else:
        future.set_result(value)
