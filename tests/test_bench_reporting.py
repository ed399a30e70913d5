"""What the harness reads and writes besides requests: Prometheus batch histograms, py-spy
profiles, the GPU report's bandwidth arithmetic."""
from __future__ import annotations

import json

import pytest

from promptmux.benchmarks.gpu_bench import nominal_bandwidth_gbps, run_gpu_bench, weight_bytes
from promptmux.benchmarks.metrics_scrape import histogram_totals, parse_prometheus, samples_from_totals
from promptmux.benchmarks.profiling import summarize_collapsed

SCRAPE = """\
# HELP ray_promptmux_batch_size Requests per engine batch
# TYPE ray_promptmux_batch_size histogram
ray_promptmux_batch_size_bucket{Component="core_worker",WorkerId="a",le="64.0"} 3.0
ray_promptmux_batch_size_count{Component="core_worker",WorkerId="a"} 3.0
ray_promptmux_batch_size_sum{Component="core_worker",WorkerId="a"} 120.0
ray_promptmux_batch_size_count{Component="core_worker",WorkerId="b",application="other"} 5.0
ray_promptmux_batch_size_sum{Component="core_worker",WorkerId="b",application="other"} 5.0
ray_promptmux_batch_distinct_tasks_sum{Component="core_worker",WorkerId="a"} 60.0
ray_promptmux_batch_distinct_tasks_sum{Component="core_worker",WorkerId="b",application="other"} 5.0
ray_other_metric{label="with \\"quotes\\""} 7
"""


def test_prometheus_text_parses_with_labels():
    samples = parse_prometheus(SCRAPE)
    assert ("ray_other_metric", {"label": 'with \\"quotes\\"'}, 7.0) in samples
    assert all(not name.startswith("#") for name, _, _ in samples)


def test_batch_histograms_sum_over_replicas_and_filter_by_application():
    everything = histogram_totals(SCRAPE)
    assert (everything.batches, everything.size_sum, everything.tasks_sum) == (8, 125, 65)
    mine = histogram_totals(SCRAPE, application="promptmux")  # unlabelled series count as any application
    assert (mine.batches, mine.size_sum, mine.tasks_sum) == (3, 120, 60)


def test_batch_samples_are_interval_means():
    from promptmux.benchmarks.metrics_scrape import HistogramTotals

    points = [(0.0, HistogramTotals(0, 0, 0)), (1.0, HistogramTotals(2, 100, 40)), (2.0, HistogramTotals(2, 100, 40)),
              (3.0, HistogramTotals(5, 130, 49))]
    samples = samples_from_totals(points)
    assert [(s.at, s.batches, s.mean_batch_size, s.mean_distinct_tasks) for s in samples] == [
        (1.0, 2, 50.0, 20.0), (3.0, 3, 10.0, 3.0)
    ]


def test_collapsed_stacks_become_shares_of_samples():
    text = (
        "run (serving/engine.py:120);_decode_group (serving/engine.py:200);generate (generation/utils.py:10) 6\n"
        "run (serving/engine.py:121);encoder (models/t5.py:50) 3\n"
        "_worker (concurrent/thread.py:80) 1\n"
    )
    profile = summarize_collapsed(text, "replica")
    assert profile.samples == 10
    shares = dict(profile.inclusive)
    assert shares["run (serving/engine.py)"] == pytest.approx(0.9)  # line numbers merged
    assert dict(profile.leaf)["generate (generation/utils.py)"] == pytest.approx(0.6)
    assert summarize_collapsed("", "idle").error


def test_bandwidth_table_prefers_the_most_specific_name():
    assert nominal_bandwidth_gbps("NVIDIA H100 80GB HBM3") == 3350
    assert nominal_bandwidth_gbps("NVIDIA H100 PCIe") == 2000
    assert nominal_bandwidth_gbps("NVIDIA H200") == 4800
    assert nominal_bandwidth_gbps("Some Future GPU") is None


def test_gpu_report_arithmetic_on_a_tiny_model_on_cpu(tmp_path):
    """The GPU benchmark's measurement and report, run on CPU with the tiny shape (no CUDA needed)."""
    out = run_gpu_bench(
        model="random:tiny", dtype="float32", device="cpu", batch_sizes=[1, 4], tasks=3, prompt_length=2,
        input_length=6, new_tokens=4, repeats=1, hbm_gbps=100.0, output=tmp_path, require_gpu=False, log=lambda *_: None,
    )
    body = json.loads((out / "gpu.json").read_text())
    assert [p["batch_size"] for p in body["points"]] == [1, 4]
    meta = body["meta"]
    assert 0 < meta["decode_weight_gb"] < meta["all_weight_gb"]
    for point in body["points"]:
        assert point["bound_all_weights_tps"] == pytest.approx(point["batch_size"] * 100e9 / (meta["all_weight_gb"] * 1e9))
        assert point["fraction_all"] == pytest.approx(point["decode_tps"] / point["bound_all_weights_tps"])
        assert point["generated_tokens"] <= point["batch_size"] * 4
    report = (out / "gpu.md").read_text()
    assert "| 4 |" in report and "decode weights" in report


def test_weight_bytes_count_tied_tensors_once():
    from promptmux.serving.model_shapes import build_random_model

    model = build_random_model("tiny")
    all_bytes, decode_bytes = weight_bytes(model)
    assert all_bytes == sum(p.numel() * 4 for p in model.parameters())  # parameters() already dedupes ties
    decoder_only = sum(p.numel() * 4 for p in model.decoder.parameters())
    assert decode_bytes >= decoder_only
