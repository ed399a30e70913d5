"""PNG plots of a scenario's runs (matplotlib, Agg backend: no display needed).

- latency against throughput: one point per run, runs of one sweep joined in a line;
- latency CDF: one curve per run (per stream where a run has several);
- batch size and distinct tasks per batch over time, per run.
For repeated runs each plot shows the first repeat.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from .runner import RunResult, ScenarioResult  # noqa: E402
from .stats import cdf_points  # noqa: E402

DPI = 110


def _first_repeats(result: ScenarioResult) -> list[RunResult]:
    return [r for r in result.runs if r.repeat == 0]


def _family(name: str) -> str:
    return name.split("@", 1)[0]


def _offered_load(run: RunResult) -> tuple[float, float]:
    """(total open-loop rate, total closed-loop clients) over the run's streams."""
    loads = [stream.load for stream in run.run.streams]
    return (sum(load.rate or 0.0 for load in loads if load.mode == "open"),
            sum(load.concurrency or 0 for load in loads if load.mode == "closed"))


def latency_vs_throughput(result: ScenarioResult, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    families: dict[str, list[RunResult]] = {}
    for run in _first_repeats(result):
        families.setdefault(_family(run.run.name), []).append(run)
    for family, runs in families.items():
        # Joined in order of offered load: past saturation throughput stalls or falls while
        # latency climbs, and ordering by measured throughput would draw that as a zig-zag.
        runs = sorted(runs, key=_offered_load)
        xs = [r.summary.throughput_rps for r in runs]
        for quantile, style in (("p50", "o-"), ("p99", "s--")):
            ys = [r.summary.latency_s.get(quantile, float("nan")) * 1000 for r in runs]
            ax.plot(xs, ys, style, label=f"{family} {quantile}")
    ax.set_xlabel("throughput (requests/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.set_title(f"{result.scenario.name}: latency vs throughput")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def latency_cdf(result: ScenarioResult, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in _first_repeats(result):
        by_stream: dict[str, list[float]] = {}
        start, end = _window(run)
        for record in run.records:
            if record.ok and start <= record.issued_at < end:
                by_stream.setdefault(record.stream, []).append(record.latency_s * 1000)
        for stream, values in by_stream.items():
            label = run.run.name if len(by_stream) == 1 else f"{run.run.name} / {stream}"
            xs, ys = cdf_points(values)
            ax.step(xs, ys, where="post", label=label)
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_xscale("log")
    ax.set_title(f"{result.scenario.name}: latency CDF")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def batches_over_time(result: ScenarioResult, path: Path) -> Path:
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    for run in _first_repeats(result):
        if not run.batches:
            continue
        xs = [b.at for b in run.batches]
        top.plot(xs, [b.mean_batch_size for b in run.batches], ".-", label=run.run.name)
        bottom.plot(xs, [b.mean_distinct_tasks for b in run.batches], ".-", label=run.run.name)
    top.set_ylabel("mean batch size")
    bottom.set_ylabel("distinct tasks per batch\n(server runs: ≈, from buckets)")
    bottom.set_xlabel("seconds since the run started")
    top.set_title(f"{result.scenario.name}: batches over time")
    for ax in (top, bottom):
        ax.grid(True, alpha=0.3)
    if any(r.batches for r in result.runs):
        top.legend(fontsize=7, ncol=2)
    else:
        top.text(0.5, 0.5, "no batch data (no metrics endpoint)", ha="center", transform=top.transAxes)
    note = short_run_note(result)
    if note:
        bottom.text(0.5, -0.42, note, ha="center", va="top", fontsize=7, color="firebrick", wrap=True,
                    transform=bottom.transAxes)
    return _save(fig, path)


# Ray's metrics export interval: the harness's own server exports every second, a running
# server at Ray's default (metrics_report_interval_ms, 10 s) unless it was set otherwise.
OWN_SERVER_EXPORT_S, RUNNING_SERVER_EXPORT_S = 1.0, 10.0


def short_run_note(result: ScenarioResult) -> str:
    """A warning when a server run lasted less than the server's metrics export interval: its
    batch figures then cover part of the run at most."""
    interval = RUNNING_SERVER_EXPORT_S if result.address is not None else OWN_SERVER_EXPORT_S
    short = [run.run.name for run in _first_repeats(result)
             if run.target.kind == "grpc" and run.records and _duration(run) < interval]
    if not short:
        return ""
    return (f"{', '.join(short)}: shorter than the server's metrics export interval (~{interval:g} s); "
            "its batch figures cover part of the run at most")


def _duration(run: RunResult) -> float:
    return max(r.issued_at for r in run.records) - min(r.issued_at for r in run.records)


def _window(run: RunResult) -> tuple[float, float]:
    start = max(s.load.warmup_s for s in run.run.streams)
    end = max((r.issued_at for r in run.records), default=start) + 1e-9
    return start, end


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_scenario(result: ScenarioResult, folder: Path) -> dict[str, Path]:
    name = result.scenario.name
    return {
        "latency vs throughput": latency_vs_throughput(result, folder / f"{name}-latency-throughput.png"),
        "latency CDF": latency_cdf(result, folder / f"{name}-latency-cdf.png"),
        "batches over time": batches_over_time(result, folder / f"{name}-batches.png"),
    }
