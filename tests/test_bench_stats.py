"""The benchmark's statistics and workload draws: percentiles, window summaries, Poisson
arrivals, task popularity, length distributions."""
from __future__ import annotations

import math
import random
from collections import Counter

import numpy as np
import pytest

from promptmux.benchmarks.harness.load import poisson_arrivals
from promptmux.benchmarks.harness.request_records import RequestRecord
from promptmux.benchmarks.harness.stats import cdf_points, completion_rate, percentile, summarize
from promptmux.benchmarks.harness.workload import LengthSpec, Popularity, RequestSampler, WorkloadSpec, build_tasks


def test_percentiles_on_known_data():
    data = list(range(1, 11))  # 1..10
    assert percentile(data, 0) == 1 and percentile(data, 100) == 10
    assert percentile(data, 50) == pytest.approx(5.5)
    assert percentile(data, 90) == pytest.approx(9.1)
    assert percentile([3.0], 99) == 3.0
    assert math.isnan(percentile([], 50))
    shuffled = [7, 1, 9, 3, 3, 12, 0.5, 8]
    for q in (1, 25, 50, 75, 90, 99):
        assert percentile(shuffled, q) == pytest.approx(np.percentile(shuffled, q))
    with pytest.raises(ValueError, match="0..100"):
        percentile(data, 101)


def test_cdf_points_end_at_one():
    xs, ys = cdf_points([3, 1, 2, 2])
    assert xs == [1, 2, 2, 3] and ys == [0.25, 0.5, 0.75, 1.0]


def _record(issued, finished, status="OK", tokens=4, warmup=False):
    return RequestRecord(run="r", stream="s", tenant="t", task="k", prompt_length=1, input_chars=3, max_new_tokens=4,
                         issued_at=issued, finished_at=finished, status=status, warmup=warmup, output_tokens=tokens)


def test_summary_counts_the_window_only():
    records = [
        _record(0.5, 1.5, warmup=True),  # issued in warm-up, finished in the window: counts for throughput only
        _record(1.0, 2.0),
        _record(2.0, 3.0),
        _record(3.0, 3.5, status="RESOURCE_EXHAUSTED", tokens=0),
        _record(4.0, 6.0),  # issued in the window, finished after it: counts for latency only
        _record(5.5, 6.5),  # issued after the window
    ]
    summary = summarize(records, window_start=1.0, window_end=5.0)
    assert summary.issued == 4 and summary.completed == 3
    assert summary.errors == {"RESOURCE_EXHAUSTED": 1}
    # finished in the window at 1.5, 2.0 and 3.0: the slope of the cumulative count (1, 2, 3)
    assert summary.throughput_rps == pytest.approx(completion_rate([1.5, 2.0, 3.0], [1, 1, 1], 4.0))
    assert summary.throughput_tps == pytest.approx(4 * summary.throughput_rps)
    assert summary.latency_s["max"] == pytest.approx(2.0)
    assert summary.latency_s["p50"] == pytest.approx(1.0)


def test_batched_completions_give_the_same_rate_whatever_the_window_phase():
    # Ten replies every second (one batch), each arriving within a few milliseconds.
    times = [k + 0.001 * j for k in range(1, 30) for j in range(10)]
    for start in (0.5, 0.9, 1.02, 1.5):
        end = start + 7.3
        inside = [t for t in times if start <= t <= end]
        assert completion_rate(inside, [1.0] * len(inside), end - start) == pytest.approx(10, rel=0.02)
    assert completion_rate([2.0, 2.0], [1, 1], 4.0) == 0.5  # too few distinct times: count over the window
    # One batch of 64 that took longer than the window lands within milliseconds: 64 over the
    # 12 s window, not 64 over those milliseconds.
    one_batch = [11.9 + i * 0.0005 for i in range(64)]
    assert completion_rate(one_batch, [1.0] * 64, 12.0) == pytest.approx(64 / 12)


def test_poisson_interarrival_mean_matches_the_rate():
    rate, n = 5.0, 20000
    arrivals = poisson_arrivals(rate, random.Random(7))
    times = [next(arrivals) for _ in range(n)]
    gaps = np.diff([0.0, *times])
    assert np.all(gaps > 0)
    # Exponential gaps: mean 1/rate, standard deviation 1/rate, so the sample mean's error is (1/rate)/sqrt(n).
    assert abs(gaps.mean() - 1 / rate) < 4 * (1 / rate) / math.sqrt(n)
    assert abs(gaps.std() - 1 / rate) < 0.05 * (1 / rate)


def test_zipf_popularity_follows_rank_to_the_minus_s():
    s, tasks, n = 1.2, 10, 50000
    sampler = RequestSampler(WorkloadSpec(tasks=tasks, popularity=Popularity("zipf", s), seed=3))
    counts = Counter(sampler.next_task().task for _ in range(n))
    names = [t.task for t in build_tasks(sampler.spec)]
    weights = np.array([(k + 1) ** -s for k in range(tasks)])
    expected = weights / weights.sum()
    observed = np.array([counts[name] / n for name in names])
    tolerance = 4 * np.sqrt(expected * (1 - expected) / n)
    assert np.all(np.abs(observed - expected) < tolerance)
    assert observed[0] / observed[1] == pytest.approx(2**s, rel=0.05)


def test_uniform_and_cycle_popularity():
    uniform = RequestSampler(WorkloadSpec(tasks=8, seed=1))
    counts = Counter(uniform.next_task().task for _ in range(16000))
    assert len(counts) == 8 and all(abs(c / 16000 - 1 / 8) < 4 * math.sqrt((1 / 8) * (7 / 8) / 16000) for c in counts.values())
    cycle = RequestSampler(WorkloadSpec(tasks=64, popularity=Popularity.parse("cycle")))
    window = [cycle.next_task().task for _ in range(64 * 3)]
    assert all(len(set(window[i:i + 64])) == 64 for i in range(0, len(window) - 63))


def test_workloads_that_differ_only_in_tasks_send_the_same_inputs():
    one = RequestSampler(WorkloadSpec(tasks=1), seed="x")
    many = RequestSampler(WorkloadSpec(tasks=64, popularity=Popularity("cycle")), seed="x")
    a, b = [one.next() for _ in range(50)], [many.next() for _ in range(50)]
    assert [r.text for r in a] == [r.text for r in b]
    assert len({r.task for r in a}) == 1 and len({r.task for r in b}) == 50


def test_length_specs_parse_and_sample_within_bounds():
    rng = random.Random(0)
    assert LengthSpec.parse(16) == LengthSpec("fixed", (16,))
    assert LengthSpec.parse("8:64") == LengthSpec.parse({"uniform": [8, 64]}) == LengthSpec("uniform", (8, 64))
    assert LengthSpec.parse("1,10,100") == LengthSpec.parse({"choice": [1, 10, 100]})
    draws = [LengthSpec.parse("8:64").sample(rng) for _ in range(2000)]
    assert min(draws) == 8 and max(draws) == 64
    assert {LengthSpec.parse("1,10,100").sample(rng) for _ in range(200)} == {1, 10, 100}
    with pytest.raises(ValueError, match="LOW:HIGH"):
        LengthSpec.parse("many")
    with pytest.raises(ValueError, match="low > high"):
        LengthSpec.parse("9:3")


def test_tasks_spread_over_tenants_and_prompts_are_deterministic():
    spec = WorkloadSpec.from_dict({"tenants": 3, "tasks": 7, "prompt_length": "1,10,100"})
    tasks = build_tasks(spec)
    assert [t.tenant for t in tasks] == ["tenant0", "tenant1", "tenant2"] * 2 + ["tenant0"]
    assert all(f"-l{t.prompt_length}-" in t.task for t in tasks)
    again = build_tasks(spec)
    assert all(a.prompt(8).equal(b.prompt(8)) for a, b in zip(tasks, again))
    assert tasks[0].prompt(8).shape == (tasks[0].prompt_length, 8)
    with pytest.raises(ValueError, match="every tenant at least one task"):
        WorkloadSpec.from_dict({"tenants": 4, "tasks": 2})
    with pytest.raises(ValueError, match="unknown workload key"):
        WorkloadSpec.from_dict({"task": 3})
