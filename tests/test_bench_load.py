"""The load generator keeps to its bounds (request count, duration, drain) and records every
request's outcome, against an in-memory target (no server)."""
from __future__ import annotations

import asyncio

import pytest

from promptmux.benchmarks.harness.load import LoadSpec, StreamPlan, run_streams
from promptmux.benchmarks.harness.stats import summarize
from promptmux.benchmarks.harness.load_targets import Outcome
from promptmux.benchmarks.harness.workload import RequestSampler, WorkloadSpec


class FakeTarget:
    """Answers after `delay_s`; every `fail_every`-th request fails with RESOURCE_EXHAUSTED."""

    def __init__(self, delay_s: float = 0.002, fail_every: int = 0, hang: bool = False) -> None:
        self.delay_s = delay_s
        self.fail_every = fail_every
        self.hang = hang
        self.calls = 0
        self.in_flight = 0
        self.max_in_flight = 0

    async def generate(self, request, *, stream, clock):
        self.calls += 1
        number = self.calls
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.hang:
                await asyncio.Event().wait()
            await asyncio.sleep(self.delay_s)
            if self.fail_every and number % self.fail_every == 0:
                return Outcome("RESOURCE_EXHAUSTED", error="queue full")
            return Outcome("OK", output_tokens=request.max_new_tokens, input_tokens=len(request.text) + 1,
                           first_token_at=clock() if stream else None)
        finally:
            self.in_flight -= 1


def run(load: LoadSpec, target: FakeTarget, tasks: int = 4):
    plan = StreamPlan("main", RequestSampler(WorkloadSpec(tasks=tasks, output_length="3")), load, target)
    (result,) = asyncio.run(run_streams("test", [plan], progress=False))
    return result


def test_closed_loop_stops_at_its_request_count():
    target = FakeTarget()
    result = run(LoadSpec(mode="closed", concurrency=5, duration_s=None, requests=40, warmup_s=0), target)
    assert len(result.records) == 40 == target.calls
    assert all(r.status == "OK" and r.output_tokens == 3 and not r.warmup for r in result.records)
    assert target.max_in_flight == 5


def test_warm_up_requests_are_flagged_and_excluded_from_the_count():
    target = FakeTarget(delay_s=0.01)
    result = run(LoadSpec(mode="closed", concurrency=2, duration_s=None, requests=10, warmup_s=0.1), target)
    measured = [r for r in result.records if not r.warmup]
    warm = [r for r in result.records if r.warmup]
    assert len(measured) == 10 and warm
    assert all(r.issued_at < 0.1 for r in warm) and all(r.issued_at >= 0.1 for r in measured)
    summary = summarize(result.records, result.warmup_s, result.stopped_at)
    assert summary.issued == 10 and summary.completed == 10


def test_duration_bound_stops_issuing_at_the_deadline():
    target = FakeTarget(delay_s=0.005)
    result = run(LoadSpec(mode="closed", concurrency=3, duration_s=0.3, warmup_s=0.05), target)
    assert result.records
    assert all(r.issued_at < 0.3 for r in result.records)
    assert result.stopped_at <= 0.3
    assert all(r.status == "OK" for r in result.records)  # drained: every issued request got its reply


def test_open_loop_sends_its_request_count_and_records_failures():
    target = FakeTarget(fail_every=4)
    result = run(LoadSpec(mode="open", rate=2000, duration_s=None, requests=24, warmup_s=0), target)
    assert len(result.records) == 24
    statuses = [r.status for r in sorted(result.records, key=lambda r: r.issued_at)]
    assert statuses.count("RESOURCE_EXHAUSTED") == 6
    summary = summarize(result.records, 0.0, result.stopped_at + 1)
    assert summary.errors == {"RESOURCE_EXHAUSTED": 6} and summary.completed == 18


def test_open_loop_duration_bound():
    target = FakeTarget()
    result = run(LoadSpec(mode="open", rate=200, duration_s=0.25, warmup_s=0), target)
    assert result.records and all(r.issued_at < 0.25 for r in result.records)


def test_unanswered_requests_are_cancelled_after_the_drain_timeout():
    target = FakeTarget(hang=True)
    result = run(LoadSpec(mode="closed", concurrency=3, duration_s=None, requests=3, warmup_s=0, drain_timeout_s=0.2),
                 target)
    assert len(result.records) == 3
    assert all(r.status == "CANCELLED" and r.finished_at >= r.issued_at for r in result.records)


def test_streaming_records_time_to_first_token():
    result = run(LoadSpec(mode="closed", concurrency=2, duration_s=None, requests=6, warmup_s=0, stream=True),
                 FakeTarget())
    assert all(r.ttft_s is not None and 0 <= r.ttft_s <= r.latency_s for r in result.records)


def test_records_round_trip_plain_and_gzipped(tmp_path):
    from promptmux.benchmarks.harness.request_records import read_records, write_records

    result = run(LoadSpec(mode="closed", concurrency=2, duration_s=None, requests=5, warmup_s=0), FakeTarget())
    for name in ("r.jsonl", "r.jsonl.gz"):
        assert write_records(tmp_path / name, result.records) == 5
        assert read_records(tmp_path / name) == result.records
    assert (tmp_path / "r.jsonl.gz").read_bytes()[:2] == b"\x1f\x8b"


def test_load_specs_refuse_unbounded_or_incomplete_settings():
    with pytest.raises(ValueError, match="needs a bound"):
        LoadSpec(mode="closed", concurrency=1, duration_s=None, requests=None)
    with pytest.raises(ValueError, match="rate > 0"):
        LoadSpec(mode="open")
    with pytest.raises(ValueError, match="must exceed warmup_s"):
        LoadSpec(mode="closed", concurrency=1, duration_s=2, warmup_s=2)
    with pytest.raises(ValueError, match="unknown load key"):
        LoadSpec.from_dict({"mode": "closed", "clients": 3})
