"""What the harness reads and writes besides requests: Prometheus batch histograms, py-spy
profiles, the GPU report's bandwidth arithmetic."""
from __future__ import annotations

import json

import pytest
import torch

from promptmux.benchmarks.harness.gpu_bench import nominal_bandwidth_gbps, run_gpu_bench, weight_bytes
from promptmux.benchmarks.harness.metrics_scrape import histogram_totals, parse_prometheus, run_stats, samples_from_totals
from promptmux.benchmarks.harness.profiling import summarize_collapsed

SCRAPE = """\
# HELP ray_promptmux_batch_size Requests per engine batch
# TYPE ray_promptmux_batch_size histogram
ray_promptmux_batch_size_bucket{Component="core_worker",WorkerId="a",le="1.0"} 0.0
ray_promptmux_batch_size_bucket{Component="core_worker",WorkerId="a",le="32.0"} 1.0
ray_promptmux_batch_size_bucket{Component="core_worker",WorkerId="a",le="64.0"} 3.0
ray_promptmux_batch_size_bucket{Component="core_worker",WorkerId="a",le="+Inf"} 3.0
ray_promptmux_batch_size_count{Component="core_worker",WorkerId="a"} 3.0
ray_promptmux_batch_size_sum{Component="core_worker",WorkerId="a"} 120.0
ray_promptmux_batch_size_count{Component="core_worker",WorkerId="b",application="other"} 5.0
ray_promptmux_batch_size_sum{Component="core_worker",WorkerId="b",application="other"} 5.0
ray_promptmux_batch_distinct_tasks_bucket{WorkerId="a",le="1.0"} 2.0
ray_promptmux_batch_distinct_tasks_bucket{WorkerId="a",le="2.0"} 2.0
ray_promptmux_batch_distinct_tasks_bucket{WorkerId="a",le="4.0"} 3.0
ray_promptmux_batch_distinct_tasks_bucket{WorkerId="a",le="+Inf"} 3.0
ray_promptmux_batch_distinct_tasks_count{Component="core_worker",WorkerId="a"} 3.0
ray_promptmux_batch_distinct_tasks_sum{Component="core_worker",WorkerId="a"} 4.0
ray_promptmux_batch_compute_seconds_count{WorkerId="a"} 3.0
ray_promptmux_batch_compute_seconds_sum{WorkerId="a"} 1.5
ray_promptmux_queue_wait_seconds_count{WorkerId="a",tenant="steady"} 4.0
ray_promptmux_queue_wait_seconds_sum{WorkerId="a",tenant="steady"} 2.0
ray_promptmux_queue_wait_seconds_count{WorkerId="a",tenant="flood"} 116.0
ray_promptmux_queue_wait_seconds_sum{WorkerId="a",tenant="flood"} 116.0
ray_promptmux_requests_total{WorkerId="a",method="Generate",status="OK",tenant="steady",task="t"} 100.0
ray_promptmux_requests_total{WorkerId="a",method="Generate",status="NOT_FOUND",tenant="",task=""} 9.0
ray_promptmux_requests_total{WorkerId="a",method="ListTasks",status="OK",tenant="steady",task=""} 4.0
ray_other_metric{label="with \\"quotes\\""} 7
"""


def test_prometheus_text_parses_with_labels():
    samples = parse_prometheus(SCRAPE)
    assert ("ray_other_metric", {"label": 'with \\"quotes\\"'}, 7.0) in samples
    assert all(not name.startswith("#") for name, _, _ in samples)


def test_batch_figures_from_counters_and_whole_number_buckets():
    everything = histogram_totals(SCRAPE)
    assert everything.batches == 8
    mine = histogram_totals(SCRAPE, application="promptmux")  # unlabelled series count as any application
    assert mine.batches == 3 and mine.ok_requests == 100
    assert mine.mean_batch_size() == pytest.approx(100 / 3)  # exact: requests over batches
    # Ray's `_sum` is bucket midpoints (4 / 3 here); the buckets say two batches of 1 task, one of 3 or 4.
    assert mine.whole_number_mean("batch_tasks") == pytest.approx((1 + 1 + 3.5) / 3)
    assert mine.whole_number_mean("batch_size") == pytest.approx((17 + 48.5 * 2) / 3)
    assert mine.mean("compute_s") == 0.5
    assert mine.mean("queue_wait_s", "steady") == 0.5 and mine.mean("queue_wait_s", "flood") == 1.0


def test_batch_samples_and_run_stats_are_interval_means():
    empty = histogram_totals("")
    later = histogram_totals(SCRAPE, application="promptmux")
    idle = histogram_totals(SCRAPE, application="promptmux")
    points = [(0.0, empty), (1.0, later), (2.0, idle)]
    (sample,) = samples_from_totals(points)  # the idle second interval gives no sample
    assert (sample.at, sample.batches, sample.mean_compute_s) == (1.0, 3, 0.5)
    assert sample.mean_batch_size == pytest.approx(100 / 3) and sample.mean_distinct_tasks == pytest.approx(5.5 / 3)
    stats = run_stats(points)
    assert stats.batches == 3 and stats.mean_queue_wait_s == {"flood": 1.0, "steady": 0.5}
    assert run_stats([(0.0, empty), (1.0, empty)]) is None


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
    assert meta["nominal_gbps"] == 100.0 and meta["copy_gbps"] > 0 and meta["mode"] == "static"
    assert 0 < meta["step_weight_gb"] < meta["decoder_weight_gb"] < meta["all_weight_gb"]
    assert meta["step_weight_gb"] == pytest.approx(meta["decoder_weight_gb"] - meta["cross_kv_weight_gb"])
    per_position = meta["cache_mb_per_row_per_position"] * 1e6
    for point in body["points"]:
        batch = point["batch_size"]
        assert point["generated_tokens"] == batch * 4  # EOS suppressed: every row makes every token
        assert point["encoder_length"] == 2 + 6 + 1  # prompt rows + input bytes + EOS
        # Mean bytes of steps 2..4: weights, plus each row's cross cache and its self cache up to the step.
        cache = sum(point["encoder_length"] * per_position + step * per_position for step in (2, 3, 4)) / 3
        assert point["step_gb"] * 1e9 == pytest.approx(meta["step_weight_gb"] * 1e9 + batch * cache)
        assert point["bound_nominal_tps"] == pytest.approx(batch * 100e9 / (point["step_gb"] * 1e9))
        assert point["bound_copy_tps"] == pytest.approx(batch * meta["copy_gbps"] * 1e9 / (point["step_gb"] * 1e9))
        assert point["fraction_nominal"] == pytest.approx(point["decode_tps"] / point["bound_nominal_tps"])
    report = (out / "gpu.md").read_text()
    assert "| 4 | 9 |" in report and "bound (measured copy)" in report and "Card: **cpu**" in report


@pytest.mark.parametrize("mode", ["static", "continuous"])
def test_benchmark_rows_ignore_eos_and_run_full_length(tmp_path, mode):
    """A model that emits EOS at once (a forcing hook) still gives full rows to the GPU bench's
    runner on either path: its requests ignore EOS (GenerationParams.ignore_eos)."""
    from promptmux.benchmarks.harness.gpu_bench import batch_runner, build_engine
    from promptmux.serving.engine.types import GenerationParams, GenerationRequest

    engine = build_engine("random:tiny", "float32", "cpu", str(tmp_path), max_batch_size=4)
    eos = engine.model.config.eos_token_id

    def force_eos(module, inputs, logits):  # [B, V] or [B, T, V]
        logits[..., eos] = 1e4
        return logits

    handle = engine.model.get_output_embeddings().register_forward_hook(force_eos)
    run = batch_runner(engine, mode)
    try:
        texts = ("ab", "cde")
        if mode == "static":  # the hook reaches HF generate; the step loop scores through its own head
            early = [GenerationRequest(tenant="bench", text=t, params=GenerationParams(max_new_tokens=5)) for t in texts]
            assert run(early) == 2
        full = [GenerationRequest(tenant="bench", text=t, params=GenerationParams(max_new_tokens=5, ignore_eos=True))
                for t in texts]
        assert run(full) == 10
    finally:
        handle.remove()


def test_gpu_command_writes_to_the_output_folder_it_is_given(tmp_path, monkeypatch):
    from promptmux.benchmarks.harness import gpu_bench
    from promptmux.serving.cli.main import main

    monkeypatch.setattr(gpu_bench, "require_cuda", lambda device: None)  # a CPU stands in for the card
    out = tmp_path / "device-out" / "bench"
    code = main(["bench", "gpu", "--model", "random:tiny", "--dtype", "float32", "--device", "cpu",
                 "--batch-sizes", "2", "--tasks", "2", "--prompt-length", "2", "--input-length", "4",
                 "--new-tokens", "3", "--repeats", "1", "--hbm-gbps", "10", "--output", str(out)])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["gpu.json", "gpu.md"]
    assert json.loads((out / "gpu.json").read_text())["points"][0]["generated_tokens"] == 6


def test_gpu_bench_runs_the_step_loop_in_continuous_mode(tmp_path, monkeypatch):
    from promptmux.benchmarks.harness import gpu_bench
    from promptmux.serving.cli.main import main

    monkeypatch.setattr(gpu_bench, "require_cuda", lambda device: None)  # a CPU stands in for the card
    out = tmp_path / "bench"
    code = main(["bench", "gpu", "--mode", "continuous", "--model", "random:tiny", "--dtype", "float32",
                 "--device", "cpu", "--batch-sizes", "1,3", "--tasks", "2", "--prompt-length", "2",
                 "--input-length", "4", "--new-tokens", "4", "--repeats", "1", "--hbm-gbps", "10",
                 "--output", str(out)])
    assert code == 0
    record = json.loads((out / "gpu.json").read_text())
    # Every row ran its full length on the step loop (EOS suppressed through lm_head there too).
    assert [p["generated_tokens"] for p in record["points"]] == [4, 12]
    assert "continuous batching" in (out / "gpu.md").read_text()


def test_weight_bytes_count_tied_tensors_once():
    from promptmux.serving.model.shapes import build_random_model

    model = build_random_model("tiny")
    all_bytes, decode_bytes = weight_bytes(model)
    assert all_bytes == sum(p.numel() * 4 for p in model.parameters())  # parameters() already dedupes ties
    decoder_only = sum(p.numel() * 4 for p in model.decoder.parameters())
    assert decode_bytes >= decoder_only


def test_batch_scaling_curve_and_interpolation():
    from promptmux.benchmarks.harness.engine_figures import ScalingPoint, measure_batch_scaling, rate_at
    from promptmux.benchmarks.harness.workload import WorkloadSpec

    points = measure_batch_scaling({"source": "random:tiny"}, {"max_new_tokens_limit": 8},
                                   WorkloadSpec(tasks=2, prompt_length=2, input_length=6, output_length=2),
                                   sizes=(1, 2, 4), repeats=1)
    assert [p.batch_size for p in points] == [1, 2, 4] and all(p.seconds_per_batch > 0 for p in points)
    curve = [ScalingPoint(1, 0.1), ScalingPoint(4, 0.2)]
    assert rate_at(curve, 1) == pytest.approx(10) and rate_at(curve, 4) == pytest.approx(20)
    assert rate_at(curve, 2.5) == pytest.approx(2.5 / 0.15)  # seconds per batch interpolated
    assert rate_at(curve, 64) == pytest.approx(20)  # beyond the curve: its last rate


def test_cpu_usage_counts_this_process():
    import os
    import time

    from promptmux.benchmarks.cpu_usage import snapshot, usage

    groups = {"me": [os.getpid()], "gone": [2**22 + 7]}
    before = snapshot(groups, time.monotonic())
    total = sum(i * i for i in range(2_000_000))  # burn some CPU
    after = snapshot(groups, time.monotonic())
    used = usage(before, after)
    assert total > 0 and used.seconds["me"] > 0 and used.seconds["gone"] == 0
    assert used.total_s == used.seconds["me"]


def _run_result(scenario, name, rps, p50, p99, stats=None, streams=None):
    from pathlib import Path

    from promptmux.benchmarks.harness.runner import RunResult
    from promptmux.benchmarks.harness.stats import Summary
    from promptmux.benchmarks.harness.load_targets import TargetInfo

    spec = next(r for r in scenario.runs if r.name == name)
    summary = Summary(window_s=10, issued=int(rps * 10), completed=int(rps * 10), throughput_rps=rps,
                      latency_s={"p50": p50, "p99": p99})
    return RunResult(scenario=scenario.name, run=spec, repeat=0,
                     target=TargetInfo("grpc", "test", "random:tiny", 64, "mixed"), summary=summary,
                     streams=streams or {"main": summary}, batches=[], server_stats=stats, records=[],
                     records_file=Path("x.jsonl"), registered=0, load_before=(0, 0, 0), load_after=(0, 0, 0))


def test_notes_explain_misses_with_the_measured_numbers():
    from promptmux.benchmarks.harness.analysis import Context, notes_for
    from promptmux.benchmarks.harness.engine_figures import ScalingPoint
    from promptmux.benchmarks.harness.request_records import ServerStats
    from promptmux.benchmarks.harness.runner import ScenarioResult, evaluate
    from promptmux.benchmarks.harness.scenario import load_scenario
    from promptmux.benchmarks.harness.stats import Summary

    scaling = [ScalingPoint(1, 0.04), ScalingPoint(4, 0.06), ScalingPoint(64, 0.4)]
    per_task = load_scenario("mixed_vs_per_task")
    runs = [
        _run_result(per_task, "mixed-64", 100.0, 1.2, 1.5, ServerStats(100, 60.0, 40.0, 0.6, {})),
        _run_result(per_task, "per-task-64", 40.0, 3.0, 4.5, ServerStats(400, 4.0, 1.0, 0.1, {})),
    ]
    per_task_result = ScenarioResult(per_task, runs, evaluate(per_task, runs), 0, 0)

    fairness = load_scenario("fairness")
    steady = lambda p50, p99: Summary(window_s=10, issued=60, completed=60, throughput_rps=6, latency_s={"p50": p50, "p99": p99})
    runs = [
        _run_result(fairness, "steady-alone", 6, 0.1, 0.2, ServerStats(50, 1.2, 1.2, 0.09, {"steady": 0.05}),
                    {"steady": steady(0.1, 0.2)}),
        _run_result(fairness, "steady-under-flood", 90, 2.0, 3.0, ServerStats(90, 60, 45, 0.7, {"steady": 0.35, "flood": 1.5}),
                    {"steady": steady(1.2, 2.0), "flood": steady(2.0, 3.0)}),
    ]
    fairness_result = ScenarioResult(fairness, runs, evaluate(fairness, runs), 0, 0)

    notes = notes_for([per_task_result, fairness_result], Context(scaling=scaling))
    assert "per-task batches 4.0" in notes["mixed_vs_per_task"]
    assert "The goal of 8x is above this engine's whole batching gain" in notes["mixed_vs_per_task"]
    assert "≈350 ms against ≈1500 ms" in notes["fairness"] and "p99 ≈ 1400 ms is expected" in notes["fairness"]
    assert notes_for([per_task_result])["mixed_vs_per_task"]  # still said without the scaling curve


def test_engine_mixing_penalty_alternates_identical_texts():
    from promptmux.benchmarks.harness.engine_figures import EngineBench
    from promptmux.benchmarks.harness.workload import WorkloadSpec

    bench = EngineBench({"source": "random:tiny"}, {"max_new_tokens_limit": 8}, max_batch_size=4)
    try:
        penalty = bench.mixing_penalty(WorkloadSpec(tasks=4, prompt_length=2, input_length=6, output_length=2),
                                       batch_size=4, repeats=2)
    finally:
        bench.close()
    assert penalty.distinct_prompts == 4 and len(penalty.single_s) == len(penalty.mixed_s) == 2
    assert penalty.median_ratio > 0 and penalty.best_ratio > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_bench_on_cuda_with_a_small_shape(tmp_path):
    """The real CUDA path (copy bandwidth, bf16, merged-bias attention), on a shape that builds in seconds."""
    out = run_gpu_bench(
        model="random:t5-small", dtype="bfloat16", device="cuda", batch_sizes=[1, 8], tasks=4, prompt_length=10,
        input_length=20, new_tokens=8, repeats=1, hbm_gbps=None, output=tmp_path, log=lambda *_: None,
    )
    body = json.loads((out / "gpu.json").read_text())
    assert body["meta"]["device_name"] != "cpu" and body["meta"]["copy_gbps"] > 100
    assert [p["generated_tokens"] for p in body["points"]] == [8, 64]
    assert all(p["decode_tps"] > 0 and p["bound_copy_tps"] > 0 for p in body["points"])


def test_host_path_samples_split_by_stage():
    from promptmux.benchmarks.harness.profiling import host_stages

    text = (
        "Thread.run (threading.py:982);StepScheduler._engine_loop (serving/scheduling/step_scheduler.py:1);"
        "StepExecutor.execute (serving/engine/step/executor.py:2);StepExecutor._step (serving/engine/step/executor.py:3);"
        "ModelContext.result (serving/engine/context.py:4) 3\n"
        "Thread.run (threading.py:982);StepScheduler._engine_loop (serving/scheduling/step_scheduler.py:1);"
        "StepExecutor.execute (serving/engine/step/executor.py:2);StepExecutor._admit (serving/engine/step/executor.py:5) 5\n"
        "Thread.run (threading.py:982);Preparer._run (serving/replica/preparer.py:1);byte_ids (serving/engine/core.py:9) 2\n"
        "UserCallableWrapper._run (ray/serve/_private/replica.py:1);handler (serving/replica/server.py:144);"
        "KeyRing.authenticate (serving/replica/auth.py:87) 1\n"
        "Worker.main_loop (ray/_private/worker.py:1) 4\n"
        "Thread.run (threading.py:982) 6\n"
        "mystery (somewhere/else.py:1) 1\n"
    )
    assert host_stages(text) == {
        "engine: detokenize, results": 3, "engine: admission (encoder, cross K/V)": 5, "prepare: tokenize": 2,
        "rpc: auth": 1, "Ray core": 4, "threads in C code (gRPC and Ray polling)": 6, "other": 1,
    }


def test_the_replicas_cpu_by_part_comes_from_its_counter():
    from promptmux.benchmarks.harness.metrics_scrape import histogram_totals, run_stats

    def scrape(execute: float, prepare: float, steps: int) -> str:
        return (
            f'ray_promptmux_host_cpu_seconds_total{{application="promptmux",part="execute"}} {execute}\n'
            f'ray_promptmux_host_cpu_seconds_total{{application="promptmux",part="prepare"}} {prepare}\n'
            f'ray_promptmux_batch_size_count{{application="promptmux"}} {steps}\n'
            f'ray_promptmux_batch_size_sum{{application="promptmux"}} {steps * 4}\n'
        )

    points = [(0.0, histogram_totals(scrape(1.0, 0.5, 10))), (5.0, histogram_totals(scrape(3.5, 0.75, 30)))]
    stats = run_stats(points)
    assert stats.host_cpu_s == {"execute": 2.5, "prepare": 0.25}


def test_a_report_against_a_running_server_names_what_that_server_runs(tmp_path):
    import dataclasses

    from promptmux.benchmarks.harness.bench_cli import workload_overrides
    from promptmux.benchmarks.harness.load_targets import TargetInfo
    from promptmux.benchmarks.harness.plots import short_run_note
    from promptmux.benchmarks.harness.report import scenario_markdown
    from promptmux.benchmarks.harness.request_records import RequestRecord
    from promptmux.benchmarks.harness.runner import ScenarioResult
    from promptmux.benchmarks.harness.scenario import load_scenario

    scenario = load_scenario("mixed_vs_per_task")  # its own model and batching: random:embedded, mixed
    server = TargetInfo("grpc", "gRPC 127.0.0.1:9000", "embedded", 256, "continuous", max_batch_size=64,
                        dtype="float32")
    runs = [dataclasses.replace(_run_result(scenario, "mixed-64", 10.0, 0.1, 0.2), target=server,
                                records_file=tmp_path / "mixed-64.jsonl")]
    result = ScenarioResult(scenario, runs, [], 0, 0, address="127.0.0.1:9000")
    header = scenario_markdown(result, {}, tmp_path)
    assert ("Server at 127.0.0.1:9000 (running before the harness; its Health reports): model `embedded` (float32), "
            "continuous batching, 64 rows at once") in header
    assert "random:embedded" not in header and "Server variants" not in header
    # A run shorter than the running server's metrics export interval (10 s) is flagged on the batch plot.
    runs[0].records.extend(RequestRecord(run="mixed-64", stream="main", tenant="bench", task="t", prompt_length=4,
                                         input_chars=8, max_new_tokens=8, issued_at=t, finished_at=t + 0.1, status="OK")
                           for t in (0.0, 3.0))
    assert "shorter than the server's metrics export interval (~10 s)" in short_run_note(result)
    assert short_run_note(dataclasses.replace(result, address=None)) == ""  # the harness's own server: 1 s

    class Flags:
        tenant, tenants, tasks = ["acme", "acme", "globex"], None, 4

    assert workload_overrides(Flags()) == {"tasks": 4, "tenants": ["acme", "globex"]}
