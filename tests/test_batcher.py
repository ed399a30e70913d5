"""The fair batcher, without Ray: fairness, bounds, deadlines, cancellation, per_task mode."""
from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

import pytest

from promptmux.serving.scheduling.batcher import Batcher
from promptmux.prompts.errors import (
    DeadlineExceededError,
    InvalidRequestError,
    PromptmuxError,
    ResourceExhaustedError,
    UnavailableError,
)
from conftest import hand_prepared
from promptmux.serving.config import ServingConfig
from promptmux.serving.engine.plan import StepOutputs
from promptmux.serving.engine.types import BatchStats, GenerationRequest, GenerationResult


@dataclass
class FakeEngine:
    """A static executor that echoes `task:text`, records every batch, and can be held
    mid-batch by a gate."""

    batches: list[list[GenerationRequest]] = field(default_factory=list)
    gate: threading.Event = field(default_factory=threading.Event)
    entered: threading.Event = field(default_factory=threading.Event)
    fail_texts: frozenset = frozenset()

    def __post_init__(self) -> None:
        self.gate.set()

    slots = 0

    def execute(self, plan, stream=None):
        requests = [prepared.request for _, prepared in plan.static]
        self.batches.append(requests)
        self.entered.set()
        self.gate.wait(10)
        outputs = StepOutputs(static=BatchStats(len(requests), len({(r.tenant, r.task) for r in requests}),
                                                0.0, 0, 0, 0.0, 0.0))
        for handle, prepared in plan.static:
            r = prepared.request
            if r.text in self.fail_texts:
                outputs.errors[handle] = InvalidRequestError(f"bad text {r.text!r}")
                continue
            tokens = [ord(c) for c in r.text]
            if stream is not None:
                for t in tokens:
                    stream(handle, t)
            outputs.finished[handle] = GenerationResult(r.request_id, f"{r.task}:{r.text}", tokens, "eos", 0,
                                                        len(tokens), len(tokens))
        return outputs


def make_batcher(engine: FakeEngine, **overrides) -> Batcher:
    settings = dict(max_batch_size=4, batch_wait_timeout_s=0.02)
    settings.update(overrides)
    return Batcher(ServingConfig(**settings).resolved(64), engine)


def req(tenant: str, task: str, text: str = "x"):
    return hand_prepared(GenerationRequest(tenant=tenant, text=text, task=task, request_id=f"{tenant}/{task}/{text}"))


async def hold_engine(batcher: Batcher, engine: FakeEngine) -> asyncio.Task:
    """Start one request and keep the engine busy with it until `engine.gate.set()`."""
    engine.gate.clear()
    engine.entered.clear()
    blocker = asyncio.ensure_future(batcher.submit(req("blocker", "t", "hold")))
    while not engine.entered.is_set():
        await asyncio.sleep(0.005)
    return blocker


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_results_match_requests_and_batches_mix_tasks():
    async def main():
        engine = FakeEngine()
        batcher = make_batcher(engine, max_batch_size=8)
        requests = [req("a", f"task{i}", f"in{i}") for i in range(8)]
        results = await asyncio.gather(*(batcher.submit(r) for r in requests))
        assert [r.text for r in results] == [f"task{i}:in{i}" for i in range(8)]
        assert len(engine.batches) == 1 and len({r.task for r in engine.batches[0]}) == 8
        await batcher.close()

    run(main())


def test_round_robin_keeps_a_flooding_tenant_from_starving_another():
    async def main():
        engine = FakeEngine()
        batcher = make_batcher(engine, max_batch_size=4)
        blocker = await hold_engine(batcher, engine)
        flood = [asyncio.ensure_future(batcher.submit(req("flood", "t", str(i)))) for i in range(20)]
        await asyncio.sleep(0.01)
        quiet = [asyncio.ensure_future(batcher.submit(req("quiet", "t", str(i)))) for i in range(2)]
        await asyncio.sleep(0.01)
        engine.gate.set()
        await asyncio.gather(blocker, *flood, *quiet)
        first = engine.batches[1]  # the batch formed right after the blocker
        assert [r.tenant for r in first] == ["flood", "quiet", "flood", "quiet"]
        assert [r.text for r in first if r.tenant == "flood"] == ["0", "1"]  # FIFO within a tenant
        await batcher.close()

    run(main())


def test_rotation_carries_over_between_batches():
    async def main():
        engine = FakeEngine()
        batcher = make_batcher(engine, max_batch_size=1)
        blocker = await hold_engine(batcher, engine)
        tasks = [asyncio.ensure_future(batcher.submit(req(t, "t", str(i)))) for i in range(3) for t in "ab"]
        await asyncio.sleep(0.01)
        engine.gate.set()
        await asyncio.gather(blocker, *tasks)
        assert [b[0].tenant for b in engine.batches[1:]] == ["a", "b", "a", "b", "a", "b"]
        await batcher.close()

    run(main())


def test_full_queue_answers_resource_exhausted_at_once():
    async def main():
        engine = FakeEngine()
        batcher = make_batcher(engine, max_batch_size=1, max_queue_size=3)
        blocker = await hold_engine(batcher, engine)
        queued = [asyncio.ensure_future(batcher.submit(req(f"t{i}", "t"))) for i in range(3)]
        await asyncio.sleep(0)
        assert batcher.queue_depth == 3
        with pytest.raises(ResourceExhaustedError, match="max_queue_size=3"):
            await batcher.submit(req("late", "t"))
        engine.gate.set()
        await asyncio.gather(blocker, *queued)
        assert len(engine.batches) == 4  # the refused request never reached the engine
        await batcher.close()

    run(main())


def test_per_tenant_in_flight_limit_refuses_only_that_tenant():
    async def main():
        engine = FakeEngine()
        batcher = make_batcher(engine, max_in_flight_per_tenant=2)
        blocker = await hold_engine(batcher, engine)
        mine = [asyncio.ensure_future(batcher.submit(req("a", "t", str(i)))) for i in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(ResourceExhaustedError, match="tenant 'a' has 2 requests in flight"):
            await batcher.submit(req("a", "t", "third"))
        other = asyncio.ensure_future(batcher.submit(req("b", "t")))
        engine.gate.set()
        await asyncio.gather(blocker, other, *mine)
        assert batcher.in_flight("a") == 0  # slots come back when requests finish
        await batcher.submit(req("a", "t", "again"))
        await batcher.close()

    run(main())


def test_expired_request_is_dropped_before_compute():
    async def main():
        engine = FakeEngine()
        batcher = make_batcher(engine)
        blocker = await hold_engine(batcher, engine)
        expired = asyncio.ensure_future(batcher.submit(req("a", "t", "late"), deadline=time.monotonic()))
        alive = asyncio.ensure_future(batcher.submit(req("a", "t", "ok")))
        await asyncio.sleep(0.01)
        engine.gate.set()
        with pytest.raises(DeadlineExceededError, match="dropped before compute"):
            await expired
        assert (await alive).text == "t:ok"
        await blocker
        computed = [r.text for batch in engine.batches for r in batch]
        assert "late" not in computed and "ok" in computed
        await batcher.close()

    run(main())


def test_max_queue_wait_applies_without_a_client_deadline():
    async def main():
        engine = FakeEngine()
        batcher = make_batcher(engine, batch_wait_timeout_s=0.0, max_queue_wait_s=0.2)
        blocker = await hold_engine(batcher, engine)
        waiting = asyncio.ensure_future(batcher.submit(req("a", "t", "slow")))
        await asyncio.sleep(0.4)
        engine.gate.set()
        with pytest.raises(DeadlineExceededError):
            await waiting
        await blocker
        await batcher.close()

    run(main())


def test_cancelled_request_leaves_the_queue_and_is_never_computed():
    async def main():
        engine = FakeEngine()
        batcher = make_batcher(engine)
        blocker = await hold_engine(batcher, engine)
        gone = asyncio.ensure_future(batcher.submit(req("a", "t", "gone")))
        await asyncio.sleep(0)
        assert batcher.queue_depth == 1
        gone.cancel()
        await asyncio.sleep(0)
        assert batcher.queue_depth == 0 and batcher.in_flight("a") == 0
        engine.gate.set()
        await blocker
        await batcher.submit(req("a", "t", "next"))
        assert "gone" not in [r.text for batch in engine.batches for r in batch]
        await batcher.close()

    run(main())


def test_per_task_mode_puts_one_task_in_each_batch():
    async def main():
        engine = FakeEngine()
        batcher = make_batcher(engine, batching="per_task", max_batch_size=4)
        blocker = await hold_engine(batcher, engine)
        work = [
            asyncio.ensure_future(batcher.submit(req(tenant, f"task{i % 3}", f"{tenant}{i}")))
            for i in range(9)
            for tenant in ("a", "b")
        ]
        await asyncio.sleep(0.01)
        engine.gate.set()
        results = await asyncio.gather(*work)
        await blocker
        assert sorted(r.text for r in results) == sorted(f"task{i % 3}:{t}{i}" for i in range(9) for t in "ab")
        for batch in engine.batches[1:]:
            assert len({(r.tenant, r.task) for r in batch}) == 1
        assert [b[0].tenant for b in engine.batches[1:3]] == ["a", "b"]  # tasks picked round-robin by tenant
        assert max(len(b) for b in engine.batches) == 3  # a task's waiting requests share one batch
        await batcher.close()

    run(main())


def test_a_bad_request_fails_alone_and_an_engine_crash_fails_its_batch():
    async def main():
        engine = FakeEngine(fail_texts=frozenset({"bad"}))
        batcher = make_batcher(engine)
        good, bad = await asyncio.gather(
            batcher.submit(req("a", "t", "good")), batcher.submit(req("a", "t", "bad")), return_exceptions=True
        )
        assert good.text == "t:good" and isinstance(bad, InvalidRequestError)

        class Crashing:
            slots = 0

            def execute(self, plan, stream=None):
                raise RuntimeError("device lost")

        crashing = Batcher(batcher.config, Crashing())
        outcomes = await asyncio.gather(*(crashing.submit(req("a", "t")) for _ in range(2)), return_exceptions=True)
        assert all(isinstance(o, PromptmuxError) and o.status == "INTERNAL" and "device lost" in str(o) for o in outcomes)
        await batcher.close()
        await crashing.close()

    run(main())


def test_tokens_reach_the_event_loop_in_order():
    async def main():
        engine = FakeEngine()
        batcher = make_batcher(engine)
        seen: list[int] = []
        loop_thread = threading.get_ident()
        threads: set[int] = set()

        def sink(token: int) -> None:
            threads.add(threading.get_ident())
            seen.append(token)

        result = await batcher.submit(req("a", "t", "hey"), on_token=sink)
        assert seen == result.token_ids == [ord(c) for c in "hey"]
        assert threads == {loop_thread}
        await batcher.close()

    run(main())


def test_close_refuses_new_requests_and_fails_what_cannot_finish_in_the_grace_period():
    async def main():
        engine = FakeEngine()
        batcher = make_batcher(engine, max_batch_size=1)
        blocker = await hold_engine(batcher, engine)
        stuck = asyncio.ensure_future(batcher.submit(req("a", "t", "stuck")))
        await asyncio.sleep(0)
        await batcher.close(grace_s=0.05)
        with pytest.raises(UnavailableError, match="shut down before running"):
            await stuck
        with pytest.raises(UnavailableError, match="shut down while running"):
            await blocker
        with pytest.raises(UnavailableError, match="shutting down"):
            await batcher.submit(req("a", "t", "new"))
        engine.gate.set()

    run(main())


def test_close_lets_queued_work_finish_within_the_grace_period():
    async def main():
        engine = FakeEngine()
        batcher = make_batcher(engine, max_batch_size=1)
        work = [asyncio.ensure_future(batcher.submit(req("a", "t", str(i)))) for i in range(3)]
        await asyncio.sleep(0)
        await batcher.close(grace_s=10)
        assert [w.result().text for w in work] == ["t:0", "t:1", "t:2"]

    run(main())
