"""Does a restructuring slow the engine? Two checkouts, engine-direct, a-b-b-a in one run.

Each measurement runs in a child process that imports one checkout's code (a namespace of
symlinks on `sys.path`, the project's editable install switched off), so the two trees never
share a process. Per checkout, on the embedded model with one torch thread:

- mixed ÷ per-task: 64 requests over 64 tasks through `Engine.run_batch`, as one mixed batch,
  against one batch per task (CPU seconds of the child: the work done, whatever else runs);
- continuous: 128 requests over 64 tasks with outputs of 4..32 tokens through the scheduler
  the replica builds for `batching: continuous` (step scheduler + step loop), tokens per CPU
  second.

The order is a-b-b-a (before, after, after, before) per round, so a drift in the machine's
speed during the run hits both sides alike. Run from the repository root:

    python -m promptmux.benchmarks.house_speed --before /path/to/old/checkout [--rounds 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
FOLDERS = ("serving", "kernels", "prompts", "benchmarks")


def _import(*names: str):
    """The first of these modules that exists in the checkout under test."""
    import importlib

    for name in names:
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError:
            continue
    raise ModuleNotFoundError(f"none of {names} in this checkout")


def child() -> None:
    """Measure the checkout on sys.path; print one JSON line."""
    import asyncio
    import random
    import time

    import torch

    torch.set_num_threads(1)
    config_module = _import("promptmux.serving.config")
    engine_module = _import("promptmux.serving.engine.core", "promptmux.serving.engine")
    types = _import("promptmux.serving.engine.types", "promptmux.serving.generation_types")
    scheduling = _import("promptmux.serving.scheduling", "promptmux.serving.step_scheduler")
    with tempfile.TemporaryDirectory() as root:
        config = config_module.PromptmuxConfig.from_dict({
            "model": {"source": "embedded"}, "store": {"root": root},
            "engine": {"max_batch_size": 64, "max_new_tokens_limit": 64}})
        engine = engine_module.Engine.from_config(config)
        generator = torch.Generator().manual_seed(0)
        for i in range(64):
            engine.store.register("bench", f"task{i}", 0.05 * torch.randn(20, engine.loaded.d_model, generator=generator))
        engine.refresh_prompts()
        rng = random.Random(0)

        def text() -> str:
            return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(rng.randint(4, 14)))

        fixed = types.GenerationParams(max_new_tokens=16)
        mixed = [types.GenerationRequest(tenant="bench", text=text(), task=f"task{i}", params=fixed) for i in range(64)]
        engine.run_batch(mixed[:8])  # warm-up

        def cpu(fn) -> float:
            started = time.process_time()
            fn()
            return time.process_time() - started

        mixed_s = cpu(lambda: engine.run_batch(mixed))
        per_task_s = cpu(lambda: [engine.run_batch([r]) for r in mixed])
        stream = [types.GenerationRequest(tenant="bench", text=text(), task=f"task{i % 64}",
                                          params=types.GenerationParams(max_new_tokens=rng.randint(4, 32)))
                  for i in range(128)]
        serving = config_module.ServingConfig(batching="continuous", max_queue_size=1024,
                                              max_in_flight_per_tenant=1024).resolved(64)

        async def run_stream() -> int:
            scheduler = scheduling.build_scheduler(serving, engine)
            prepared = [engine.prepare(r) for r in stream]
            results = await asyncio.gather(*(scheduler.submit(p) for p in prepared))
            await scheduler.close()
            return sum(r.output_tokens for r in results)

        asyncio.run(run_stream())  # warm-up: the engine thread, the slot cache
        started = time.process_time()
        tokens = asyncio.run(run_stream())
        continuous_s = time.process_time() - started
    print(json.dumps({"mixed_over_per_task": per_task_s / mixed_s, "continuous_tokens_per_cpu_s": tokens / continuous_s}))


def namespace_for(tree: Path, scratch: Path) -> Path:
    """A folder whose `promptmux/` links the checkout's source folders."""
    package = scratch / tree.name / "promptmux"
    package.mkdir(parents=True)
    for folder in FOLDERS:
        (package / folder).symlink_to(tree / folder)
    return package.parent


def measure(tree: Path, scratch: Path) -> dict:
    # The checkout under test may not have this module: run this file's `child` by path, with
    # that checkout's code first on sys.path and the editable install of this one switched off.
    here = str(Path(__file__).resolve())
    bootstrap = (
        "import sys; sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__module__.startswith('__editable__')]; "
        f"sys.path.insert(0, {str(namespace_for(tree, scratch))!r}); "
        f"scope = {{'__file__': {here!r}, '__name__': 'house_speed_child'}}; "
        f"exec(compile(open({here!r}).read(), {here!r}, 'exec'), scope); scope['child']()"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run([sys.executable, "-c", bootstrap], capture_output=True, text=True, env=env, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="the older checkout (e.g. a git worktree)")
    parser.add_argument("--after", type=Path, default=HERE, help="the newer checkout (default: this one)")
    parser.add_argument("--rounds", type=int, default=2, help="a-b-b-a rounds")
    args = parser.parse_args(argv)
    from tqdm import tqdm

    runs: dict[str, list[dict]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory(prefix="promptmux-house-speed-") as scratch, \
            tqdm(total=4 * args.rounds, desc="a-b-b-a") as bar:
        for round_ in range(args.rounds):
            for side in ("before", "after", "after", "before"):
                tree = args.before if side == "before" else args.after
                runs[side].append(measure(tree.resolve(), Path(scratch) / f"{round_}-{side}-{len(runs[side])}"))
                bar.update(1)
    rows = []
    for key, label in (("mixed_over_per_task", "engine-direct mixed ÷ per-task (64 tasks, CPU time)"),
                       ("continuous_tokens_per_cpu_s", "continuous: tokens per CPU second (128 requests)")):
        before = statistics.median(r[key] for r in runs["before"])
        after = statistics.median(r[key] for r in runs["after"])
        rows.append(f"| {label} | {before:.2f} | {after:.2f} | {after / before:.3f} |")
    print("| figure | before | after | after ÷ before |\n|---|---:|---:|---:|\n" + "\n".join(rows))
    print(f"\nruns: {json.dumps(runs)}")


if __name__ == "__main__":
    main()
