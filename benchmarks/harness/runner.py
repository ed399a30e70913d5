"""Run scenarios: bring up the targets, register the workload's prompts, drive the load,
collect records and batch samples, and evaluate the scenario's comparisons.

Targets: every `server:<variant>` run goes to one server, the harness's own (all variants
of all scenarios deployed at once as separate Serve applications, see local_server.py) or a
running one given by address; every `engine:<variant>` run goes to one engine loaded in this
process (engine_target.py).
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..cpu_usage import CpuUsage, snapshot, usage
from .load import StreamPlan, run_streams
from ..machine import load_average
from .profiling import ProfileSummary, profile_pid
from .request_records import BatchSample, RequestRecord, ServerStats, write_records
from .scenario import METRICS, Comparison, RunSpec, Scenario
from .stats import Summary, summarize
from .load_targets import Target, TargetInfo
from .workload import RequestSampler, TaskSpec, build_tasks


@dataclass
class HarnessOptions:
    output: Path
    address: str | None = None  # a running server; None starts the harness's own
    keys: dict[str, str] = field(default_factory=dict)  # tenant -> API key, for a running server
    application: str = "promptmux"  # a running server's application name
    metrics_url: str | None = None  # a running server's Prometheus endpoint
    progress: bool = True
    profile: bool = False  # py-spy every run
    profile_on_miss: bool = False  # re-run a missed comparison's run under py-spy
    cleanup: bool = False  # delete the workload's prompts at the end (a running server)
    replica_cpus: float = 0.1
    compress_records: bool = False  # records as .jsonl.gz (results committed to the repository)
    log: Callable[[str], None] = print


@dataclass
class RunResult:
    scenario: str
    run: RunSpec
    repeat: int
    target: TargetInfo
    summary: Summary
    streams: dict[str, Summary]
    batches: list[BatchSample]
    server_stats: ServerStats | None
    records: list[RequestRecord]
    records_file: Path
    registered: int
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    cpu: CpuUsage | None = None
    profiles: list[ProfileSummary] = field(default_factory=list)

    @property
    def cpu_ms_per_request(self) -> float:
        if self.cpu is None or not self.summary.throughput_rps:
            return math.nan
        return 1000 * self.cpu.total_s / (self.summary.throughput_rps * self.cpu.window_s)

    def metric(self, name: str, stream: str | None = None) -> float:
        if name == "cpu_ms_per_request":
            return self.cpu_ms_per_request
        summary = self.streams.get(stream, self.summary) if stream else self.summary
        if name.startswith("latency_"):
            return summary.latency_s.get(name.removeprefix("latency_"), math.nan)
        if name.startswith("ttft_"):
            return summary.ttft_s.get(name.removeprefix("ttft_"), math.nan)
        return getattr(summary, name)


@dataclass
class ComparisonResult:
    comparison: Comparison
    numerator: float
    denominator: float
    profiles: list[ProfileSummary] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        if not self.denominator or math.isnan(self.denominator):
            return math.nan
        return self.numerator / self.denominator

    @property
    def met(self) -> bool | None:
        if self.comparison.target is None or math.isnan(self.ratio):
            return None
        return self.comparison.target.met(self.ratio)


@dataclass
class ScenarioResult:
    scenario: Scenario
    runs: list[RunResult]
    comparisons: list[ComparisonResult]
    started_at: float
    finished_at: float
    address: str | None = None  # the running server it measured, when the harness started none

    def best(self, run: str, metric: str, stream: str | None = None) -> float:
        """The run's best value over its repeats: other users of a shared machine only ever
        slow a run down, so the best repeat is the one least disturbed."""
        values = [r.metric(metric, stream) for r in self.runs if r.run.name == run]
        values = [v for v in values if not math.isnan(v)]
        if not values:
            return math.nan
        return max(values) if METRICS[metric] == "higher" else min(values)


class Environment:
    """The targets of every run, built once for all scenarios."""

    def __init__(self, scenarios: Sequence[Scenario], options: HarnessOptions) -> None:
        self.scenarios = list(scenarios)
        self.options = options
        self.server = None
        self._apps: dict[tuple[str, str], str] = {}  # (scenario, variant) -> application name
        self._grpc: dict[str, Target] = {}
        self._engines: dict[str, Any] = {}
        self._workdir = tempfile.TemporaryDirectory(prefix="promptmux-bench-engine-")

    # ------------------------------------------------------------------ server
    def start(self) -> None:
        needs_server = any("server" in s.variants_used for s in self.scenarios)
        if self.options.address is not None:
            for scenario in self.scenarios:
                for variant in scenario.servers:
                    self._apps[(scenario.name, variant)] = self.options.application
            return
        if not needs_server:
            return
        from ..local_server import LocalServer

        apps: dict[str, dict] = {}
        tenants: set[str] = set()
        for scenario in self.scenarios:
            for run in scenario.runs:
                tenants.update(t for s in run.streams for t in s.workload.tenants)
            for variant in sorted(scenario.variants_used.get("server", ())):
                args = scenario.app_args(variant, store_root="")
                name = self._app_name(variant, args, apps)
                apps[name] = args
                self._apps[(scenario.name, variant)] = name
        self.options.log(f"starting the benchmark server: {len(apps)} application(s) ({', '.join(apps)}) ...")
        started = time.monotonic()
        self.server = LocalServer(apps=apps, tenants=sorted(tenants), replica_cpus=self.options.replica_cpus)
        self.server.start()
        self.options.log(f"server up in {time.monotonic() - started:.0f} s on {self.server.address}")

    @staticmethod
    def _app_name(variant: str, args: dict, taken: dict[str, dict]) -> str:
        name, n = f"promptmux-{variant}".replace("_", "-"), 1
        while name in taken and taken[name] != args:
            n += 1
            name = f"promptmux-{variant}-{n}".replace("_", "-")
        return name

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
        self._workdir.cleanup()

    # ------------------------------------------------------------------ targets
    async def target(self, scenario: Scenario, run: RunSpec) -> Target:
        if run.target_kind == "engine":
            return await self._engine_target(scenario, run.variant)
        app = self._apps[(scenario.name, run.variant)]
        if app not in self._grpc:
            from .grpc_target import GrpcTarget

            if self.server is not None:
                target = GrpcTarget(self.server.address, self.server.keys, application=app,
                                    metrics_url=self.server.metrics_url)
            else:
                target = GrpcTarget(self.options.address, self.options.keys, application=app,
                                    metrics_url=self.options.metrics_url)
            await target.wait_until_serving()
            self._grpc[app] = target
        return self._grpc[app]

    async def _engine_target(self, scenario: Scenario, variant: str):
        from promptmux.serving.config import ServingConfig

        from .engine_host import EngineHost
        from .engine_target import EngineTarget

        store_root = str(self.server.store_root) if self.server is not None else f"{self._workdir.name}/prompts"
        args = scenario.app_args(variant, store_root=store_root)
        serving = ServingConfig(**{k: v for k, v in args["serving"].items() if k != "api_keys_file"})
        key = json.dumps({k: args[k] for k in ("model", "store", "engine")}, sort_keys=True)
        if key not in self._engines:
            self.options.log(f"starting the engine-direct process for {args['model'].get('source', 'embedded')} ...")
            host = await asyncio.to_thread(EngineHost, args["model"], args["engine"], args["store"], serving.torch_threads)
            self._engines[key] = EngineTarget(host, serving, torch_threads=serving.torch_threads)
        return self._engines[key].with_serving(serving)

    def process_groups(self, scenario: Scenario, run: RunSpec) -> dict[str, list[int]]:
        """This machine's processes that serve a run, by role, for CPU accounting."""
        own = [os.getpid()]
        if run.target_kind == "engine":
            return {"load generator": own, "engine": [target.host.pid for target in self._engines.values()]}
        if self.server is None:
            return {"load generator": own}
        return {"load generator": own, **self.server.process_roles(self._apps[(scenario.name, run.variant)])}

    def profile_pids(self, scenario: Scenario, run: RunSpec) -> list[tuple[str, int]]:
        if run.target_kind == "engine":
            return [(f"engine-direct process (pid {target.host.pid})", target.host.pid) for target in self._engines.values()]
        if self.server is None:
            return []
        app = self._apps[(scenario.name, run.variant)]
        out = [(f"replica {app} (pid {pid})", pid) for pid in self.server.replica_pids(app)]
        out += [(f"Serve gRPC proxy (pid {pid})", pid) for pid in self.server.proxy_pids()]
        return out

    async def close_targets(self) -> None:
        for target in self._grpc.values():
            await target.close()
        for target in self._engines.values():
            await target.host.stop()  # the engine-direct process, once per model


async def execute_run(
    env: Environment, scenario: Scenario, run: RunSpec, repeat: int, options: HarnessOptions, *, profile: bool = False
) -> RunResult:
    target = await env.target(scenario, run)
    info = await target.info()
    tasks: dict[tuple[str, str], TaskSpec] = {}
    for stream in run.streams:
        for task in build_tasks(stream.workload):
            tasks[(task.tenant, task.task)] = task
    registered = await target.ensure_prompts(list(tasks.values()), info.d_model)
    plans = [
        StreamPlan(
            name=stream.name,
            sampler=RequestSampler(stream.workload, seed=f"{stream.workload.seed}/{stream.name}/{repeat}"),
            load=stream.load,
            target=target,
        )
        for stream in run.streams
    ]
    monitor = target.batch_monitor()
    load_before = load_average()
    t0 = time.monotonic()
    if monitor is not None:
        await monitor.start(t0)
    cpu = asyncio.ensure_future(_cpu_window(lambda: env.process_groups(scenario, run), run, t0))
    profiler = None
    if profile or options.profile or run.profile:
        profiler = asyncio.ensure_future(_profile_during(env, scenario, run, repeat, options.output))
    label = f"{scenario.name}/{run.name}" + (f" #{repeat + 1}" if scenario.repeat > 1 else "")
    results = await run_streams(run.name, plans, progress=options.progress, t0=t0, label=label)
    batches = await monitor.stop() if monitor is not None else []
    profiles = await profiler if profiler is not None else []
    cpu_usage = await cpu
    records = [r for result in results for r in result.records]
    window_start = max(r.warmup_s for r in results)
    window_end = max(r.stopped_at for r in results)
    streams = {r.name: summarize(r.records, r.warmup_s, r.stopped_at) for r in results}
    suffix = f"-r{repeat + 1}" if scenario.repeat > 1 else ""
    if profile:  # an extra run for a missed target: never over a measured run's records
        suffix += "-profiled"
    extension = ".jsonl.gz" if options.compress_records else ".jsonl"
    records_file = options.output / "records" / scenario.name / f"{_file_name(run.name)}{suffix}{extension}"
    write_records(records_file, records)
    if run.target_kind == "engine":
        await target.close()  # its batcher; the engine itself stays loaded for the next run
    return RunResult(
        scenario=scenario.name,
        run=run,
        repeat=repeat,
        target=info,
        summary=summarize(records, window_start, window_end),
        streams=streams,
        batches=batches,
        server_stats=monitor.stats if monitor is not None else None,
        records=records,
        records_file=records_file,
        registered=registered,
        load_before=load_before,
        load_after=load_average(),
        cpu=cpu_usage,
        profiles=profiles,
    )


async def _cpu_window(groups, run: RunSpec, t0: float) -> CpuUsage | None:
    """CPU time over the measurement window; None for runs bounded by request count only."""
    durations = [s.load.duration_s for s in run.streams]
    if any(d is None for d in durations):
        return None
    start, end = max(s.load.warmup_s for s in run.streams), min(durations)
    await asyncio.sleep(max(0.0, t0 + start - time.monotonic()))
    before = snapshot(groups(), time.monotonic())
    await asyncio.sleep(max(0.0, t0 + end - time.monotonic()))
    return usage(before, snapshot(groups(), time.monotonic()))


async def _profile_during(env: Environment, scenario: Scenario, run: RunSpec, repeat: int, output: Path):
    """py-spy the run's serving processes over its measurement window."""
    load = run.streams[0].load
    await asyncio.sleep(load.warmup_s)
    duration = max(1.0, (load.duration_s or 10.0) - load.warmup_s)
    folder = output / "profiles" / scenario.name
    jobs = [
        profile_pid(pid, duration, folder / f"{_file_name(run.name)}-r{repeat + 1}-{pid}.txt", label)
        for label, pid in env.profile_pids(scenario, run)
    ]
    return list(await asyncio.gather(*jobs))


def _file_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.@" else "_" for c in name)


def evaluate(scenario: Scenario, runs: list[RunResult]) -> list[ComparisonResult]:
    partial = ScenarioResult(scenario, runs, [], 0.0, 0.0)
    return [
        ComparisonResult(c, partial.best(c.numerator, c.metric, c.stream), partial.best(c.denominator, c.metric, c.stream))
        for c in scenario.comparisons
    ]


async def run_scenario(env: Environment, scenario: Scenario, options: HarnessOptions) -> ScenarioResult:
    started = time.time()
    runs: list[RunResult] = []
    for repeat, run in scenario.ordered_runs():
        result = await execute_run(env, scenario, run, repeat, options)
        runs.append(result)
        options.log(_one_line(result))
    comparisons = evaluate(scenario, runs)
    if options.profile_on_miss:
        for comparison in comparisons:
            if comparison.met is False:
                name = comparison.comparison.profile or comparison.comparison.numerator
                spec = next(r for r in scenario.runs if r.name == name)
                options.log(f"target missed ({comparison.comparison.name}): profiling {name} ...")
                profiled = await execute_run(env, scenario, spec, scenario.repeat, options, profile=True)
                comparison.profiles = profiled.profiles
    if options.cleanup:
        await _cleanup(env, scenario)
    return ScenarioResult(scenario, runs, comparisons, started, time.time(), address=options.address)


async def _cleanup(env: Environment, scenario: Scenario) -> None:
    for run in scenario.runs:
        target = await env.target(scenario, run)
        tasks = [t for s in run.streams for t in build_tasks(s.workload)]
        await target.delete_prompts(tasks)


def _one_line(result: RunResult) -> str:
    s = result.summary
    errors = f", errors {s.errors}" if s.errors else ""
    p = s.latency_s
    return (
        f"  {result.scenario}/{result.run.name}{'' if not result.repeat else f' #{result.repeat + 1}'}: "
        f"{s.throughput_rps:.1f} req/s, {s.throughput_tps:.0f} tok/s, p50 {p.get('p50', math.nan) * 1000:.0f} ms, "
        f"p99 {p.get('p99', math.nan) * 1000:.0f} ms ({s.completed}/{s.issued} ok{errors})"
    )


def run_scenarios(scenarios: Sequence[Scenario], options: HarnessOptions) -> list[ScenarioResult]:
    """Run scenarios one after another on shared targets; always stops what it started."""
    env = Environment(scenarios, options)
    try:
        env.start()
        return asyncio.run(_run_all(env, scenarios, options))
    finally:
        env.stop()


async def _run_all(env: Environment, scenarios: Sequence[Scenario], options: HarnessOptions) -> list[ScenarioResult]:
    try:
        return [await run_scenario(env, scenario, options) for scenario in scenarios]
    finally:
        await env.close_targets()
