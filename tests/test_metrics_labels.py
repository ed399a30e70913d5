"""The task tag of a replica's metrics takes a bounded number of values."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.ray


def test_the_task_tag_stops_growing_at_its_bound(ray_cluster):
    from promptmux.serving.replica.metrics import MAX_TASK_LABELS, OTHER_TASKS_LABEL, ServingMetrics

    metrics = ServingMetrics()
    tags = [metrics._task_tag(f"task{i}") for i in range(MAX_TASK_LABELS + 5)]
    assert tags[:MAX_TASK_LABELS] == [f"task{i}" for i in range(MAX_TASK_LABELS)]
    assert tags[MAX_TASK_LABELS:] == [OTHER_TASKS_LABEL] * 5
    assert metrics._task_tag("task3") == "task3"  # a task tagged before keeps its own series
    assert metrics._task_tag("") == ""  # untrusted ids stay untagged, never use up the bound
    metrics.count("Generate", "acme", f"task{MAX_TASK_LABELS + 9}", "OK")  # counted, under "_other"
