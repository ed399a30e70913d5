"""The Prometheus endpoint shows the serving counters move, and batches that mixed tasks."""
from __future__ import annotations

import re

import pytest

from conftest import metric, multi_task_batches

pytestmark = pytest.mark.ray

def test_counters_move_and_batches_mix_tasks(serving):
    from promptmux.serving.rpc.proto_gen import promptmux_pb2 as pb

    ok = dict(method="Generate", tenant="acme", task="extract", status="OK")
    before = serving.scrape()
    base_ok = metric(before, "ray_promptmux_requests_total", **ok)
    base_unauth = metric(before, "ray_promptmux_requests_total", status="UNAUTHENTICATED")
    base_tokens = metric(before, "ray_promptmux_output_tokens_total", tenant="acme", task="extract")
    base_mixed = multi_task_batches(before)

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
        return (
            metric(text, "ray_promptmux_requests_total", **ok) == base_ok + 2
            and metric(text, "ray_promptmux_requests_total", status="UNAUTHENTICATED") == base_unauth + 1
            and metric(text, "ray_promptmux_output_tokens_total", tenant="acme", task="extract") == base_tokens + produced
            and multi_task_batches(text) > base_mixed
        )

    text = serving.wait_for_metrics(moved)
    for name in (
        "ray_promptmux_queue_wait_seconds_count",
        "ray_promptmux_step_seconds_count",  # continuous batching: the fixture's mode
        "ray_promptmux_admission_wait_seconds_count",
        "ray_promptmux_time_to_first_token_seconds_count",
        "ray_promptmux_generated_tokens_total",
        "ray_promptmux_active_slots",
        "ray_promptmux_request_latency_seconds_count",
        "ray_promptmux_batch_size_count",
        "ray_promptmux_batch_padding_fraction_count",
        "ray_promptmux_input_tokens_total",
        "ray_promptmux_queue_depth",
    ):
        assert re.search(rf"^{name}[{{ ]", text, re.MULTILINE), f"{name} is missing from the metrics endpoint"
    # Each prompt cache tier reports its rows in use, lookups and capacity.
    tiers = serving.wait_for_metrics(lambda t: all(
        metric(t, "ray_promptmux_prompt_tier_rows_in_use", tier=tier) > 0
        and metric(t, "ray_promptmux_prompt_tier_capacity_rows", tier=tier) > 0 for tier in ("device", "host")
    ) and metric(t, "ray_promptmux_prompt_tier_misses_total", tier="device") > 0
      # Read from disk at admission (a host miss), then copied to the device from host memory (a host hit).
      and metric(t, "ray_promptmux_prompt_tier_misses_total", tier="host") > 0
      and metric(t, "ray_promptmux_prompt_tier_hits_total", tier="host") > 0)
    assert metric(tiers, "ray_promptmux_prompt_tier_rows_in_use", tier="device") <= metric(
        tiers, "ray_promptmux_prompt_tier_capacity_rows", tier="device")
    # Unauthenticated calls carry no tenant or task label a caller could choose.
    unauth = [line for line in text.splitlines() if 'status="UNAUTHENTICATED"' in line]
    assert unauth and all('tenant=""' in line and 'task=""' in line for line in unauth)
