"""The summary table printed at the end, the Markdown report, and summary.json."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from ..machine import MachineInfo
from .runner import ComparisonResult, RunResult, ScenarioResult

SHARED_MACHINE_NOTE = (
    "The CPU was shared with other users while this ran (load averages are in the tables), "
    "so every figure that matters is a ratio of runs measured in the same session, each the best "
    "of its repeats: other users only ever slow a run down."
)


def _ms(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value * 1000:.0f}"


def _num(value: float, digits: int = 1) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _errors(errors: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in errors.items()) or "0"


def _batch_means(run: RunResult) -> tuple[float, float, float]:
    """Mean batch size, distinct tasks per batch and engine seconds per batch over the run."""
    stats = run.server_stats
    if stats is None:
        return math.nan, math.nan, math.nan
    return stats.mean_batch_size, stats.mean_distinct_tasks, stats.mean_compute_s


# ---------------------------------------------------------------------- text table
def summary_table(results: Sequence[ScenarioResult]) -> str:
    header = ("scenario/run", "req/s", "tok/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "ok", "errors")
    rows = [header]
    for result in results:
        for run in result.runs:
            s = run.summary
            name = f"{result.scenario.name}/{run.run.name}" + (f" #{run.repeat + 1}" if result.scenario.repeat > 1 else "")
            rows.append((
                name, _num(s.throughput_rps), _num(s.throughput_tps, 0), _ms(s.latency_s.get("p50")),
                _ms(s.latency_s.get("p90")), _ms(s.latency_s.get("p99")), _ms(s.latency_s.get("max")),
                str(s.completed), _errors(s.errors),
            ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    comparisons = [c for r in results for c in r.comparisons]
    if comparisons:
        lines += ["", "comparisons:"]
        lines += [f"  {c.comparison.name}: {_num(c.ratio, 2)}" + _target_text(c) for c in comparisons]
    return "\n".join(lines)


def _target_text(c: ComparisonResult) -> str:
    if c.comparison.target is None:
        return ""
    verdict = {True: "met", False: "MISSED", None: "n/a"}[c.met]
    return f" (target {c.comparison.target}: {verdict})"


# ---------------------------------------------------------------------- markdown
def scenario_markdown(result: ScenarioResult, plots: dict[str, Path], relative_to: Path, note: str = "") -> str:
    scenario = result.scenario
    lines = [f"## {scenario.name}", ""]
    if scenario.description:
        lines += [scenario.description, ""]
    lines += _setup_lines(result)
    lines += ["", "| run | target | batching | req/s | tok/s | out tok/req | p50 ms | p90 ms | p99 ms | max ms | ok | errors "
              "| batch size | tasks/batch | engine ms/batch | load avg |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|"]
    for run in result.runs:
        s = run.summary
        size, tasks, compute = _batch_means(run)
        approx = "≈" if run.target.kind == "grpc" and not math.isnan(compute) else ""
        name = run.run.name + (f" #{run.repeat + 1}" if scenario.repeat > 1 else "")
        lines.append(
            f"| {name} | {run.run.target_kind} | {run.target.batching} | {_num(s.throughput_rps)} | "
            f"{_num(s.throughput_tps, 0)} | {_num(s.mean_output_tokens)} | {_ms(s.latency_s.get('p50'))} | "
            f"{_ms(s.latency_s.get('p90'))} | {_ms(s.latency_s.get('p99'))} | {_ms(s.latency_s.get('max'))} | "
            f"{s.completed} | {_errors(s.errors)} | {_num(size)} | {approx}{_num(tasks)} | {approx}{_ms(compute)} | "
            f"{run.load_before[0]:.1f} → {run.load_after[0]:.1f} |"
        )
    multi = [r for r in result.runs if len(r.streams) > 1 or (r.server_stats and len(r.server_stats.mean_queue_wait_s) > 1)]
    if any(r.target.kind == "grpc" and r.server_stats for r in result.runs):
        lines += ["", "Batch figures of server runs come from the replica's Prometheus metrics: batch size is "
                  "exact (requests / batches); values marked ≈ are estimates, because Ray records a histogram "
                  "observation as its bucket's midpoint."]
    if multi:
        lines += ["", "Per stream (queue wait: time queued on the replica before the request's batch started, "
                  "mean):", "",
                  "| run | stream | req/s | p50 ms | p90 ms | p99 ms | max ms | ok | errors | queue wait ms |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---|---:|"]
        for run in multi:
            waits = run.server_stats.mean_queue_wait_s if run.server_stats else {}
            for name, s in run.streams.items():
                tenants = {t for st in run.run.streams if st.name == name for t in st.workload.tenants}
                wait = [waits[t] for t in tenants if t in waits]
                lines.append(
                    f"| {run.run.name}{f' #{run.repeat + 1}' if scenario.repeat > 1 else ''} | {name} | "
                    f"{_num(s.throughput_rps)} | {_ms(s.latency_s.get('p50'))} | {_ms(s.latency_s.get('p90'))} | "
                    f"{_ms(s.latency_s.get('p99'))} | {_ms(s.latency_s.get('max'))} | {s.completed} | {_errors(s.errors)} | "
                    f"{('≈' if run.target.kind == 'grpc' else '') + _ms(sum(wait) / len(wait)) if wait else '-'} |"
                )
    lines += _cpu_lines(result)
    lines += _host_path_lines(result)
    if result.comparisons:
        lines += ["", comparisons_markdown(result.comparisons)]
    if note:
        lines += ["", note.rstrip()]
    for c in result.comparisons:
        if c.profiles:
            lines += ["", profile_markdown(c)]
    run_profiles = [p for r in result.runs for p in r.profiles]
    if run_profiles:
        lines += ["", "Profiles taken during runs:", ""]
        for p in run_profiles:
            lines += _profile_lines(p)
    if plots:
        lines += [""]
        for title, path in plots.items():
            lines.append(f"![{scenario.name}: {title}]({path.relative_to(relative_to).as_posix()})")
    records = sorted({r.records_file.parent for r in result.runs})
    lines += ["", "Raw per-request records (JSON Lines): " + ", ".join(
        f"`{p.relative_to(relative_to).as_posix()}/`" for p in records)]
    return "\n".join(lines) + "\n"


def _cpu_lines(result: ScenarioResult) -> list[str]:
    runs = [r for r in result.runs if r.cpu is not None]
    if not runs:
        return []
    groups = list(dict.fromkeys(g for r in runs for g in r.cpu.seconds))
    lines = ["", "CPU time of this machine's benchmark processes over the measurement window (psutil), as "
             "average cores busy, and per completed request:", "",
             "| run | " + " | ".join(f"{g} (cores)" for g in groups) + " | total (cores) | CPU ms/request |",
             "|---|" + "---:|" * (len(groups) + 2)]
    for run in runs:
        cells = [_num(run.cpu.cores(g), 2) if g in run.cpu.seconds else "-" for g in groups]
        name = run.run.name + (f" #{run.repeat + 1}" if result.scenario.repeat > 1 else "")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_num(run.cpu.cores(), 2)} | {_num(run.cpu_ms_per_request)} |")
    return lines


def _host_path_lines(result: ScenarioResult) -> list[str]:
    """CPU per completed request by host-path stage, for server runs that were profiled: the
    replica's py-spy samples split by stage (HOST_STAGES) times its measured CPU, the gRPC
    proxy and Ray's daemons whole, and the replica's own counters (promptmux_host_cpu_seconds)
    beside them."""
    from .profiling import host_stages

    lines: list[str] = []
    for run in result.runs:
        replica = [p for p in run.profiles if p.label.startswith("replica") and p.raw_path and not p.error]
        done = run.summary.completed
        if not replica or run.cpu is None or not run.summary.throughput_rps or not done:
            continue
        per_request_s = 1 / (run.summary.throughput_rps * run.cpu.window_s)  # 1 / requests in the window
        samples = host_stages(Path(replica[0].raw_path).read_text())
        total = sum(samples.values())
        replica_s = run.cpu.seconds.get("replica", 0.0)
        name = run.run.name + (f" #{run.repeat + 1}" if result.scenario.repeat > 1 else "")
        lines += ["", f"Host path of `{name}`, CPU ms per completed request by stage (replica: py-spy samples "
                  f"x its CPU time; {total} samples):", "", "| stage | share of replica samples | CPU ms/request |",
                  "|---|---:|---:|"]
        for stage, count in sorted(samples.items(), key=lambda item: -item[1]):
            lines.append(f"| replica: {stage} | {count / total:.0%} | {1000 * replica_s * count / total * per_request_s:.2f} |")
        for group in ("gRPC proxy", "Ray daemons", "Serve controller", "load generator"):
            if group in run.cpu.seconds:
                lines.append(f"| {group} (whole process) | | {1000 * run.cpu.seconds[group] * per_request_s:.2f} |")
        lines.append(f"| **all processes** | | **{_num(run.cpu_ms_per_request)}** |")
        counters = run.server_stats.host_cpu_s if run.server_stats else {}
        if counters:
            requests = run.summary.throughput_rps * run.cpu.window_s
            lines += ["", "The replica's own counters over the run (thread CPU time per request): " + ", ".join(
                f"{part} {1000 * s / requests:.2f} ms" for part, s in sorted(counters.items())) + "."]
    return lines


def _setup_lines(result: ScenarioResult) -> list[str]:
    scenario = result.scenario
    if result.address is not None:
        lines = [_measured_server_line(result)]
    else:
        engine = ", ".join(f"{k}={v}" for k, v in scenario.engine.items()) or "defaults"
        lines = [f"Model `{scenario.model.get('source', 'embedded')}` ({scenario.model.get('dtype', 'float32')}), engine {engine}.",
                 "Server variants: " + "; ".join(
                     f"`{name}` ({', '.join(f'{k}={v}' for k, v in opts.items()) or 'defaults'})"
                     for name, opts in scenario.servers.items()
                 ) + "."]
    if scenario.repeat > 1:
        lines.append(f"Each run {scenario.repeat} times, interleaved; comparisons take each run's best repeat.")
    lines += ["", "| run | stream | workload | load |", "|---|---|---|---|"]
    for run in scenario.runs:
        for stream in run.streams:
            lines.append(f"| {run.name} | {stream.name} | {stream.workload.describe()} | {stream.load.describe()} |")
    return lines


def _measured_server_line(result: ScenarioResult) -> str:
    """What a running server (not started by the harness) runs, as its Health said: the
    scenario's own model, engine and server settings describe a server the harness did not start."""
    info = next((run.target for run in result.runs if run.target.kind == "grpc"), None)
    if info is None:
        return f"Server at {result.address}: no run reached it."
    dtype = f" ({info.dtype})" if info.dtype else ""
    slots = f", {info.max_batch_size} rows at once" if info.max_batch_size else ""
    return (f"Server at {result.address} (running before the harness; its Health reports): model `{info.model}`{dtype}, "
            f"{info.batching} batching{slots}. The scenario's model, engine and server settings do not apply to it.")


def comparisons_markdown(comparisons: Sequence[ComparisonResult]) -> str:
    lines = ["| comparison | metric | numerator | denominator | ratio | target | verdict |",
             "|---|---|---:|---:|---:|---|---|"]
    for c in comparisons:
        comp = c.comparison
        metric = comp.metric + (f" ({comp.stream})" if comp.stream else "")
        fmt = _ms if comp.metric.startswith("latency") else _num
        verdict = {True: "met", False: f"**missed** ({_miss_text(c)})", None: "-"}[c.met]
        lines.append(
            f"| {comp.name} | {metric} | {comp.numerator}: {fmt(c.numerator)} | {comp.denominator}: {fmt(c.denominator)} | "
            f"{_num(c.ratio, 2)} | {comp.target or '-'} | {verdict} |"
        )
    notes = [f"- {c.comparison.name}: {c.comparison.note}" for c in comparisons if c.comparison.note]
    if notes:
        lines += [""] + notes
    return "\n".join(lines)


def _miss_text(c: ComparisonResult) -> str:
    target = c.comparison.target
    if target is None or math.isnan(c.ratio) or not target.value:
        return ""
    if target.op in (">=", ">"):
        return f"{c.ratio / target.value:.0%} of the goal"
    return f"{c.ratio / target.value:.1f}x the limit"


def profile_markdown(c: ComparisonResult) -> str:
    lines = [f"Profile of `{c.comparison.profile or c.comparison.numerator}`, taken because "
             f"\"{c.comparison.name}\" missed its target:", ""]
    for p in c.profiles:
        lines += _profile_lines(p)
    return "\n".join(lines)


def _profile_lines(p) -> list[str]:
    if p.error:
        return [f"- {p.label}: {p.error}"]
    lines = [f"- {p.label}, {p.samples} samples (py-spy, {Path(p.raw_path).name}). Share of samples with the "
             "function on the stack:"]
    lines += [f"  - {share:.0%} `{name}`" for name, share in p.inclusive[:10]]
    lines += ["  Innermost frames: " + ", ".join(f"`{name}` {share:.0%}" for name, share in p.leaf[:6])]
    return lines


def write_report(
    results: Sequence[ScenarioResult],
    folder: Path,
    machine: MachineInfo,
    *,
    title: str,
    intro: Sequence[str] = (),
    plots: dict[str, dict[str, Path]] | None = None,
    extra_sections: Sequence[str] = (),
    notes: dict[str, str] | None = None,
) -> Path:
    plots = plots or {}
    lines = [f"# {title}", ""]
    lines += list(intro)
    lines += [f"Machine: {machine.describe()}. Load average at the start: "
              f"{', '.join(f'{v:.2f}' for v in machine.load_average)}.", "", SHARED_MACHINE_NOTE, ""]
    all_comparisons = [c for r in results for c in r.comparisons if c.comparison.target is not None]
    if all_comparisons:
        lines += ["## Targets", "", comparisons_markdown(all_comparisons), ""]
    lines += list(extra_sections)
    for result in results:
        lines.append(scenario_markdown(result, plots.get(result.scenario.name, {}), folder,
                                       (notes or {}).get(result.scenario.name, "")))
    path = folder / "report.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


def write_summary_json(results: Sequence[ScenarioResult], folder: Path, machine: MachineInfo) -> Path:
    body = {
        "machine": machine.to_dict(),
        "scenarios": [
            {
                "name": r.scenario.name,
                "source": r.scenario.source,
                "runs": [
                    {
                        "run": run.run.name,
                        "repeat": run.repeat,
                        "target": run.run.target,
                        "batching": run.target.batching,
                        "summary": run.summary.to_dict(),
                        "streams": {k: v.to_dict() for k, v in run.streams.items()},
                        "records": str(run.records_file.relative_to(folder)),
                        "load_average": [run.load_before, run.load_after],
                    }
                    for run in r.runs
                ],
                "comparisons": [
                    {"name": c.comparison.name, "ratio": c.ratio, "numerator": c.numerator,
                     "denominator": c.denominator, "target": str(c.comparison.target or ""), "met": c.met}
                    for c in r.comparisons
                ],
            }
            for r in results
        ],
    }
    path = folder / "summary.json"
    path.write_text(json.dumps(body, indent=2, default=_json_default))
    return path


def _json_default(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)
