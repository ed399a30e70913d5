"""The Prometheus endpoint shows the serving counters move, and batches that mixed tasks."""
from __future__ import annotations

import re
import time

import pytest

pytestmark = pytest.mark.ray

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)$")


def samples(text: str, name: str, **labels: str) -> float:
    """Sum of every sample of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if not match or match["name"] != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match["labels"] or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match["value"])
    return total


def scrape_until(serving, condition, limit_s: float = 30.0) -> str:
    """Metrics reach the endpoint on Ray's report interval (1 s here): poll, bounded."""
    end = time.monotonic() + limit_s
    while True:
        text = serving.scrape()
        if condition(text):
            return text
        assert time.monotonic() < end, "metrics did not show the expected change in time"
        time.sleep(0.5)


def test_counters_move_and_batches_mix_tasks(serving):
    from promptmux.serving.proto_gen import promptmux_pb2 as pb

    ok = dict(method="Generate", tenant="acme", task="extract", status="OK")
    before = serving.scrape()
    base_ok = samples(before, "ray_promptmux_requests_total", **ok)
    base_unauth = samples(before, "ray_promptmux_requests_total", status="UNAUTHENTICATED")
    base_tokens = samples(before, "ray_promptmux_output_tokens_total", tenant="acme", task="extract")
    base_mixed = samples(before, "ray_promptmux_batch_distinct_tasks_count") - samples(
        before, "ray_promptmux_batch_distinct_tasks_bucket", le="1.0"
    )

    stub = serving.stub()
    tasks = [("acme", "extract"), ("acme", "classify"), ("globex", "tag"), ("globex", "answer")]
    futures = [
        stub.Generate.future(pb.GenerateRequest(task=task, text=f"metrics {i}", params=pb.GenerationParams(max_new_tokens=5)),
                             metadata=serving.metadata(tenant), timeout=60)
        for i, (tenant, task) in enumerate(tasks * 2)
    ]
    produced = sum(f.result().output_tokens for f, (_, task) in zip(futures, tasks * 2) if task == "extract")
    with pytest.raises(Exception):
        stub.ListTasks(pb.ListTasksRequest(), metadata=serving.metadata(None), timeout=30)

    def moved(text: str) -> bool:
        mixed = samples(text, "ray_promptmux_batch_distinct_tasks_count") - samples(
            text, "ray_promptmux_batch_distinct_tasks_bucket", le="1.0"
        )
        return (
            samples(text, "ray_promptmux_requests_total", **ok) == base_ok + 2
            and samples(text, "ray_promptmux_requests_total", status="UNAUTHENTICATED") == base_unauth + 1
            and samples(text, "ray_promptmux_output_tokens_total", tenant="acme", task="extract") == base_tokens + produced
            and mixed > base_mixed
        )

    text = scrape_until(serving, moved)
    for name in (
        "ray_promptmux_queue_wait_seconds_count",
        "ray_promptmux_batch_compute_seconds_count",
        "ray_promptmux_request_latency_seconds_count",
        "ray_promptmux_batch_size_count",
        "ray_promptmux_batch_padding_fraction_count",
        "ray_promptmux_input_tokens_total",
        "ray_promptmux_prompt_cache_misses_total",
        "ray_promptmux_queue_depth",
    ):
        assert re.search(rf"^{name}[{{ ]", text, re.MULTILINE), f"{name} is missing from the metrics endpoint"
    # Unauthenticated calls carry no tenant or task label a caller could choose.
    unauth = [line for line in text.splitlines() if 'status="UNAUTHENTICATED"' in line]
    assert unauth and all('tenant=""' in line and 'task=""' in line for line in unauth)
