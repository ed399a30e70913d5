"""Scenario files and the `promptmux bench` command line: every shipped scenario is valid for
the serving layer, sweeps expand, mistakes fail with a message that says what to fix."""
from __future__ import annotations

import pytest
import torch

from promptmux.benchmarks.harness.bench_cli import apply_overrides, scenario_from_flags
from promptmux.benchmarks.harness.scenario import SCENARIO_DIR, load_scenario, parse_scenario
from promptmux.benchmarks.harness.suite import SUITE, estimated_seconds, scale_scenario
from promptmux.serving.cli.main import build_parser, main
from promptmux.serving.config import AppConfig

SHIPPED = sorted(p.stem for p in SCENARIO_DIR.glob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_scenario_parses_into_valid_application_args(name, tmp_path):
    scenario = load_scenario(name)
    assert scenario.runs
    for variant in scenario.servers:
        config = AppConfig.from_args(scenario.app_args(variant, store_root=str(tmp_path), api_keys_file="keys.yaml"))
        assert config.serving.batching in ("continuous", "mixed", "per_task")
    run_names = {r.name for r in scenario.runs}
    for comparison in scenario.comparisons:
        assert {comparison.numerator, comparison.denominator} <= run_names


def test_the_suite_names_shipped_scenarios_and_every_target_is_there():
    assert set(SUITE) <= set(SHIPPED)
    targets = {c.name: str(c.target) for name in SUITE for c in load_scenario(name).comparisons if c.target}
    assert targets == {
        "mixed-task penalty (mixed / single prompt)": ">= 0.95",
        "mixed / per-task, 64 tasks": ">= 8",
        "gRPC + Ray Serve / engine-direct throughput at saturation": ">= 0.8",
        "steady tenant p99, under flood / alone": "<= 2",
    }
    per_task = load_scenario("mixed_vs_per_task")
    assert {r.streams[0].workload.tasks for r in per_task.runs} == {1, 8, 64, 512}
    lengths = {r.streams[0].workload.prompt_length.max for r in load_scenario("prompt_length").runs}
    assert lengths == {1, 10, 100, 1000}


def test_suite_fits_its_time_budget_and_scales():
    scenarios = [load_scenario(n) for n in SUITE]
    assert estimated_seconds(scenarios) <= 7 * 60  # load time; start-up and drains take the rest of 10 minutes
    half = [scale_scenario(s, 0.5) for s in scenarios]
    assert estimated_seconds(half) == pytest.approx(estimated_seconds(scenarios) / 2)


def test_rate_lists_sweep_into_one_run_per_rate():
    scenario = parse_scenario({
        "servers": {"mixed": {}},
        "defaults": {"load": {"mode": "open", "duration_s": 5, "warmup_s": 1}},
        "runs": [{"name": "curve", "load": {"rate": [2, 4.5, 8]}}],
    })
    assert [r.name for r in scenario.runs] == ["curve@2rps", "curve@4.5rps", "curve@8rps"]
    assert [r.streams[0].load.rate for r in scenario.runs] == [2, 4.5, 8]


def test_scenario_mistakes_fail_with_a_teaching_message():
    base = {"servers": {"mixed": {}}, "defaults": {"load": {"concurrency": 2}}, "runs": [{"name": "a"}]}
    with pytest.raises(ValueError, match="unknown scenario key"):
        parse_scenario({**base, "server": {}})
    with pytest.raises(ValueError, match="server variant 'fast' is not under `servers:`"):
        parse_scenario({**base, "runs": [{"name": "a", "target": "server:fast"}]})
    with pytest.raises(ValueError, match="target kind 'http' is unknown"):
        parse_scenario({**base, "runs": [{"name": "a", "target": "http:mixed"}]})
    with pytest.raises(ValueError, match="names no run"):
        parse_scenario({**base, "comparisons": [{"numerator": "a", "denominator": "b"}]})
    with pytest.raises(ValueError, match="run names must be unique"):
        parse_scenario({**base, "runs": [{"name": "a"}, {"name": "a"}]})
    with pytest.raises(FileNotFoundError, match="shipped scenario name"):
        load_scenario("no-such-scenario")


def test_flags_build_a_scenario_and_override_a_file():
    parser = build_parser()
    args = parser.parse_args(["bench", "run", "--tasks", "12", "--mode", "open", "--rate", "3,6",
                              "--duration", "8", "--engine-direct", "--model", "random:tiny"])
    scenario = scenario_from_flags(args)
    assert [r.name for r in scenario.runs] == ["server@3rps", "server@6rps", "engine-direct@3rps", "engine-direct@6rps"]
    assert scenario.model["source"] == "random:tiny"
    assert all(r.streams[0].workload.tasks == 12 and r.streams[0].load.duration_s == 8 for r in scenario.runs)

    args = parser.parse_args(["bench", "run", "fairness", "--duration", "6", "--popularity", "zipf:1.5"])
    scenario = apply_overrides(load_scenario("fairness"), args)
    streams = [s for r in scenario.runs for s in r.streams]
    assert all(s.load.duration_s == 6 and s.workload.popularity.s == 1.5 for s in streams)
    assert {s.workload.tenants for s in streams} == {("steady",), ("flood",)}  # other workload keys kept


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on machines without CUDA")
def test_gpu_mode_refuses_clearly_without_cuda(capsys):
    assert main(["bench", "gpu"]) == 2
    error = capsys.readouterr().err
    assert "needs a CUDA GPU" in error and "torch.cuda.is_available() is False" in error


def test_flags_against_a_running_server_take_the_tenants_of_the_keys_given():
    parser = build_parser()
    args = parser.parse_args(["bench", "run", "--address", "127.0.0.1:9000", "--key", "acme=K1", "--key", "globex=K2",
                              "--tasks", "16"])
    scenario = scenario_from_flags(args, {"acme": "K1", "globex": "K2"})
    assert {s.workload.tenants for r in scenario.runs for s in r.streams} == {("acme", "globex")}
    # --tenants still decides when given, and without --address the harness's own server uses `bench`.
    explicit = parser.parse_args(["bench", "run", "--address", "h:1", "--key", "acme=K1", "--tenants", "2", "--tasks", "4"])
    assert scenario_from_flags(explicit, {"acme": "K1"}).runs[0].streams[0].workload.tenants == ("tenant0", "tenant1")
    local = parser.parse_args(["bench", "run", "--tasks", "4"])
    assert scenario_from_flags(local, {}).runs[0].streams[0].workload.tenants == ("bench",)


@pytest.mark.parametrize("flags, missing, have", [
    ([], "['bench']", "no keys were given"),
    (["--key", "acme=K1", "--tenants", "2"], "['tenant0', 'tenant1']", "keys were given for ['acme']"),
])
def test_a_missing_key_is_a_one_line_error_before_any_connection(flags, missing, have):
    # Port 9 on loopback: nothing listens; the check must come before the harness connects.
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "run", "--address", "127.0.0.1:9", "--tasks", "4", "--no-progress", *flags])
    message = str(exit_info.value.code)
    assert "\n" not in message
    assert f"no API key for workload tenant(s) {missing} of the server at 127.0.0.1:9 ({have})" in message
    assert "--key TENANT=KEY" in message


def test_continuous_bench_builds_the_issue_table_from_its_comparisons():
    from promptmux.benchmarks.harness.continuous_bench import at_rate, figures, scenarios_for
    from promptmux.benchmarks.harness.runner import ComparisonResult, ScenarioResult

    main, ttft = scenarios_for("random:t5-small", scale=0.5)
    assert main.model["source"] == "random:t5-small" and main.name == "continuous-t5-small"
    assert max(s.load.duration_s for r in main.runs for s in r.streams) == 6.0  # t5-small runs x 1.5
    assert {s.load.rate for r in main.runs for s in r.streams if s.load.rate} == {2.5, 1.0}  # rates x 0.25
    assert {r.variant for r in main.runs} == {"static", "continuous", "per_task", "continuous_all_rows"}
    assert all(s.load.rate == 12.5 and s.load.stream for r in at_rate(ttft, 12.5).runs for s in r.streams)
    # Fake ratios: numerator 6, denominator 2 -> every ratio 3.
    results = [ScenarioResult(s, [], [ComparisonResult(c, 6.0, 2.0) for c in s.comparisons], 0, 0) for s in (main, ttft)]
    rows = {row.name: row for row in figures(*results)}
    assert len(rows) == 6
    fairness = rows["steady tenant p99 under a flood ÷ alone (harness fairness scenario)"]
    assert (fairness.static, fairness.continuous, fairness.met) == (3.0, 3.0, True)
    assert (fairness.all_rows, fairness.all_rows_met) == (3.0, True)
    assert rows["time to first token p50 at 75% of capacity: static ÷ continuous"].met is False  # 3 < 5
    assert rows["mixed ÷ per-task, 64 tasks"].met is True  # continuous 3 is not below static 3
