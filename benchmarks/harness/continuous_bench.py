"""`promptmux bench continuous`: continuous batching against the static path, as one table.

Runs the `continuous` scenario (fairness, the short-versus-long variant, throughput at
saturation, mixed-task penalty, mixed over per-task), then `continuous_ttft` at 75% of the
static path's saturation throughput just measured, for each model (the embedded shape and a
t5-small shape by default, random weights, so output lengths are set by max_new_tokens), all
on one harness-started server where every (model, batching mode) is its own Serve
application. Writes `benchmarks/results/<date>-<machine>/continuous-batching/`: report.md
with the issue's table, summary.json, plots and per-request records.
"""
from __future__ import annotations

import asyncio
import dataclasses
import datetime
import math
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..machine import busy_elsewhere, load_average, machine_info, results_folder_name
from .plots import plot_scenario
from .report import summary_table, write_report, write_summary_json
from .runner import Environment, HarnessOptions, ScenarioResult, run_scenario
from .scenario import Scenario, load_scenario
from .suite import RESULTS_DIR, estimated_seconds, scale_scenario

MODELS = ("random:embedded", "random:t5-small")
# t5-small computes about 10x the embedded shape per token: its open-loop rates are cut and
# its runs lengthened, so the steady tenant alone stays well under capacity and a run still
# sees enough completions.
LOAD_ADJUSTMENTS = {"random:t5-small": (0.25, 1.5)}  # model -> (rate factor, duration factor)
CAPACITY_SHARE = 0.75  # TTFT is measured at this share of the static path's saturation throughput


@dataclass(frozen=True)
class Figure:
    """One row of the table: a ratio for the static path and for continuous batching."""

    name: str
    static: float
    continuous: float
    target: str
    met: bool | None
    # the step loop running every row every step (server continuous_all_rows,
    # serving.shared_step_rows: 0): what limiting a step's rows for a light tenant buys
    all_rows: float = math.nan
    all_rows_met: bool | None = None


def model_slug(source: str) -> str:
    return source.removeprefix("random:").replace(":", "-").replace("/", "-")


def scenarios_for(model: str, scale: float) -> tuple[Scenario, Scenario]:
    slug = model_slug(model)
    main = load_scenario("continuous", overrides={"model": {"source": model}, "name": f"continuous-{slug}"})
    ttft = load_scenario("continuous_ttft", overrides={"model": {"source": model}, "name": f"continuous_ttft-{slug}"})
    rate_factor, duration_factor = LOAD_ADJUSTMENTS.get(model, (1.0, 1.0))
    return (scale_scenario(scale_rates(main, rate_factor), scale * duration_factor),
            scale_scenario(ttft, scale * duration_factor))


def scale_rates(scenario: Scenario, factor: float) -> Scenario:
    """Every open-loop stream's rate multiplied by `factor`."""
    if factor == 1:
        return scenario
    runs = tuple(
        dataclasses.replace(run, streams=tuple(
            dataclasses.replace(s, load=dataclasses.replace(s.load, rate=s.load.rate * factor)) if s.load.rate else s
            for s in run.streams))
        for run in scenario.runs
    )
    return scenario.with_overrides(runs=runs)


def at_rate(scenario: Scenario, rate: float) -> Scenario:
    runs = tuple(
        dataclasses.replace(run, streams=tuple(
            dataclasses.replace(s, load=dataclasses.replace(s.load, rate=rate)) for s in run.streams))
        for run in scenario.runs
    )
    return scenario.with_overrides(runs=runs)


def figures(main: ScenarioResult, ttft: ScenarioResult | None) -> list[Figure]:
    """The issue's table from one model's results (each ratio from runs of the same session)."""
    by_name = {c.comparison.name: c for r in (main, ttft) if r is not None for c in r.comparisons}

    def ratio(name: str) -> float:
        c = by_name.get(name)
        return c.ratio if c is not None else math.nan

    def check(value: float, op: str, bound: float) -> bool | None:
        if math.isnan(value):
            return None
        return value <= bound if op == "<=" else value >= bound

    fair_c = ratio("fairness: steady p99 under flood / alone, continuous")
    sl_c = ratio("short vs long: steady p99 under flood / alone, continuous")
    sat = ratio("throughput at saturation, outputs 4..64: continuous / static")
    fair_all = ratio("fairness: steady p99 under flood / alone, continuous, every row")
    sl_all = ratio("short vs long: steady p99 under flood / alone, continuous, every row")
    ttft_ratio = ratio("time to first token p50 at 75% of capacity: static / continuous")
    penalty = ratio("mixed-task penalty, continuous (mixed / single prompt)")
    mvp_s = ratio("mixed / per-task, 64 tasks, static")
    mvp_c = ratio("mixed / per-task, 64 tasks, continuous")
    return [
        Figure("steady tenant p99 under a flood ÷ alone (harness fairness scenario)",
               ratio("fairness: steady p99 under flood / alone, static"), fair_c, "≤ 3", check(fair_c, "<=", 3),
               fair_all, check(fair_all, "<=", 3)),
        Figure("the same, short vs long (8-token steady jobs vs 64-token floods)",
               ratio("short vs long: steady p99 under flood / alone, static"), sl_c, "≤ 3", check(sl_c, "<=", 3),
               sl_all, check(sl_all, "<=", 3)),
        Figure("throughput at saturation, outputs 4..64, 64 tasks: continuous ÷ static",
               1.0, sat, "≥ 1.5", check(sat, ">=", 1.5)),
        Figure(f"time to first token p50 at {CAPACITY_SHARE:.0%} of capacity: static ÷ continuous",
               1.0, ttft_ratio, "≥ 5", check(ttft_ratio, ">=", 5)),
        Figure("mixed-task penalty (mixed ÷ single prompt)", math.nan, penalty, "≥ 0.95", check(penalty, ">=", 0.95)),
        Figure("mixed ÷ per-task, 64 tasks", mvp_s, mvp_c, "not below static",
               None if math.isnan(mvp_c) or math.isnan(mvp_s) else mvp_c >= mvp_s),
    ]


def table_markdown(model: str, rows: Sequence[Figure], ttft_rate: float) -> str:
    def num(v: float) -> str:
        return "-" if v is None or math.isnan(v) else f"{v:.2f}"

    verdict = {True: "met", False: "**missed**", None: "n/a"}
    lines = [f"### `{model}`", "",
             "| figure | static (batching: mixed) | continuous | target | | continuous, every row every step | |",
             "|---|---:|---:|---|---|---:|---|"]
    for row in rows:
        other = "" if math.isnan(row.all_rows) else verdict[row.all_rows_met]
        lines.append(f"| {row.name} | {num(row.static)} | {num(row.continuous)} | {row.target} | {verdict[row.met]} "
                     f"| {num(row.all_rows)} | {other} |")
    lines += ["", f"Ratios of the same session; the two throughput/TTFT rows are continuous against static "
              f"(static reads 1.00 by definition). TTFT ran open-loop at {ttft_rate:.1f} requests/s, "
              f"{CAPACITY_SHARE:.0%} of the static path's measured saturation throughput. Continuous "
              "runs with its defaults: while a light tenant decodes next to a flood, a step runs at most "
              "16 rows, the light tenant's first (`serving.shared_step_rows`, auto: 16 on CPU). The last "
              "column runs every row every step (`shared_step_rows: 0`): on a CPU a step costs in "
              "proportion to its rows; the flood-throughput ratios in the comparisons below say what the "
              "limit costs the flood.", ""]
    return "\n".join(lines)


def run_continuous_bench(
    *,
    models: Sequence[str] = MODELS,
    output: Path | None = None,
    scale: float = 1.0,
    options: HarnessOptions | None = None,
    argv: Sequence[str] | None = None,
) -> Path:
    machine = machine_info()
    folder = output or RESULTS_DIR / results_folder_name(machine) / "continuous-batching"
    folder.mkdir(parents=True, exist_ok=True)
    options = dataclasses.replace(options, output=folder) if options else HarnessOptions(output=folder)
    options.compress_records = True
    pairs = [scenarios_for(model, scale) for model in models]
    everything = [s for pair in pairs for s in pair]
    log = options.log
    log(f"promptmux bench continuous: {len(models)} model(s), about {estimated_seconds(everything) / 60:.1f} min "
        f"of load plus start-up; results in {folder}")
    before = busy_elsewhere()
    started = time.time()
    env = Environment(everything, options)
    try:
        env.start()
        outcomes = asyncio.run(_run_all(env, pairs, options))
    finally:
        env.stop()
    elapsed = time.time() - started
    after = busy_elsewhere()
    results = [r for main, ttft, _ in outcomes for r in (main, ttft)]
    plots = {r.scenario.name: plot_scenario(r, folder / "plots") for r in results}
    tables = ["## The table", ""]
    for model, (main, ttft, rate) in zip(models, outcomes):
        tables.append(table_markdown(model, figures(main, ttft), rate))
    command = "promptmux bench continuous" + (" " + shlex.join(argv) if argv else "")
    intro = [
        "Continuous (iteration-level) batching, `serving.batching: continuous`, against the static "
        "batch-at-a-time path kept as `batching: mixed`, end to end (gRPC client → Ray Serve gRPC proxy → "
        f"replica → scheduler → engine). Re-run with `{command}`.",
        "",
        f"Run on {datetime.datetime.fromtimestamp(started):%Y-%m-%d %H:%M} in {elapsed / 60:.1f} min. "
        f"Load average (1, 5, 15 min) at the end {load_average()}. Other users' processes kept {before[0]:.1f} of "
        f"the {machine.cores} cores busy just before ({', '.join(before[1]) or 'none notable'}) and {after[0]:.1f} "
        f"just after ({', '.join(after[1]) or 'none notable'}).",
        "",
        "Setup: random weights of each named shape (so output lengths are set by `max_new_tokens`), fp32, "
        f"t5-small's open-loop rates × {LOAD_ADJUSTMENTS['random:t5-small'][0]:g} and runs × "
        f"{LOAD_ADJUSTMENTS['random:t5-small'][1]:g} (it computes about 10x more per token), "
        "64 slots (`engine.max_batch_size`), one torch thread per replica, one replica per (model, batching "
        "mode), every run once (no repeats: the run had to stay within minutes on a shared machine), greedy "
        "decoding.",
        "",
    ]
    write_report(results, folder, machine, title="promptmux benchmark: continuous batching against the static path",
                 intro=intro, plots=plots, extra_sections=tables)
    write_summary_json(results, folder, machine)
    print(summary_table(results))
    print("\n".join(tables))
    print(f"\nreport: {folder / 'report.md'}")
    return folder


async def _run_all(
    env: Environment, pairs: Sequence[tuple[Scenario, Scenario]], options: HarnessOptions
) -> list[tuple[ScenarioResult, ScenarioResult, float]]:
    out = []
    try:
        for main, ttft in pairs:
            main_result = await run_scenario(env, main, options)
            capacity = main_result.best("saturation-static", "throughput_rps")
            rate = CAPACITY_SHARE * capacity if capacity and not math.isnan(capacity) else ttft.runs[0].streams[0].load.rate
            options.log(f"{ttft.name}: open loop at {rate:.1f} requests/s ({CAPACITY_SHARE:.0%} of the static "
                        f"path's {capacity:.1f} at saturation)")
            ttft_result = await run_scenario(env, at_rate(ttft, rate), options)
            out.append((main_result, ttft_result, rate))
    finally:
        await env.close_targets()
    return out
