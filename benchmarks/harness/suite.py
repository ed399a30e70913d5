"""The standard CPU suite: `promptmux bench suite` (the README's `./dev bench-cpu`).

Runs the shipped scenarios that carry the project's performance targets, on one
harness-started server (every server variant a separate Serve application) plus the engine
in this process, and writes `benchmarks/results/<date>-<machine>/`: report.md, summary.json,
plots/*.png and records/<scenario>/*.jsonl. Sized to finish within about ten minutes on a
2-core machine; `--scale` shortens (or lengthens) every run for a quick look.
"""
from __future__ import annotations

import dataclasses
import datetime
import shlex
import sys
import time
from pathlib import Path
from typing import Sequence

from .analysis import Context, notes_for
from .engine_figures import EngineBench, penalty_markdown, scaling_markdown
from ..machine import busy_elsewhere, load_average, machine_info, results_folder_name
from .plots import plot_scenario
from .report import summary_table, write_report, write_summary_json
from .runner import HarnessOptions, run_scenarios
from .scenario import Scenario, load_scenario

SUITE = ("capacity", "mixed_penalty", "mixed_vs_per_task", "serving_overhead", "fairness", "prompt_length")
RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"


def scale_scenario(scenario: Scenario, factor: float) -> Scenario:
    """Every stream's duration and warm-up multiplied by `factor` (request counts unchanged)."""
    if factor == 1:
        return scenario
    runs = []
    for run in scenario.runs:
        streams = tuple(
            dataclasses.replace(
                s,
                load=dataclasses.replace(
                    s.load,
                    duration_s=None if s.load.duration_s is None else s.load.duration_s * factor,
                    warmup_s=s.load.warmup_s * factor,
                ),
            )
            for s in run.streams
        )
        runs.append(dataclasses.replace(run, streams=streams))
    return scenario.with_overrides(runs=tuple(runs))


def estimated_seconds(scenarios: Sequence[Scenario]) -> float:
    return sum(
        scenario.repeat * sum(max((s.load.duration_s or 0) for s in run.streams) for run in scenario.runs)
        for scenario in scenarios
    )


def run_suite(
    *,
    output: Path | None = None,
    names: Sequence[str] = SUITE,
    scale: float = 1.0,
    options: HarnessOptions | None = None,
    argv: Sequence[str] | None = None,
) -> Path:
    machine = machine_info()
    folder = output or RESULTS_DIR / results_folder_name(machine)
    folder.mkdir(parents=True, exist_ok=True)
    scenarios = [scale_scenario(load_scenario(name), scale) for name in names]
    options = dataclasses.replace(options, output=folder) if options else HarnessOptions(output=folder)
    options.profile_on_miss = True
    options.compress_records = True  # suite results are committed: keep them small
    log = options.log
    log(f"promptmux bench suite: {len(scenarios)} scenarios, about {estimated_seconds(scenarios) / 60:.1f} min of load "
        f"plus start-up; results in {folder}")
    log(f"machine: {machine.describe()}; load average {machine.load_average}")
    before = busy_elsewhere()
    started = time.time()
    results = run_scenarios(scenarios, options)
    context, engine_text = _engine_figures(scenarios, log)
    elapsed = time.time() - started
    after = busy_elsewhere()
    plots = {r.scenario.name: plot_scenario(r, folder / "plots") for r in results}
    notes = notes_for(results, context)
    end_load = load_average()
    command = "promptmux bench suite" + (" " + shlex.join(argv) if argv else "")
    intro = [
        "Standard CPU suite of promptmux: the project's performance targets, measured end to end "
        "(gRPC client → Ray Serve gRPC proxy → replica → fair batcher → engine) against baselines "
        "measured in the same session. Re-run with `./dev bench-cpu` "
        f"(`{command}`).",
        "",
        f"Run on {datetime.datetime.fromtimestamp(started):%Y-%m-%d %H:%M} in {elapsed / 60:.1f} min. "
        f"Load average (1, 5, 15 min) at the start {machine.load_average}, at the end {end_load}. "
        f"Other users' processes kept {before[0]:.1f} of the {machine.cores} cores busy just before the suite "
        f"({', '.join(before[1]) or 'none notable'}) and {after[0]:.1f} just after ({', '.join(after[1]) or 'none notable'}).",
        "",
        "Setup shared by the scenarios: the embedded model's shape (ByT5 vocabulary, d_model 256, 3+3 "
        "layers) with random weights, so output lengths are set by `max_new_tokens` rather than by "
        "what a trained model learned; fp32; one torch thread per replica and for engine-direct (the "
        "2 cores also carry the load generator, the gRPC proxy and Ray); one Serve replica per server "
        "variant, all on one private Ray cluster started by the harness; greedy decoding.",
        "",
    ]
    write_report(results, folder, machine, title="promptmux benchmark report: standard CPU suite",
                 intro=intro, plots=plots, extra_sections=[_reading_guide(), "", *engine_text], notes=notes)
    write_summary_json(results, folder, machine)
    print(summary_table(results))
    print(f"\nreport: {folder / 'report.md'}")
    return folder


def _engine_figures(scenarios: Sequence[Scenario], log) -> tuple[Context, list[str]]:
    """Engine-level batch scaling and mixing penalty on the per-task scenario's model and
    workload, after the server has stopped, so nothing else of ours runs beside them."""
    source = next((s for s in scenarios if s.name == "mixed_vs_per_task"), scenarios[0])
    run = next((r for r in source.runs if r.streams[0].workload.tasks == 64), source.runs[0])
    workload = run.streams[0].workload
    threads = source.servers[run.variant].get("torch_threads")
    log("measuring engine-level batch scaling and mixing penalty ...")
    bench = EngineBench(source.model, source.engine, threads)
    try:
        scaling = bench.batch_scaling(workload)
        penalty = bench.mixing_penalty(workload)
    finally:
        bench.close()
    described = (f"Model `{source.model.get('source')}`, {workload.describe()}, "
                 f"{threads or 'default'} torch thread(s).")
    return Context(scaling=scaling, penalty=penalty), [scaling_markdown(scaling, described), penalty_markdown(penalty)]


def _reading_guide() -> str:
    return "\n".join([
        "## How to read this",
        "",
        "- Throughput is the rate of replies that arrived inside the measurement window (after the warm-up, "
        "before the load stopped), as the slope of their cumulative count, so a batch's replies landing just "
        "inside or outside the window do not move it. Latency runs from sending a request to its reply, at "
        "the client, for requests sent inside the window.",
        "- Closed-loop runs keep N requests in flight (N = 2 × the batch size, so a full batch waits while one "
        "computes); open-loop runs send Poisson arrivals at a fixed rate.",
        "- Batch size is exact (completed requests over batches, from the replica's Prometheus counters, or the "
        "engine itself for engine-direct runs). Tasks per batch, engine time per batch and queue waits of "
        "server runs are marked ≈: Ray records a histogram observation as its bucket's midpoint.",
        "- CPU tables give the CPU time of every process of a run (load generator, proxy, replica, Ray) over "
        "the window, from psutil: other users' load moves it far less than it moves wall-clock figures.",
        "- Ratio scenarios run each run several times, a b b a, and compare each run's best repeat. A missed "
        "target comes with a py-spy profile of the serving processes, taken in an extra run afterwards.",
    ])


def main(argv: Sequence[str] | None = None) -> int:  # pragma: no cover - the CLI calls run_suite
    run_suite(argv=argv)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
