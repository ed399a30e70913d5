"""Tiny scenarios end to end: against the engine in this process (no Ray), and against the
shared Serve application over gRPC. Counts, statuses and files written; never durations."""
from __future__ import annotations

import json

import pytest

from promptmux.benchmarks.harness.plots import plot_scenario
from promptmux.benchmarks.harness.request_records import read_records
from promptmux.benchmarks.harness.report import summary_table, write_report, write_summary_json
from promptmux.benchmarks.harness.runner import HarnessOptions, run_scenarios
from promptmux.benchmarks.harness.scenario import parse_scenario
from promptmux.benchmarks.machine import machine_info


def tiny_scenario(target: str, tenant: str, model: str = "random:tiny") -> dict:
    return {
        "name": "tiny",
        "model": {"source": model},
        "engine": {"max_batch_size": 8, "max_new_tokens_limit": 8},
        "servers": {"mixed": {"batching": "mixed", "torch_threads": 1}, "per_task": {"batching": "per_task"}},
        "defaults": {
            "workload": {"tenants": [tenant], "tasks": 3, "prompt_length": 3, "input_length": "4:10", "output_length": 3,
                         "task_prefix": "benchtest"},
            "load": {"duration_s": None, "requests": 8, "warmup_s": 0},
        },
        "runs": [
            {"name": "closed", "target": f"{target}:mixed", "load": {"mode": "closed", "concurrency": 4}},
            {"name": "open", "target": f"{target}:mixed", "load": {"mode": "open", "rate": 40}},
        ],
        "comparisons": [{"name": "closed / open", "numerator": "closed", "denominator": "open"}],
    }


def check_outputs(results, out):
    (result,) = results
    assert [r.run.name for r in result.runs] == ["closed", "open"]
    for run in result.runs:
        assert run.summary.completed == 8 and run.summary.errors == {}
        records = read_records(run.records_file)
        assert len(records) == 8 and all(r.status == "OK" and r.output_tokens >= 1 for r in records)
        assert {r.task.split("-")[0] for r in records} == {"benchtest"}
    plots = plot_scenario(result, out / "plots")
    report = write_report(results, out, machine_info(), title="test", plots={"tiny": plots})
    write_summary_json(results, out, machine_info())
    assert all(p.exists() and p.stat().st_size > 0 for p in plots.values())
    text = report.read_text()
    assert "| closed | " in text and "plots/tiny-latency-cdf.png" in text
    summary = json.loads((out / "summary.json").read_text())
    assert [r["run"] for r in summary["scenarios"][0]["runs"]] == ["closed", "open"]
    assert "closed / open" in summary_table(results)


@pytest.mark.parametrize("batching", ["mixed", "continuous"])
def test_engine_direct_scenario_end_to_end(tmp_path, batching):
    raw = tiny_scenario("engine", "bench")
    raw["servers"]["mixed"]["batching"] = batching  # the runs' server variant, whatever its name
    scenario = parse_scenario(raw)
    results = run_scenarios([scenario], HarnessOptions(output=tmp_path, progress=False, log=lambda *_: None))
    check_outputs(results, tmp_path)
    batched = [b for r in results[0].runs for b in r.batches]
    assert batched and all(1 <= b.mean_batch_size <= 8 for b in batched)
    for run in results[0].runs:
        stats = run.server_stats
        assert list(stats.mean_queue_wait_s) == ["bench"] and stats.mean_compute_s > 0
        if batching == "mixed":
            assert stats.batches * stats.mean_batch_size == pytest.approx(8)  # every request in exactly one batch
        else:  # a "batch" is a decoder step: 8 requests of up to 3 tokens take 3 row-steps at most each
            assert 8 <= stats.batches * stats.mean_batch_size <= 8 * 3


@pytest.mark.ray
def test_scenario_against_the_running_server_then_cleans_up(serving, tmp_path):
    from conftest import ADMIN_KEY, ADMIN_TENANT

    from promptmux.serving.rpc.proto_gen import promptmux_pb2 as pb

    scenario = parse_scenario(tiny_scenario("server", ADMIN_TENANT, model=serving.args["model"]["source"]))
    options = HarnessOptions(
        output=tmp_path, address=serving.grpc_target, keys={ADMIN_TENANT: ADMIN_KEY},
        metrics_url=serving.cluster.metrics_url, progress=False, cleanup=True, log=lambda *_: None,
    )
    results = run_scenarios([scenario], options)
    check_outputs(results, tmp_path)
    assert all(r.target.kind == "grpc" and r.target.batching == serving.args["serving"]["batching"] for r in results[0].runs)
    left = serving.stub().ListPrompts(pb.ListPromptsRequest(), metadata=serving.metadata(ADMIN_TENANT), timeout=30)
    assert not [p.task for p in left.prompts if p.task.startswith("benchtest")]


@pytest.mark.ray
def test_flags_only_run_against_the_running_server_uses_the_keyed_tenant(serving, tmp_path):
    """`promptmux bench run --address ... --key acme=KEY --tasks N`: no scenario file, no --tenants."""
    import json

    from conftest import TENANT_KEYS

    from promptmux.serving.cli.main import main

    code = main(["bench", "run", "--address", serving.grpc_target, "--key", f"acme={TENANT_KEYS['acme']}",
                 "--tasks", "2", "--concurrency", "2", "--requests", "4", "--warmup", "0", "--output-length", "4",
                 "--metrics-url", serving.cluster.metrics_url, "--cleanup", "--no-plots", "--no-progress",
                 "--output", str(tmp_path)])
    assert code == 0
    records = [json.loads(line) for line in (tmp_path / "records" / "cli" / "server.jsonl").read_text().splitlines()]
    assert len(records) == 4 and {r["tenant"] for r in records} == {"acme"}
    assert (tmp_path / "report.md").exists() and (tmp_path / "summary.json").exists()
