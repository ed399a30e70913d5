"""What limits each suite figure, said with the numbers the run measured: batch sizes from
the replica's metrics, the engine-level figures (engine_figures.py), queue waits, CPU time
per request. Each function reads one shipped scenario's result and returns Markdown (empty
when the runs it needs are missing, e.g. a scenario run with other run names)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from .engine_figures import MixingPenalty, ScalingPoint, rate_at
from .runner import RunResult, ScenarioResult


@dataclass(frozen=True)
class Context:
    """What the notes may cite beside a scenario's own runs."""

    scaling: Sequence[ScalingPoint] | None = None
    penalty: MixingPenalty | None = None
    # Ratio of two runs doing identical work in this session (mixed / per-task at 1 task):
    # how far apart noise alone put them.
    same_work_ratio: float | None = None


def _best(result: ScenarioResult, name: str) -> RunResult | None:
    """The run's repeat with the highest throughput."""
    runs = [r for r in result.runs if r.run.name == name]
    return max(runs, key=lambda r: r.summary.throughput_rps, default=None)


def _fmt_ms(seconds: float) -> str:
    return "n/a" if seconds is None or math.isnan(seconds) else f"{seconds * 1000:.0f} ms"


def mixed_vs_per_task_note(result: ScenarioResult, context: Context) -> str:
    scaling = context.scaling
    lines = []
    for tasks in (8, 64, 512):
        mixed, per_task = _best(result, f"mixed-{tasks}"), _best(result, f"per-task-{tasks}")
        if not (mixed and per_task and mixed.server_stats and per_task.server_stats):
            continue
        b_mixed, b_task = mixed.server_stats.mean_batch_size, per_task.server_stats.mean_batch_size
        measured = mixed.summary.throughput_rps / per_task.summary.throughput_rps
        line = (f"- {tasks} tasks: mixed batches held {b_mixed:.1f} requests on average, per-task batches "
                f"{b_task:.1f}; end to end the ratio is {measured:.2f}.")
        if scaling:
            ceiling = rate_at(scaling, b_mixed) / rate_at(scaling, b_task)
            line += (f" The engine alone runs batches of {b_mixed:.1f} at {rate_at(scaling, b_mixed):.0f} req/s and of "
                     f"{b_task:.1f} at {rate_at(scaling, b_task):.0f} req/s: a ratio of {ceiling:.2f}, the most any "
                     f"serving layer could show with these batches ({measured / ceiling:.0%} of it kept end to end).")
        lines.append(line)
    if not lines:
        return ""
    head = ["What limits the mixed / per-task ratio: per-task batching can only batch requests of one task, "
            "so its batches hold about (requests queued) / (tasks) requests; the gain of mixing is then the "
            "engine's own batch-scaling gain between the two batch sizes (see Engine batch scaling)."]
    if scaling:
        gain = scaling[-1].requests_per_s / scaling[0].requests_per_s
        head.append(f"On this model and machine a batch of {scaling[-1].batch_size} runs {gain:.1f}x the requests/s "
                    f"of a batch of {scaling[0].batch_size}: even with per-task batches of one request, no ratio "
                    "above that is possible.")
        goals = [c.comparison.target.value for c in result.comparisons
                 if c.comparison.target is not None and c.comparison.metric == "throughput_rps"]
        if goals and max(goals) > gain:
            head.append(f"The goal of {max(goals):g}x is above this engine's whole batching gain, so no batching "
                        "policy can reach it with this model on this machine; the end-to-end figures below show "
                        "how much of the reachable gain the server keeps.")
    return "\n".join([" ".join(head), "", *lines]) + "\n"


def fairness_note(result: ScenarioResult, context: Context) -> str:
    scaling = context.scaling
    alone, flood = _best(result, "steady-alone"), _best(result, "steady-under-flood")
    if not (alone and flood and "steady" in alone.streams and "steady" in flood.streams):
        return ""
    a, f = alone.streams["steady"], flood.streams["steady"]
    lines = [
        f"What limits the steady tenant's latency under the flood: alone, its p50/p99 are "
        f"{_fmt_ms(a.latency_s.get('p50'))}/{_fmt_ms(a.latency_s.get('p99'))}; under the flood "
        f"{_fmt_ms(f.latency_s.get('p50'))}/{_fmt_ms(f.latency_s.get('p99'))}, with every one of its requests "
        f"answered ({f.completed} OK, errors {f.errors or 'none'})."
    ]
    if alone.server_stats and flood.server_stats:
        sa, sf = alone.server_stats, flood.server_stats
        lines.append(
            f"Alone, batches held {sa.mean_batch_size:.1f} requests and took ≈{_fmt_ms(sa.mean_compute_s)}; under the "
            f"flood {sf.mean_batch_size:.1f} requests and ≈{_fmt_ms(sf.mean_compute_s)}. Under the flood the steady "
            f"tenant's requests queued ≈{_fmt_ms(sf.mean_queue_wait_s.get('steady', math.nan))} against "
            f"≈{_fmt_ms(sf.mean_queue_wait_s.get('flood', math.nan))} for the flooding tenant's: the fair queue puts "
            "each steady request into the next batch, so it waits for the batch already running, not for the flood."
        )
    text = (
        "Batches run to completion. Under saturation a new request first waits for the batch in progress "
        "(uniformly up to one whole batch), then runs in a full batch: its latency lies between one and two "
        "batch times, p50 ≈ 1.5 T(B) and p99 ≈ 2 T(B), while alone it runs in a batch of one or two. So the p99 "
        "ratio is about 2 T(B) / (latency alone): never below 2 while a full batch takes longer than a small one."
    )
    if flood.server_stats and not math.isnan(flood.server_stats.mean_compute_s):
        full = flood.server_stats.mean_compute_s
        text += (f" Here T(B) ≈ {full * 1000:.0f} ms under the flood, so p99 ≈ {2 * full * 1000:.0f} ms is expected "
                 f"(measured {_fmt_ms(f.latency_s.get('p99'))}) against {_fmt_ms(a.latency_s.get('p99'))} alone.")
    if scaling:
        one, full = 1 / rate_at(scaling, 1), scaling[-1]
        text += (f" The engine alone takes {full.seconds_per_batch * 1000:.0f} ms for a batch of {full.batch_size} "
                 f"and {one * 1000:.0f} ms for one request (Engine batch scaling).")
    lines.append(text)
    small = _best(result, "steady-under-flood-batch8")
    if small and "steady" in small.streams:
        sm = small.streams["steady"]
        ratio = sm.latency_s.get("p99", math.nan) / a.latency_s.get("p99", math.nan)
        lines.append(
            f"Smaller batches trade throughput for this latency: with `serving.max_batch_size: 8` the steady "
            f"tenant's p50/p99 under the same flood are {_fmt_ms(sm.latency_s.get('p50'))}/"
            f"{_fmt_ms(sm.latency_s.get('p99'))} ({ratio:.1f}x its p99 alone) while the replica serves "
            f"{small.summary.throughput_rps:.0f} req/s instead of {flood.summary.throughput_rps:.0f}. "
            + ("So the 2x goal is reachable today by capping the batch size, at that cost in throughput; keeping "
               "full batches and the goal together needs scheduling that admits new requests into a running batch "
               "between decode steps." if ratio <= 2 else
               "Keeping full batches and the 2x goal together needs scheduling that admits new requests into a "
               "running batch between decode steps.")
        )
    else:
        lines.append("Reaching 2x needs smaller batches under load (`serving.max_batch_size`, trading throughput) "
                     "or scheduling that admits new requests into a running batch between decode steps.")
    return "\n\n".join(lines) + "\n"


def overhead_note(result: ScenarioResult, context: Context) -> str:
    engine, server = _best(result, "engine-direct"), _best(result, "grpc-ray-serve")
    if not (engine and server and engine.cpu and server.cpu and server.summary.throughput_rps):
        return ""
    per_request = lambda seconds: 1000 * seconds / (server.summary.throughput_rps * server.cpu.window_s)
    path = ("load generator", "gRPC proxy", "replica")
    path_ms = {g: per_request(server.cpu.seconds.get(g, 0.0)) for g in path}
    background = {g: server.cpu.cores(g) for g in server.cpu.seconds if g not in path}
    e = engine.cpu_ms_per_request
    total = sum(path_ms.values())
    lines = [
        f"CPU per request on the request path: load generator {path_ms['load generator']:.1f} ms, gRPC proxy "
        f"{path_ms['gRPC proxy']:.1f} ms, replica (request handling and engine) {path_ms['replica']:.1f} ms: "
        f"{total:.1f} ms, against {e:.1f} ms engine-direct (load generator and engine in one process), so the serving "
        f"path adds {total - e:.1f} ms of CPU per request. Beside it, "
        + ", ".join(f"{g} {c:.2f}" for g, c in background.items())
        + " cores stayed busy whatever the load (all of Ray on one 2-core machine; on a cluster the head "
        "node's daemons and the controller run elsewhere)."
    ]
    replica_profiles = [p for c in result.comparisons for p in c.profiles if p.label.startswith("replica") and p.samples]
    if replica_profiles:
        shares = dict(replica_profiles[0].inclusive)
        engine_share = next((v for k, v in shares.items() if k.startswith("Engine.run_batch")), 0.0)
        lines.append(
            f"py-spy of the replica: {engine_share:.0%} of its busy samples are in `Engine.run_batch`; the rest is "
            "Serve's request handling, authentication, validation and tokenisation on the event loop, which needs "
            "the same GIL as the engine thread, so the engine computes less per second than engine-direct."
        )
    ratio = server.summary.throughput_rps / engine.summary.throughput_rps
    if ratio > 1:
        lines.append(f"The throughput ratio above 1 ({ratio:.2f}) is noise from the shared machine: the serving "
                     "overhead is below what wall-clock figures resolve here; the CPU figures above still hold.")
    return "\n\n".join(lines) + "\n"


def penalty_note(result: ScenarioResult, context: Context) -> str:
    mixed, single = _best(result, "mixed-64"), _best(result, "single-prompt")
    if not (mixed and single and mixed.server_stats and single.server_stats):
        return ""
    lines = [
        f"Mixed batches held {mixed.server_stats.mean_batch_size:.1f} requests with "
        f"≈{mixed.server_stats.mean_distinct_tasks:.0f} distinct prompts each; single-prompt batches "
        f"{single.server_stats.mean_batch_size:.1f} requests with one. The texts are identical and output lengths "
        f"match ({mixed.summary.mean_output_tokens:.1f} vs {single.summary.mean_output_tokens:.1f} tokens per "
        "request), so both do the same work except gathering different prompt rows, one indexed copy per batch."
    ]
    if context.same_work_ratio is not None:
        noise = abs(1 - context.same_work_ratio)
        lines.append(
            f"How much noise alone moves a ratio here: two runs doing identical work in this session (mixed / "
            f"per-task at 1 task, where both modes form the same batches) gave {context.same_work_ratio:.2f}, "
            f"{noise:.0%} off 1; an end-to-end penalty smaller than that cannot be resolved on this machine."
        )
    if context.penalty is not None:
        p = context.penalty
        lines.append(
            f"Engine-level, where short alternating batches see the same machine: a batch of {p.batch_size} on "
            f"{p.distinct_prompts} prompts against one shared prompt gives {p.median_ratio:.3f} (median of "
            f"{p.repeats} alternations; Engine mixing penalty)"
            + (", within the 0.95 goal." if p.median_ratio >= 0.95 else ", below the 0.95 goal.")
        )
    return "\n\n".join(lines) + "\n"


def capacity_note(result: ScenarioResult, context: Context) -> str:
    sweep = sorted((r for r in result.runs if r.run.streams[0].load.mode == "open"),
                   key=lambda r: r.run.streams[0].load.rate or 0)
    if len(sweep) < 2:
        return ""
    offered = lambda r: r.summary.issued / r.summary.window_s if r.summary.window_s else math.nan
    # Kept up: no errors, and replies arrived at 90% of the rate requests were sent or better
    # (a Poisson count over a few seconds varies by several percent on its own).
    kept = [r for r in sweep if not r.summary.errors and r.summary.throughput_rps >= 0.9 * offered(r)]
    lines = ["| target req/s | offered req/s | served req/s | p50 ms | p99 ms | errors |",
             "|---:|---:|---:|---:|---:|---|"]
    for r in sweep:
        lines.append(f"| {r.run.streams[0].load.rate:g} | {offered(r):.1f} | {r.summary.throughput_rps:.1f} | "
                     f"{_fmt_ms(r.summary.latency_s.get('p50')).removesuffix(' ms')} | "
                     f"{_fmt_ms(r.summary.latency_s.get('p99')).removesuffix(' ms')} | "
                     f"{sum(r.summary.errors.values())} |")
    if kept:
        best = kept[-1]
        head = (f"One replica kept up (served at least 90% of the offered rate, no errors) up to "
                f"{best.run.streams[0].load.rate:g} req/s offered, with p50/p99 of "
                f"{_fmt_ms(best.summary.latency_s.get('p50'))}/{_fmt_ms(best.summary.latency_s.get('p99'))}; "
                f"the most it served was {max(r.summary.throughput_rps for r in sweep):.0f} req/s.")
    else:
        head = "The replica did not keep up at any offered rate of the sweep; start the sweep lower."
    peak = max(sweep, key=lambda r: r.summary.throughput_rps)
    last = sweep[-1]
    if last is not peak and last.summary.throughput_rps < 0.8 * peak.summary.throughput_rps:
        errors = ", ".join(f"{n} {k}" for k, n in last.summary.errors.items()) or "no errors"
        head += (f" Past the knee the replica served less, not the same: {last.summary.throughput_rps:.0f} req/s at "
                 f"{last.run.streams[0].load.rate:g} offered ({errors}; RESOURCE_EXHAUSTED comes from the per-tenant "
                 "in-flight limit), so capacity planning should keep replicas below the knee.")
    return head + "\n\n" + "\n".join(lines) + "\n"


NOTES = {
    "capacity": capacity_note,
    "mixed_vs_per_task": mixed_vs_per_task_note,
    "fairness": fairness_note,
    "serving_overhead": overhead_note,
    "mixed_penalty": penalty_note,
}


def notes_for(results: Sequence[ScenarioResult], context: Context | None = None) -> dict[str, str]:
    context = context or Context()
    if context.same_work_ratio is None:
        same = [c.ratio for r in results for c in r.comparisons if c.comparison.name == "mixed / per-task, 1 task"]
        if same and not math.isnan(same[0]):
            context = Context(context.scaling, context.penalty, same[0])
    out = {}
    for result in results:
        note = NOTES.get(result.scenario.name)
        text = note(result, context) if note else ""
        if text:
            out[result.scenario.name] = text
    return out
