"""Where a decode step's time goes: torch.profiler over the step executor, and py-spy over the
whole decode loop, for each model shape and weight type.

The step is the step executor's own: 64 rows admitted with 20-row soft prompts and 32 input
tokens, then steps until position 32 (so self-attention reads 32 columns). Every op of ten
steps is timed by torch.profiler (self CPU time, the ops grouped into GEMMs, attention, the
cache writes, sampling and the rest); py-spy samples the same loop from outside and groups its
Python frames by what they do. Run from the repository root:

    python -m promptmux.benchmarks.micro.profile_decode_step [--models embedded,t5-small]
        [--quantization none,int8] [--threads 1] [--out benchmarks/results/<date>-<machine>/decode]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

ROWS, PROMPT_ROWS, INPUT_TOKENS, WARM_STEPS, PROFILED_STEPS = 64, 20, 32, 32, 10

# torch.profiler op names -> what they are in a decode step
OP_GROUPS = (
    ("GEMM (projections, LM head)", ("mkldnn::_linear_pointwise", "aten::mm", "aten::addmm", "aten::_int_mm")),
    ("attention (scores, softmax, values)", ("aten::bmm", "aten::baddbmm", "aten::_softmax", "aten::_scaled_dot")),
    ("K/V cache writes", ("aten::index_put", "aten::_index_put_impl_")),
    ("sampling (argmax, controls)", ("aten::argmax", "aten::topk", "aten::sort", "aten::cumsum")),
    ("int8 quantisation of activations", ("aten::round", "aten::amax", "aten::clamp")),
)


def _engine(model: str, quantization: str, threads: int):
    from promptmux.serving.config import PromptmuxConfig
    from promptmux.serving.engine.core import Engine

    torch.set_num_threads(threads)
    source = model if model == "embedded" else f"random:{model}"
    root = tempfile.mkdtemp(prefix="promptmux-profile-")
    config = PromptmuxConfig.from_dict({"model": {"source": source, "quantization": quantization},
                                        "store": {"root": root}, "engine": {"max_batch_size": ROWS,
                                                                            "max_new_tokens_limit": 64}})
    return Engine.from_config(config), root


def _admitted_executor(engine):
    from promptmux.serving.engine.plan import StepPlan
    from promptmux.serving.engine.step.executor import StepExecutor
    from promptmux.serving.engine.types import GenerationParams, GenerationRequest

    generator = torch.Generator().manual_seed(0)
    for i in range(ROWS):
        engine.store.register("bench", f"t{i}", 0.05 * torch.randn(PROMPT_ROWS, engine.loaded.d_model, generator=generator))
    engine.refresh_prompts()
    rng = random.Random(0)
    requests = [engine.prepare(GenerationRequest(
        tenant="bench", task=f"t{i}", params=GenerationParams(max_new_tokens=64, ignore_eos=True),
        text="".join(rng.choice("abcdefghij") for _ in range(INPUT_TOKENS - 1)))) for i in range(ROWS)]
    executor = StepExecutor(engine.context)
    executor.execute(StepPlan(admit=tuple(enumerate(requests))))
    for _ in range(WARM_STEPS - 1):
        executor.execute(StepPlan())
    return executor


def profile_ops(model: str, quantization: str, threads: int) -> dict:
    """torch.profiler's self CPU time of ten steps, by op group."""
    from torch.profiler import ProfilerActivity, profile

    from promptmux.serving.engine.plan import StepPlan

    engine, root = _engine(model, quantization, threads)
    try:
        executor = _admitted_executor(engine)
        started = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            for _ in range(PROFILED_STEPS):
                executor.execute(StepPlan())
        wall = (time.perf_counter() - started) / PROFILED_STEPS
    finally:
        shutil.rmtree(root, ignore_errors=True)
    groups: Counter = Counter()
    ops: Counter = Counter()
    total = 0.0
    for event in profiler.key_averages():
        us = event.self_cpu_time_total
        total += us
        ops[event.key] += us
        group = next((name for name, keys in OP_GROUPS if any(event.key.startswith(k) for k in keys)), "other ops")
        groups[group] += us
    return {"model": model, "quantization": quantization, "threads": threads, "step_ms": 1000 * wall,
            "groups": {k: v / total for k, v in groups.most_common()},
            "top_ops": [(k, v / total) for k, v in ops.most_common(8)]}


def profile_python(model: str, quantization: str, threads: int, out: Path) -> dict:
    """py-spy over ~6 s of steps in a child process, frames grouped by what they do."""
    from ..harness.profiling import py_spy

    spy = py_spy()
    if spy is None:
        return {"error": "py-spy is not installed (pip install 'promptmux[bench]')"}
    raw = out / f"py-spy-{model}-{quantization}.txt"
    code = (f"from promptmux.benchmarks.micro.profile_decode_step import _loop; _loop({model!r}, {quantization!r}, "
            f"{threads})")
    done = subprocess.run([spy, "record", "--rate", "100", "--format", "raw", "--nonblocking", "--output", str(raw),
                           "--", sys.executable, "-c", code], capture_output=True, text=True, env=os.environ)
    if done.returncode != 0 or not raw.exists():
        return {"error": f"py-spy failed: {done.stderr[-300:]}"}
    shares: Counter = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit() or "_timed_steps (" not in stack:
            continue
        total += int(count)
        shares[_python_part(stack)] += int(count)
    return {"samples": total, "parts": {k: v / total for k, v in shares.most_common()} if total else {}}


def _python_part(stack: str) -> str:
    for part, markers in (
        ("LM head and projections (GEMM)", ("PackedLinear.forward", "Int8Linear.forward", "Linear.forward")),
        ("attention", ("attend (",)),
        ("layer norms, activations, residuals", ("T5LayerNorm", "Activation.forward", "_Layer.feed_forward")),
        ("decoder step: the rest (bias, cache writes, views)", ("T5DecoderStep.forward",)),
        ("sampling and the host sync", ("StepExecutor._forward", "sample_rows", "control_logits")),
        ("executor bookkeeping (rows, results, compaction)", ("StepExecutor.",)),
    ):
        if any(marker in stack for marker in markers):
            return part
    return "other"


def _loop(model: str, quantization: str, threads: int) -> None:
    """What py-spy watches: admit and warm up, then steps for about six seconds (only those are
    counted: `_timed_steps`)."""
    engine, root = _engine(model, quantization, threads)
    try:
        _timed_steps(_admitted_executor(engine), seconds=6)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _timed_steps(executor, seconds: float) -> None:
    from promptmux.serving.engine.plan import StepPlan

    end = time.perf_counter() + seconds
    while time.perf_counter() < end and executor.active_slots:
        executor.execute(StepPlan())


def report(results: list[dict]) -> str:
    lines = ["# Where a decode step's time goes", "",
             f"The step executor over {ROWS} rows ({PROMPT_ROWS}-row soft prompts, {INPUT_TOKENS} input tokens), "
             f"at position {WARM_STEPS}; torch.profiler over {PROFILED_STEPS} steps (self CPU time by op group) and "
             "py-spy over about 6 s of steps (Python frames by what they do). Command: "
             "`python -m promptmux.benchmarks.micro.profile_decode_step`.", ""]
    for r in results:
        ops = r["ops"]
        lines += [f"## {r['model']}, {r['quantization']}, {r['threads']} thread(s): {ops['step_ms']:.1f} ms per step", "",
                  "| op group (torch.profiler) | share |", "|---|---:|"]
        lines += [f"| {name} | {share:.0%} |" for name, share in ops["groups"].items()]
        lines += ["", "Top ops: " + ", ".join(f"`{k}` {v:.0%}" for k, v in ops["top_ops"]), ""]
        spy = r["python"]
        if spy.get("error"):
            lines += [f"py-spy: {spy['error']}", ""]
        else:
            lines += [f"| Python frames (py-spy, {spy['samples']} samples) | share |", "|---|---:|"]
            lines += [f"| {name} | {share:.0%} |" for name, share in spy["parts"].items()]
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="embedded,t5-small")
    parser.add_argument("--quantization", default="none,int8")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for model in args.models.split(","):
        for quantization in args.quantization.split(","):
            print(f"profiling {model} ({quantization}) ...", flush=True)
            results.append({"model": model, "quantization": quantization, "threads": args.threads,
                            "ops": profile_ops(model, quantization, args.threads),
                            "python": profile_python(model, quantization, args.threads, args.out)})
    (args.out / "profile.json").write_text(json.dumps(results, indent=1))
    (args.out / "profile.md").write_text(report(results))
    print((args.out / "profile.md").read_text())


if __name__ == "__main__":
    main()
