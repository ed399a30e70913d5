"""The step scheduler against a deterministic fake step executor (no model): admission between
steps, per-tenant round-robin, the encoder-token budget, deadlines, cancellation freeing the
slot at the next step, queue bounds, beam routing, close(), no busy loop. The scheduler and
the executor exchange StepPlans and StepOutputs only; the last tests build plans by hand and
run them against the real step executor."""
from __future__ import annotations

import asyncio
import pickle
import threading
import time
from dataclasses import dataclass, field
from typing import Hashable

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
from promptmux.serving.engine.types import (
    BatchStats,
    GenerationParams,
    GenerationRequest,
    GenerationResult,
    PreparedRequest,
)
from promptmux.serving.config import ServingConfig
from promptmux.serving.engine.plan import AdmissionStats, DecodeStats, StepOutputs, StepPlan
from promptmux.serving.scheduling import build_scheduler
from promptmux.serving.scheduling.step_scheduler import StepScheduler


@dataclass
class Row:
    prepared: PreparedRequest
    produced: list[int] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.prepared.request.text


class FakeStepEngine:
    """A step executor: each row emits its text's characters (as ords), one per step, then
    EOS-finishes; `max_new_tokens` cuts it ("length"); beam requests (`plan.static`) answer
    their text reversed. Records every part of every plan in `log`; `gate` holds a step."""

    def __init__(self, slots: int = 4, fail_texts=(), crash_on_step: int | None = None) -> None:
        self.slots = slots
        self.rows: dict[int, Row] = {}
        self.log: list[tuple[str, list[str]]] = []  # ("admit"|"step"|"cancel"|"batch", texts)
        self.plans: list[StepPlan] = []
        self.gate = threading.Event()
        self.gate.set()
        self.in_step = threading.Event()
        self.fail_texts = set(fail_texts)
        self.crash_on_step = crash_on_step
        self.steps = 0
        self.permits: threading.Semaphore | None = None  # set: each step waits for one permit

    @property
    def free_slots(self) -> int:
        return self.slots - len(self.rows)

    @property
    def active_slots(self) -> int:
        return len(self.rows)

    # the Executor interface
    def execute(self, plan: StepPlan, stream=None) -> StepOutputs:
        pickle.loads(pickle.dumps(plan))  # a plan is plain data
        self.plans.append(plan)
        outputs = StepOutputs()
        for handle in plan.cancel:
            row = self.rows.pop(handle, None)
            if row is not None:
                self.log.append(("cancel", [row.text]))
        if plan.static:
            self._batch(plan.static, stream, outputs)
        if plan.admit:
            self._admit(plan.admit, outputs)
        if self.rows:
            self._step(plan.run_first, plan.row_limit, outputs)
        outputs.active_slots = len(self.rows)
        pickle.loads(pickle.dumps(outputs))  # and so are its outputs
        return outputs

    def _admit(self, items, outputs: StepOutputs) -> None:
        assert len(items) <= self.free_slots, "admitted more requests than free slots"
        self.log.append(("admit", [p.request.text for _, p in items]))
        for handle, prepared in items:
            if prepared.request.text in self.fail_texts:
                outputs.errors[handle] = InvalidRequestError(f"cannot admit {prepared.request.text!r}")
            else:
                self.rows[handle] = Row(prepared)
        outputs.admission = AdmissionStats(len(items), sum(len(p.token_ids) for _, p in items), 0.0, 0.001)

    def _step(self, run_first, limit, outputs: StepOutputs) -> None:
        first = {handle: self.rows[handle] for handle in run_first if handle in self.rows}
        self.rows = {**first, **{h: row for h, row in self.rows.items() if h not in first}}
        self.in_step.set()
        if self.permits is not None:
            assert self.permits.acquire(timeout=10), "the test never let this step run"
        self.gate.wait(10)
        self.in_step.clear()
        self.steps += 1
        stepping = list(self.rows.items())[:limit]
        if self.crash_on_step == self.steps:  # the executor's contract: every stepping row fails, its slot freed
            for handle, _ in stepping:
                outputs.errors[handle] = PromptmuxError("the engine failed while decoding: device fell over")
                del self.rows[handle]
            return
        self.log.append(("step", [row.text for _, row in stepping]))
        tasks = len({(row.prepared.tenant, row.prepared.prompt_task_ids) for row in self.rows.values()})
        waiting = len(self.rows) - len(stepping)
        for handle, row in stepping:
            token = ord(row.text[len(row.produced)])
            row.produced.append(token)
            outputs.stepped.append(handle)
            outputs.tokens.append(token)
            cap = row.prepared.params.max_new_tokens
            if len(row.produced) == len(row.text) or len(row.produced) == cap:
                reason = "eos" if len(row.produced) == len(row.text) else "length"
                outputs.finished[handle] = GenerationResult(
                    row.prepared.request.request_id, row.text[: len(row.produced)], list(row.produced), reason, 0,
                    len(row.text), len(row.produced))
                del self.rows[handle]
        outputs.decode = DecodeStats(rows=len(stepping), waiting=waiting, distinct_tasks=tasks, seconds=0.001)

    def _batch(self, items, stream, outputs: StepOutputs) -> None:
        """The static path, for beam requests."""
        self.log.append(("batch", [p.request.text for _, p in items]))
        for handle, prepared in items:
            text = prepared.request.text
            tokens = [ord(c) for c in reversed(text)]
            if stream is not None:
                for token in tokens:
                    stream(handle, token)
            outputs.finished[handle] = GenerationResult(prepared.request.request_id, text[::-1], tokens, "eos", 0,
                                                        len(tokens), len(tokens))
        outputs.static = BatchStats(len(items), 1, 0.0, 0, 0, 0.0, 0.0)

    context = None  # what build_scheduler hands a static executor of an Engine

    def admitted(self) -> list[list[str]]:
        return [texts for kind, texts in self.log if kind == "admit"]

    def stepped(self) -> list[list[str]]:
        return [texts for kind, texts in self.log if kind == "step"]


class Recorder:
    """The scheduler's observer: everything it reports, in order."""

    def __init__(self) -> None:
        self.dropped: list[str] = []
        self.active: list[int] = []
        self.freed: dict[str, int] = {}
        self.first_tokens: list[str] = []
        self.admissions: list[int] = []
        self.steps: list[tuple[int, int]] = []
        self.waiting: list[int] = []
        self.batches: list[int] = []

    def batch_finished(self, batch, stats, compute_seconds) -> None:
        self.batches.append(len(batch))

    def request_dropped(self, item, status) -> None:
        self.dropped.append(status)

    def queue_depth(self, depth) -> None:
        pass

    def admitted(self, items, stats) -> None:
        assert all(item.started_at >= item.enqueued_at for item in items)
        self.admissions.append(len(items))

    def step_finished(self, stats) -> None:
        self.steps.append((stats.rows, stats.distinct_tasks))
        self.waiting.append(stats.waiting)

    def first_token(self, item, seconds) -> None:
        assert seconds >= 0
        self.first_tokens.append(item.request.request.text)

    def slots(self, active, freed) -> None:
        self.active.append(active)
        for reason, count in freed.items():
            self.freed[reason] = self.freed.get(reason, 0) + count


def prep(tenant: str, text: str, task: str = "t", **params) -> PreparedRequest:
    return hand_prepared(GenerationRequest(tenant=tenant, text=text, task=task, request_id=f"{tenant}/{text}",
                                           params=GenerationParams(**params)))


def make(engine: FakeStepEngine, observer: Recorder | None = None, **overrides) -> StepScheduler:
    settings = dict(max_encoder_tokens_per_step=1000, shared_step_rows=0)
    settings.update(overrides)
    config = ServingConfig(**settings).resolved(engine.slots)
    return StepScheduler(config, engine, observer=observer)


async def until(condition, limit_s: float = 5.0) -> None:
    end = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < end, "condition not reached in time"
        await asyncio.sleep(0.002)


async def hold_engine(scheduler: StepScheduler, engine: FakeStepEngine, text: str = "blocker" * 4) -> asyncio.Future:
    """Start one long request and stop the engine thread inside a step until `engine.gate.set()`."""
    engine.gate.clear()
    blocker = asyncio.ensure_future(scheduler.submit(prep("blocker", text)))
    await until(engine.in_step.is_set)
    return blocker


async def one_step(engine: FakeStepEngine) -> None:
    """Let exactly one (permit-gated) step run, and wait until it has."""
    steps = engine.steps
    engine.permits.release()
    await until(lambda: engine.steps > steps)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_rows_join_and_leave_between_steps_and_results_match():
    async def main():
        engine, seen = FakeStepEngine(slots=2), Recorder()
        scheduler = make(engine, seen)
        long = await hold_engine(scheduler, engine, text="abcdefgh")
        short = asyncio.ensure_future(scheduler.submit(prep("b", "xy")))
        later = asyncio.ensure_future(scheduler.submit(prep("c", "pqr")))
        await asyncio.sleep(0.01)
        engine.gate.set()
        results = await asyncio.gather(long, short, later)
        assert [r.text for r in results] == ["abcdefgh", "xy", "pqr"]
        assert [r.finish_reason for r in results] == ["eos"] * 3
        # "pqr" took the slot "xy" freed while "abcdefgh" kept decoding: one step held both.
        assert any(rows == ["abcdefgh", "pqr"] for rows in engine.stepped())
        assert len(engine.stepped()) < 8 + 2 + 3  # rows shared steps
        assert seen.first_tokens[0] == "abcdefgh" and sorted(seen.first_tokens) == ["abcdefgh", "pqr", "xy"]
        assert seen.active[-1] == 0 and seen.freed == {"eos": 3}
        await scheduler.close()

    run(main())


def test_each_step_streams_each_rows_new_token():
    async def main():
        engine = FakeStepEngine(slots=4)
        engine.permits = threading.Semaphore(0)
        scheduler = make(engine)
        received: list[int] = []
        job = asyncio.ensure_future(scheduler.submit(prep("a", "hello"), on_token=received.append))
        for step in range(1, 6):
            await one_step(engine)
            await until(lambda: len(received) == step)  # this step's token, before the next step runs
            assert received == [ord(c) for c in "hello"[:step]] and engine.steps == step
        assert (await job).token_ids == received
        await scheduler.close()

    run(main())


def test_round_robin_admits_tenants_in_turn_into_free_slots():
    async def main():
        engine = FakeStepEngine(slots=5)
        scheduler = make(engine)
        blocker = await hold_engine(scheduler, engine)
        flood = [asyncio.ensure_future(scheduler.submit(prep("flood", f"f{i}"))) for i in range(10)]
        await asyncio.sleep(0.01)
        quiet = [asyncio.ensure_future(scheduler.submit(prep("quiet", f"q{i}"))) for i in range(2)]
        await asyncio.sleep(0.01)
        engine.gate.set()
        await asyncio.gather(blocker, *flood, *quiet)
        # Four free slots at the first admission after the blocker: tenants in turn, FIFO within one.
        assert engine.admitted()[1] == ["f0", "q0", "f1", "q1"]
        await scheduler.close()

    run(main())


def test_a_freed_slot_goes_to_the_tenant_holding_fewest_slots_before_a_floods_queue():
    async def main():
        engine = FakeStepEngine(slots=4)
        engine.permits = threading.Semaphore(0)
        scheduler = make(engine)
        blocker = asyncio.ensure_future(scheduler.submit(prep("blocker", "b" * 12)))
        await until(engine.in_step.is_set)
        flood = [asyncio.ensure_future(scheduler.submit(prep("flood", text)))
                 for text in ("x" * 12, "y" * 12, "ab", "f3", "f4")]
        await asyncio.sleep(0.01)
        await one_step(engine)  # the blocker's first step; then f0, f1 and "ab" fill the free slots
        await until(lambda: len(engine.admitted()) == 2)
        quiet = asyncio.ensure_future(scheduler.submit(prep("quiet", "q0")))
        await asyncio.sleep(0.01)  # queued behind the flood's f3 and f4, and after it in the rotation
        await one_step(engine)
        await one_step(engine)  # "ab" finishes: one slot is free
        for _ in range(40):
            engine.permits.release()
        await asyncio.gather(blocker, quiet, *flood)
        # The flood held three slots and quiet none: quiet takes the slot, ahead of f3.
        assert engine.admitted()[:4] == [["b" * 12], ["x" * 12, "y" * 12, "ab"], ["q0"], ["f3"]]
        await scheduler.close()

    run(main())


def test_a_light_tenants_admission_encodes_without_the_floods_newcomers():
    """While a flood holds more rows than a shared step runs, the plan that admits a light
    tenant's request admits none of the flood's queued requests (they would lengthen the
    encoder pass before the light request's first token); later plans admit them."""

    async def main():
        engine = FakeStepEngine(slots=8)
        engine.permits = threading.Semaphore(0)
        scheduler = make(engine, shared_step_rows=2)
        first = [asyncio.ensure_future(scheduler.submit(prep("flood", f"{i}" * 20))) for i in range(4)]
        await until(lambda: len(engine.admitted()) == 1)  # 4 flood rows in 8 slots
        await one_step(engine)
        more = [asyncio.ensure_future(scheduler.submit(prep("flood", f"m{i}" * 5))) for i in range(3)]
        light = asyncio.ensure_future(scheduler.submit(prep("light", "xyz")))
        await asyncio.sleep(0.02)
        await one_step(engine)
        await one_step(engine)
        for _ in range(80):
            engine.permits.release()
        await asyncio.gather(light, *first, *more)
        admitted = engine.admitted()
        light_plan = next(i for i, texts in enumerate(admitted) if "xyz" in texts)
        assert admitted[light_plan] == ["xyz"]  # the light request's encoder pass, alone
        later = [text for texts in admitted[light_plan + 1:] for text in texts]
        assert sorted(later) == sorted(f"m{i}" * 5 for i in range(3))  # the flood's, in later plans
        await scheduler.close()

    run(main())


def test_a_light_tenants_steps_run_few_rows_and_the_flood_resumes_unchanged():
    async def main():
        engine, seen = FakeStepEngine(slots=8), Recorder()
        engine.permits = threading.Semaphore(0)
        scheduler = make(engine, seen, shared_step_rows=4)
        flood = [asyncio.ensure_future(scheduler.submit(prep("flood", f"{i}" * (6 + i)))) for i in range(8)]
        await until(lambda: len(engine.admitted()) == 1)  # the flood fills every slot
        await one_step(engine)
        await one_step(engine)
        light = asyncio.ensure_future(scheduler.submit(prep("light", "xyz")))
        await asyncio.sleep(0.01)
        for _ in range(30):
            await one_step(engine)  # a free slot appears when a flood row ends...
            if light.done():
                break
        for _ in range(200):
            engine.permits.release()
        results = await asyncio.gather(*flood, light)
        # ...and every row decoded to its own end, whether it waited or not.
        assert [r.text for r in results] == [f"{i}" * (6 + i) for i in range(8)] + ["xyz"]
        with_light = [rows for rows in engine.stepped() if "xyz" in rows]
        assert len(with_light) == 3  # "xyz": three steps, one token each
        # While it decoded, a step ran 4 rows (the light row first), not the 8 slots.
        assert all(len(rows) == 4 and rows[0] == "xyz" for rows in with_light)
        assert max(len(rows) for rows in engine.stepped()) == 8  # the flood alone ran every row
        await until(lambda: len(seen.waiting) == len(engine.stepped()))
        # Metrics: rows waited exactly in the light tenant's steps.
        assert [waited > 0 for waited in seen.waiting] == ["xyz" in rows for rows in engine.stepped()]
        await scheduler.close()

    run(main())


def test_a_light_tenant_with_several_requests_in_flight_still_counts_as_light():
    async def main():
        engine = FakeStepEngine(slots=16)
        engine.permits = threading.Semaphore(0)
        scheduler = make(engine, shared_step_rows=4)
        flood = [asyncio.ensure_future(scheduler.submit(prep("flood", f"{i:x}" * 20))) for i in range(12)]
        await until(engine.in_step.is_set)
        await asyncio.sleep(0.01)
        await one_step(engine)  # the first arrival's step; the others are admitted after it
        await until(lambda: engine.active_slots == 12)
        light = [asyncio.ensure_future(scheduler.submit(prep("light", f"l{i}"))) for i in range(4)]
        await asyncio.sleep(0.01)
        for _ in range(300):
            engine.permits.release()
        await asyncio.gather(*flood, *light)
        # 4 of 16 slots is half an equal share of the 16 in use: light. Its steps ran its 4
        # rows and one flood row (a quarter of the limit), not all 16.
        with_light = [rows for rows in engine.stepped() if any(r.startswith("l") for r in rows)]
        assert with_light and all(len(rows) == 5 for rows in with_light)
        await scheduler.close()

    run(main())


def test_equal_tenants_and_a_lone_flood_run_every_row():
    async def main():
        engine = FakeStepEngine(slots=8)
        engine.permits = threading.Semaphore(0)
        scheduler = make(engine, shared_step_rows=4)
        jobs = [asyncio.ensure_future(scheduler.submit(prep(tenant, f"{tenant}{i}" * 3)))
                for i in range(4) for tenant in ("a", "b")]
        await until(engine.in_step.is_set)  # the first arrival's step waits; the rest queue
        await asyncio.sleep(0.01)
        for _ in range(20):
            engine.permits.release()
        await asyncio.gather(*jobs)
        # From the second step on, each tenant held 4 slots: neither is light, every row ran.
        assert [len(rows) for rows in engine.stepped()[1:6]] == [8] * 5
        await scheduler.close()

    run(main())


def test_shared_step_rows_is_auto_a_count_or_off():
    assert ServingConfig().shared_step_rows == "auto"
    assert ServingConfig(shared_step_rows=0).shared_step_rows == 0
    for bad in (-1, "16", 2.5, True):
        with pytest.raises(ValueError, match=r"serving.shared_step_rows=.* expected \"auto\", 0 \(off\) or a number"):
            ServingConfig(shared_step_rows=bad)
    with pytest.raises(ValueError, match="build_scheduler resolves"):
        StepScheduler(ServingConfig().resolved(4), FakeStepEngine())


def test_encoder_token_budget_spreads_a_burst_over_several_steps():
    async def main():
        engine = FakeStepEngine(slots=16)
        scheduler = make(engine, max_encoder_tokens_per_step=10)
        blocker = await hold_engine(scheduler, engine, text="z" * 40)
        burst = [asyncio.ensure_future(scheduler.submit(prep(f"t{i}", f"{i}" * 4))) for i in range(6)]
        big = asyncio.ensure_future(scheduler.submit(prep("big", "B" * 25)))
        await asyncio.sleep(0.01)
        engine.gate.set()
        await asyncio.gather(blocker, *burst, big)
        admits = engine.admitted()[1:]
        assert [len(a) for a in admits] == [2, 2, 2, 1]  # 4 + 4 tokens fit in 10, a third would not
        assert admits[-1] == ["B" * 25]  # bigger than the budget: admitted alone
        # A step ran between admissions: decoding went on while the burst was admitted.
        kinds = [kind for kind, _ in engine.log]
        first = kinds.index("admit", 1)
        assert kinds[first:first + 8] == ["admit", "step"] * 4
        await scheduler.close()

    run(main())


def test_expired_requests_are_dropped_before_compute():
    async def main():
        engine, seen = FakeStepEngine(slots=2), Recorder()
        scheduler = make(engine, seen, max_queue_wait_s=0.2)
        blocker = await hold_engine(scheduler, engine)
        late = asyncio.ensure_future(scheduler.submit(prep("a", "late"), deadline=time.monotonic()))
        slow = asyncio.ensure_future(scheduler.submit(prep("a", "slow")))  # only max_queue_wait_s bounds it
        await asyncio.sleep(0.01)
        # Hold the engine past the queue wait bound: nothing queued may start after it.
        engine.gate.clear()
        await asyncio.sleep(0.3)
        engine.gate.set()
        with pytest.raises(DeadlineExceededError, match="dropped before compute"):
            await late
        with pytest.raises(DeadlineExceededError, match="dropped before compute"):
            await slow
        await blocker
        computed = [text for texts in engine.admitted() for text in texts]
        assert "late" not in computed and "slow" not in computed
        assert seen.dropped.count("DEADLINE_EXCEEDED") == 2
        ok = await scheduler.submit(prep("a", "ok"))
        assert ok.text == "ok"
        await scheduler.close()

    run(main())


def test_cancelled_request_frees_its_slot_at_the_next_step():
    async def main():
        engine, seen = FakeStepEngine(slots=2), Recorder()
        engine.permits = threading.Semaphore(0)
        scheduler = make(engine, seen)
        gone = asyncio.ensure_future(scheduler.submit(prep("a", "x" * 50)))
        stays = asyncio.ensure_future(scheduler.submit(prep("b", "y" * 6)))
        await until(engine.in_step.is_set)
        while scheduler.active < 2:
            await one_step(engine)
        await until(engine.in_step.is_set)  # inside a step that holds both rows
        assert engine.free_slots == 0
        gone.cancel()
        await asyncio.sleep(0.01)
        engine.permits.release(100)
        assert (await stays).text == "y" * 6
        with pytest.raises(asyncio.CancelledError):
            await gone
        kinds = [(kind, texts) for kind, texts in engine.log]
        cancel_at = kinds.index(("cancel", ["x" * 50]))
        # The step that was running when the caller left finished; the next one ran without it.
        assert kinds[cancel_at - 1][0] == "step" and "x" * 50 in kinds[cancel_at - 1][1]
        assert all("x" * 50 not in texts for kind, texts in kinds[cancel_at:] if kind == "step")
        assert engine.free_slots == 2 and scheduler.active == 0
        assert seen.freed.get("cancelled") == 1 and seen.active[-1] == 0
        await scheduler.close()

    run(main())


def test_cancelled_queued_request_is_never_admitted():
    async def main():
        engine, seen = FakeStepEngine(slots=1), Recorder()
        scheduler = make(engine, seen)
        blocker = await hold_engine(scheduler, engine)
        gone = asyncio.ensure_future(scheduler.submit(prep("a", "gone")))
        await asyncio.sleep(0)
        assert scheduler.queue_depth == 1
        gone.cancel()
        await asyncio.sleep(0)
        assert scheduler.queue_depth == 0 and scheduler.in_flight("a") == 0
        engine.gate.set()
        await blocker
        await scheduler.submit(prep("a", "next"))
        assert "gone" not in [t for texts in engine.admitted() for t in texts]
        assert seen.dropped == ["CANCELLED"]
        await scheduler.close()

    run(main())


def test_full_queue_and_tenant_limit_answer_resource_exhausted():
    async def main():
        engine = FakeStepEngine(slots=1)
        scheduler = make(engine, max_queue_size=3, max_in_flight_per_tenant=2)
        blocker = await hold_engine(scheduler, engine)
        first = [asyncio.ensure_future(scheduler.submit(prep("a", f"a{i}"))) for i in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(ResourceExhaustedError, match=r"tenant 'a' has 2 requests in flight.*max_in_flight_per_tenant=2"):
            await scheduler.submit(prep("a", "a-too-many"))
        other = asyncio.ensure_future(scheduler.submit(prep("b", "b0")))  # another tenant still gets in
        await asyncio.sleep(0)
        assert scheduler.queue_depth == 3
        with pytest.raises(ResourceExhaustedError, match=r"queue is full \(3 waiting, serving.max_queue_size=3\)"):
            await scheduler.submit(prep("c", "c0"))
        engine.gate.set()
        await asyncio.gather(blocker, *first, other)
        assert scheduler.in_flight("a") == 0
        computed = [t for texts in engine.admitted() for t in texts]
        assert "a-too-many" not in computed and "c0" not in computed
        await scheduler.close()

    run(main())


def test_beam_requests_run_on_the_static_path_between_steps():
    async def main():
        engine, seen = FakeStepEngine(slots=2), Recorder()
        scheduler = make(engine, seen)
        streamed: list[int] = []
        greedy = asyncio.ensure_future(scheduler.submit(prep("a", "greedy")))
        await until(lambda: engine.steps >= 1)
        beam = await scheduler.submit(prep("b", "beam", strategy="beam", num_beams=2), on_token=streamed.append)
        assert beam.text == "maeb" and streamed == beam.token_ids
        assert (await greedy).text == "greedy"
        assert ("batch", ["beam"]) in engine.log
        assert "beam" not in [t for texts in engine.admitted() for t in texts]  # never took a slot
        assert seen.batches == [1]
        await scheduler.close()

    run(main())


def test_a_request_failing_admission_fails_alone_and_an_engine_crash_fails_only_its_rows():
    async def main():
        engine = FakeStepEngine(slots=4, fail_texts={"bad"}, crash_on_step=3)
        scheduler = make(engine)
        outcomes = await asyncio.gather(
            scheduler.submit(prep("a", "bad")), scheduler.submit(prep("b", "fine")), return_exceptions=True
        )
        assert isinstance(outcomes[0], InvalidRequestError)
        assert isinstance(outcomes[1], PromptmuxError) and "device fell over" in str(outcomes[1])
        assert scheduler.active == 0 and engine.free_slots == 4 - 0  # the crashed row left its slot
        assert (await scheduler.submit(prep("c", "again"))).text == "again"  # serving goes on
        await scheduler.close()

    run(main())


def test_an_executor_that_raises_fails_the_call_and_the_next_plan_frees_the_slots():
    """A bug or a broken device makes `execute` raise: every request of that call and every
    active one fails with the cause, and the next plan, made at once, cancels their handles, so
    the executor frees whatever slots the failed call left taken. Serving goes on."""

    class Raising(FakeStepEngine):
        raises = 0

        def execute(self, plan, stream=None):
            if self.raises:
                self.raises -= 1
                super().execute(plan, stream)  # the call took its slots before it failed
                raise RuntimeError("cuda error: an illegal memory access")
            return super().execute(plan, stream)

    async def main():
        engine = Raising(slots=4)
        scheduler = make(engine)
        engine.raises = 1
        with pytest.raises(PromptmuxError, match="illegal memory access"):
            await scheduler.submit(prep("a", "abcdef"))
        (failed,) = [handle for handle, _ in engine.plans[0].admit]
        await until(lambda: len(engine.plans) == 2)
        assert engine.plans[1].cancel == (failed,)  # the failed call left it in a slot: the next plan frees it
        assert scheduler.active == 0 and engine.active_slots == 0
        assert (await scheduler.submit(prep("c", "again"))).text == "again"
        await scheduler.close()

    run(main())


def test_max_batch_size_caps_rows_per_step():
    async def main():
        engine = FakeStepEngine(slots=8)
        scheduler = make(engine, max_batch_size=2)
        results = await asyncio.gather(*(scheduler.submit(prep(f"t{i}", "abc")) for i in range(5)))
        assert [r.text for r in results] == ["abc"] * 5
        assert max(len(rows) for rows in engine.stepped()) == 2
        await scheduler.close()

    run(main())


def test_idle_scheduler_sleeps_and_reports_no_stall():
    async def main():
        engine = FakeStepEngine(slots=2)
        scheduler = make(engine)
        await scheduler.submit(prep("a", "abc"))
        steps = engine.steps
        await asyncio.sleep(0.3)
        assert engine.steps == steps  # no step without work
        assert scheduler.stalled_for() == 0.0
        blocker = await hold_engine(scheduler, engine)
        await asyncio.sleep(0.05)
        assert scheduler.stalled_for() >= 0.04  # held inside a step with work running
        engine.gate.set()
        await blocker
        assert scheduler.stalled_for() == 0.0
        await scheduler.close()

    run(main())


def test_close_refuses_new_requests_and_fails_what_cannot_finish_in_the_grace_period():
    async def main():
        engine = FakeStepEngine(slots=1)
        scheduler = make(engine)
        blocker = await hold_engine(scheduler, engine)
        queued = asyncio.ensure_future(scheduler.submit(prep("a", "queued")))
        await asyncio.sleep(0)
        closing = asyncio.ensure_future(scheduler.close(grace_s=0.1))
        await asyncio.sleep(0)
        assert scheduler.closing
        with pytest.raises(UnavailableError, match="shutting down"):
            await scheduler.submit(prep("b", "new"))
        await closing
        with pytest.raises(UnavailableError, match="before running"):
            await queued
        with pytest.raises(UnavailableError, match="while running"):
            await blocker
        engine.gate.set()

    run(main())


def test_close_lets_running_and_queued_work_finish_within_the_grace_period():
    async def main():
        engine = FakeStepEngine(slots=1)
        scheduler = make(engine)
        blocker = await hold_engine(scheduler, engine, text="abc")
        queued = asyncio.ensure_future(scheduler.submit(prep("a", "queued")))
        await asyncio.sleep(0)
        closing = asyncio.ensure_future(scheduler.close(grace_s=5))
        await asyncio.sleep(0.01)
        engine.gate.set()
        await closing
        assert (await blocker).text == "abc" and (await queued).text == "queued"

    run(main())


def test_only_prepared_requests_are_queued():
    async def main():
        scheduler = make(FakeStepEngine())
        with pytest.raises(TypeError, match="PreparedRequest"):
            await scheduler.submit(GenerationRequest(tenant="a", text="raw", task="t"))
        await scheduler.close()

    run(main())


def test_batching_mode_picks_the_scheduler():
    engine = FakeStepEngine()
    for mode in ("mixed", "per_task"):
        built = build_scheduler(ServingConfig(batching=mode).resolved(4), engine)
        assert isinstance(built, Batcher)
    assert ServingConfig().batching == "continuous"
    with pytest.raises(ValueError, match="'continuous' \\(the default\\), 'mixed' or 'per_task'"):
        ServingConfig(batching="static")
    with pytest.raises(ValueError, match="max_encoder_tokens_per_step=0"):
        ServingConfig(max_encoder_tokens_per_step=0)


# ---------------------------------------------------------------------- the real step engine


@pytest.fixture(scope="module")
def real_engine(tmp_path_factory):
    import torch

    from promptmux.prompts.store import PromptStore
    from promptmux.serving.config import EngineConfig, ModelConfig
    from promptmux.serving.engine.core import Engine
    from promptmux.serving.model.loading import load_model

    loaded = load_model(ModelConfig(source="random:embedded", dtype="float32"))
    store = PromptStore(tmp_path_factory.mktemp("store"), d_model=loaded.d_model, max_length=128)
    generator = torch.Generator().manual_seed(3)
    for task, length in {"short": 3, "mid": 17, "long": 60}.items():
        store.register("acme", task, 0.05 * torch.randn(length, loaded.d_model, generator=generator))
    engine = Engine(loaded, store, EngineConfig(max_input_tokens=160, max_new_tokens_limit=64, max_batch_size=4,
                                                prompt_cache_rows=1024, prompt_cache_page_rows=16))
    engine.refresh_prompts()
    return engine


def real_request(engine, task: str, text: str, **params) -> PreparedRequest:
    return engine.prepare(GenerationRequest(tenant="acme", text=text, task=task, request_id=f"{task}/{text}",
                                            params=GenerationParams(**params)))


def test_real_step_engine_rows_match_each_request_alone_and_stream_step_by_step(real_engine):
    specs = [("short", "abc", 9), ("long", "a longer input " * 4, 30), ("mid", "x", 1), ("mid", "hello there", 20),
             ("long", "queued behind full slots", 12), ("short", "last one in", 25)]
    requests = [real_request(real_engine, task, text, max_new_tokens=n) for task, text, n in specs]
    beam = real_request(real_engine, "mid", "beam me", strategy="beam", num_beams=3, max_new_tokens=8)
    expected = [real_engine.run_batch([r]).results[0] for r in [*requests, beam]]

    async def main():
        seen = Recorder()
        config = ServingConfig(max_encoder_tokens_per_step=80, shared_step_rows=0).resolved(
            real_engine.config.max_batch_size)
        from promptmux.serving.engine.step.executor import StepExecutor

        scheduler = StepScheduler(config, StepExecutor(real_engine.context), observer=seen)
        streams: list[list[int]] = [[] for _ in range(len(requests) + 1)]
        jobs = []
        for i, request in enumerate([*requests, beam]):  # arrivals spread over several steps
            jobs.append(asyncio.ensure_future(scheduler.submit(request, on_token=streams[i].append)))
            await asyncio.sleep(0.003 * i)
        results = await asyncio.gather(*jobs)
        for got, want, streamed in zip(results, expected, streams):
            assert got.token_ids == want.token_ids and got.text == want.text
            assert got.finish_reason == want.finish_reason and streamed == got.token_ids
        assert len(seen.admissions) >= 2  # 6 requests, 4 slots, an 80-token budget: several admissions
        assert max(rows for rows, _ in seen.steps) <= 4 and seen.active[-1] == 0
        assert seen.batches == [1]  # the beam request ran on the static path
        await scheduler.close()

    run(main())


def test_real_step_engine_frees_a_cancelled_streams_slot_at_the_next_step(real_engine):
    from promptmux.serving.engine.step.executor import StepExecutor

    class Gated(StepExecutor):
        """Each step waits for a permit, then runs for real."""

        permits = threading.Semaphore(0)
        entered = 0  # steps the engine thread has started waiting in
        steps = 0

        def _step(self, limit, outputs):
            self.entered += 1
            assert self.permits.acquire(timeout=10)
            self.steps += 1
            return super()._step(limit, outputs)

    async def main():
        seen = Recorder()
        step_engine = Gated(real_engine.context)
        config = ServingConfig(shared_step_rows=0).resolved(real_engine.config.max_batch_size)
        scheduler = StepScheduler(config, step_engine, observer=seen)
        tokens: list[int] = []
        request = real_request(real_engine, "mid", "a stream that goes away", max_new_tokens=64)
        job = asyncio.ensure_future(scheduler.submit(request, on_token=tokens.append))
        await until(lambda: step_engine.active_slots == 1)
        step_engine.permits.release()
        await until(lambda: len(tokens) == 1)
        assert tokens[0] != real_engine.context.eos_token_id, "pick an input whose first token is not EOS"
        await until(lambda: step_engine.entered == 2)  # the engine thread now waits inside step 2
        job.cancel()  # the client went away while the engine thread waits inside step 2
        await asyncio.sleep(0.02)
        assert step_engine.active_slots == 1 and step_engine.steps == 1  # step 2 waits for its permit
        step_engine.permits.release()  # step 2 completes; the slot is freed before any step 3
        await until(lambda: step_engine.active_slots == 0)
        assert step_engine.slots - step_engine.active_slots == real_engine.config.max_batch_size
        await until(lambda: seen.freed.get("cancelled") == 1 and seen.active[-1] == 0)
        step_engine.permits.release(5)
        await asyncio.sleep(0.1)
        assert step_engine.steps == 2 and scheduler.active == 0  # nothing left to decode: no step 3
        assert len(tokens) == 1  # nothing reached the stream after its caller left
        await scheduler.close()

    run(main())
