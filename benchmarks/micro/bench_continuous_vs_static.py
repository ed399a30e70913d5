"""Continuous (step loop) against static (batch-at-a-time) decoding, engine-direct.

The same requests run two ways on one Engine, with `engine.max_batch_size` slots:
- static: batches of max_batch_size requests in arrival order, each run to completion by
  `Engine.run_batch` (encoder once, then Hugging Face `generate`): a batch lasts as long as
  its longest row, and finished rows keep computing padding;
- continuous: the step executor (`StepExecutor`), admitting queued requests into free slots before every step, so
  a finished row's slot takes the next request at once.
Output lengths are uniform in 4..64 (each request's own max_new_tokens, EOS ignored on both
paths, as load generators do), prompts come from 64 tasks, greedy. The figure is generated
tokens per CPU second, continuous / static, at saturation (continuous in its steady state,
after the first fill turned over and while its queue still holds work; static's batches are
all full), per round; the whole-run ratio (with the
continuous run's drain) and the wall-time ratio are reported beside it. Rounds alternate the
two modes so a burst of load on the shared machine hits both.

    python -m promptmux.benchmarks.micro.bench_continuous_vs_static [--model embedded random:t5-small] [--rounds 3]
"""
from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from promptmux.serving.engine.core import Engine
from promptmux.serving.engine.types import GenerationParams, GenerationRequest, PreparedRequest
from promptmux.serving.engine.plan import StepPlan
from promptmux.serving.engine.step.executor import StepExecutor

from ..engine_direct import DirectEngine, register_random_prompts
from ..machine import dated_results_dir, machine_info

MIN_NEW, MAX_NEW = 4, 64


def build_workload(engine: Engine, tasks: int, requests: int, seed: int) -> list[PreparedRequest]:
    rng = random.Random(seed)
    register_random_prompts(engine, "bench", [rng.randint(10, 30) for _ in range(tasks)], seed=seed)
    out = []
    for i in range(requests):
        text = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(rng.randint(8, 48)))
        params = GenerationParams(max_new_tokens=rng.randint(MIN_NEW, MAX_NEW), ignore_eos=True)
        out.append(engine.prepare(GenerationRequest(tenant="bench", text=text, task=f"task{i % tasks}", params=params)))
    return out


def run_static(engine: Engine, requests: list[PreparedRequest]) -> int:
    size = engine.config.max_batch_size
    tokens = 0
    for start in range(0, len(requests), size):
        tokens += sum(r.output_tokens for r in engine.run_batch(requests[start : start + size]).results)
    return tokens


def run_continuous(executor: StepExecutor, requests: list[PreparedRequest]) -> tuple[int, int, float]:
    """Returns (all tokens, tokens while saturated, CPU seconds while saturated). Saturated:
    from step MAX_NEW (by then every slot of the first fill has turned over at least once, so
    slot ages are mixed) until the queue runs dry: every freed slot is refilled at once, as on
    a server that always has work queued. The first fill and the drain are not steady state."""
    queue = list(enumerate(requests))
    tokens = saturated_tokens = step = 0
    window_start = window_tokens = None
    saturated_seconds = 0.0
    while queue or executor.active_slots:
        if step == MAX_NEW:
            window_start, window_tokens = time.process_time(), tokens
        take = min(executor.slots - executor.active_slots, len(queue))
        outputs = executor.execute(StepPlan(admit=tuple(queue[:take])))
        assert not outputs.errors, outputs.errors
        queue = queue[take:]
        tokens += len(outputs.tokens)
        step += 1
        if queue and window_start is not None:
            saturated_tokens, saturated_seconds = tokens - window_tokens, time.process_time() - window_start
    return tokens, saturated_tokens, saturated_seconds


def timed(fn, *args) -> tuple[float, float, int]:
    """(CPU seconds of this process, wall seconds, tokens). With one torch thread the CPU time
    is the work done, whatever else shares the cores; the wall time is what a user waits."""
    cpu, wall = time.process_time(), time.perf_counter()
    tokens = fn(*args)
    return time.process_time() - cpu, time.perf_counter() - wall, tokens


def bench_model(source: str, args, bar) -> dict:
    direct = DirectEngine(source, {"max_batch_size": args.slots, "max_new_tokens_limit": MAX_NEW},
                          torch_threads=args.threads)
    with direct as engine, torch.inference_mode():
        requests = build_workload(engine, args.tasks, args.requests, seed=0)
        expected = sum(r.params.max_new_tokens for r in requests)
        executor = StepExecutor(engine.context)
        # One full batch where every row wants MAX_NEW tokens: nothing for continuous batching
        # to win, so this ratio is the step loop's own speed against generate's.
        equal = [dataclasses.replace(r, request=dataclasses.replace(
            r.request, params=GenerationParams(max_new_tokens=MAX_NEW, ignore_eos=True))) for r in requests[: args.slots]]
        run_static(engine, requests[: args.slots])  # warm-up
        run_continuous(executor, requests[: args.slots])
        rounds, equal_rounds = [], []
        for _ in range(args.rounds):
            static_cpu, static_wall, static_tokens = timed(run_static, engine, requests)
            bar.update(1)
            continuous_cpu, continuous_wall, (continuous_tokens, saturated_tokens, saturated_cpu) = timed(
                run_continuous, executor, requests)
            bar.update(1)
            assert static_tokens == continuous_tokens == expected, (static_tokens, continuous_tokens, expected)
            assert saturated_tokens, "the queue ran dry before the first fill turned over: send more --requests"
            rounds.append((expected / static_cpu, saturated_tokens / saturated_cpu, expected / continuous_cpu,
                           static_wall / continuous_wall))
            static_cpu, _, _ = timed(run_static, engine, equal)
            continuous_cpu, _, _ = timed(run_continuous, executor, equal)
            equal_rounds.append(static_cpu / continuous_cpu)
    return {
        "model": source,
        "rounds": rounds,
        "median": statistics.median(c / s for s, c, _, _ in rounds),
        "whole_median": statistics.median(c / s for s, _, c, _ in rounds),
        "wall_median": statistics.median(w for _, _, _, w in rounds),
        "equal": statistics.median(equal_rounds),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=["embedded", "random:t5-small"])
    parser.add_argument("--tasks", type=int, default=64)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--slots", type=int, default=64, help="engine.max_batch_size for both modes")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 is steadiest on a CPU shared with other jobs")
    parser.add_argument("--output", type=Path,
                        default=dated_results_dir() / "continuous_vs_static_cpu.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine_info()
    with tqdm(total=2 * args.rounds * len(args.model), desc="bench", unit="run") as bar:
        results = [bench_model(source, args, bar) for source in args.model]
    after = machine_info().load_average

    lines = [
        "# Continuous (step loop) vs static (batch-at-a-time) decoding, engine-direct",
        "",
        f"Machine: {info.describe()}; {torch.get_num_threads()} torch thread(s); 1-minute load average "
        f"{info.load_average[0]:.1f} before, {after[0]:.1f} after (other jobs shared the cores).",
        f"Workload: {args.requests} requests over {args.tasks} tasks (prompts of 10-30 rows, inputs of 9-49 tokens), "
        f"output lengths uniform in {MIN_NEW}..{MAX_NEW} (EOS ignored: `ignore_eos`), greedy, fp32, {args.slots} slots; "
        f"static = `Engine.run_batch` on batches of {args.slots} in arrival order, continuous = `StepExecutor` "
        "refilling free slots before every step. Rounds alternate the two modes.",
        "",
        "Tokens/s are per CPU second of the benchmark process (one torch thread, so that is the work "
        "done whatever else ran). *Saturated*: continuous from step 64 (the first fill has turned over) until the "
        "queue ran dry, every freed slot refilled at once as on a loaded server, against static's full batches. *Whole run*: including "
        "the continuous run's drain, when slots empty out one by one. Last column: the whole-run ratio in "
        "wall time, which other jobs on the machine disturb.",
        "",
        "| model | static tokens/s | continuous tokens/s, saturated | saturated ratio | whole-run ratio | (wall) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        for static_rate, saturated_rate, whole_rate, wall_ratio in result["rounds"]:
            lines.append(f"| {result['model']} | {static_rate:.1f} | {saturated_rate:.1f} | "
                         f"{saturated_rate / static_rate:.2f}x | {whole_rate / static_rate:.2f}x | {wall_ratio:.2f}x |")
    lines += ["", "Median continuous / static at saturation: " + ", ".join(
        f"{r['model']} **{r['median']:.2f}x** (whole run {r['whole_median']:.2f}x, wall {r['wall_median']:.2f}x)"
        for r in results) + " (target >= 1.5).", "",
        f"Step speed alone (one batch of {args.slots} rows that all want {MAX_NEW} tokens, so continuous batching "
        "has nothing to win; step loop / `generate`, median): " + ", ".join(
            f"{r['model']} {r['equal']:.2f}x" for r in results) + ".", "",
        f"Command: `python -m promptmux.benchmarks.micro.bench_continuous_vs_static --rounds {args.rounds} "
        f"--threads {args.threads}`"]
    report = "\n".join(lines) + "\n"
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
