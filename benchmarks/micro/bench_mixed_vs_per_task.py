"""Mixed-task batching against per-task batching, engine-direct (no gRPC, no Ray).

The case from the core issue: 64 requests over 64 tasks (uniform traffic) on a
t5-small-shaped model with random weights. Per-task batching forms one batch per task with
one prompt per forward, which is what PEFT-style serving offers. Also measured: a plain
Hugging Face `generate` on the same mixed batch (inputs built with a per-request
concatenate-and-pad loop), the reference the engine must not lose to.

    python -m promptmux.benchmarks.micro.bench_mixed_vs_per_task [--model random:t5-small] [--repeats 2]

Figures are ratios measured in one run: the machines are shared and noisy.
"""
from __future__ import annotations

import argparse
import platform
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from promptmux.serving.engine.core import Engine
from promptmux.serving.engine.types import GenerationParams, GenerationRequest

from ..machine import dated_results_dir
from ..engine_direct import DirectEngine, register_random_prompts


def build_workload(engine: Engine, tasks: int, requests: int, prompt_length: int, input_length: int, max_new: int, seed: int):
    register_random_prompts(engine, "bench", [prompt_length] * tasks, seed=seed)
    rng = random.Random(seed)
    text = lambda: "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(input_length - 1))
    params = GenerationParams(max_new_tokens=max_new)
    return [GenerationRequest(tenant="bench", text=text(), task=f"task{i % tasks}", params=params) for i in range(requests)]


def run_mixed(engine: Engine, requests) -> int:
    return sum(r.output_tokens for r in engine.generate(requests))


def run_per_task(engine: Engine, requests) -> int:
    by_task: dict[str, list] = {}
    for r in requests:
        by_task.setdefault(r.task, []).append(r)
    return sum(run_mixed(engine, group) for group in by_task.values())


def run_plain_hf(engine: Engine, requests) -> int:
    """HF generate on the mixed batch, with inputs built by a per-request cat-and-pad loop."""
    model, tokenizer = engine.model, engine.tokenizer
    embedding = model.get_input_embeddings()
    rows = []
    for r in requests:
        prompt = engine.store.get(r.tenant, r.task).tensor.to(embedding.weight.dtype)
        ids = torch.tensor(tokenizer(r.text)["input_ids"])
        rows.append(torch.cat([prompt, embedding(ids)]))
    width = max(row.shape[0] for row in rows)
    embeds = torch.stack([torch.nn.functional.pad(row, (0, 0, 0, width - row.shape[0])) for row in rows])
    mask = torch.tensor([[1] * row.shape[0] + [0] * (width - row.shape[0]) for row in rows])
    out = model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=requests[0].params.max_new_tokens,
                         do_sample=False, num_beams=1)
    return int((out[:, 1:] != model.config.pad_token_id).sum())


def measure(fn, engine, requests, repeats: int, bar) -> float:
    """Best generated tokens/s over `repeats` runs (after one warm-up)."""
    fn(engine, requests)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = fn(engine, requests)
        rates.append(tokens / (time.perf_counter() - start))
        bar.update(1)
    return max(rates)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:t5-small")
    parser.add_argument("--tasks", type=int, default=64)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-length", type=int, default=20)
    parser.add_argument("--input-length", type=int, default=48)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 is steadiest on a CPU shared with other jobs")
    parser.add_argument("--output", type=Path, default=dated_results_dir() / "mixed_vs_per_task_cpu.md")
    args = parser.parse_args(argv)

    with DirectEngine(args.model, {"max_batch_size": max(args.requests, 64)}, torch_threads=args.threads) as engine:
        requests = build_workload(engine, args.tasks, args.requests, args.prompt_length, args.input_length,
                                  args.max_new_tokens, seed=0)
        modes = {"mixed (engine)": run_mixed, "plain HF generate, mixed": run_plain_hf, "per-task (engine)": run_per_task}
        with tqdm(total=len(modes) * args.repeats, desc="bench", unit="run") as bar, torch.inference_mode():
            rates = {name: measure(fn, engine, requests, args.repeats, bar) for name, fn in modes.items()}

    per_task = rates["per-task (engine)"]
    lines = [
        "# Mixed-task batching vs per-task batching (engine-direct)",
        "",
        f"Machine: {platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}. "
        f"Model {args.model} (random weights), fp32. {args.requests} requests over {args.tasks} tasks, "
        f"prompt length {args.prompt_length}, input length {args.input_length}, {args.max_new_tokens} new tokens, greedy. "
        f"Best of {args.repeats} runs after a warm-up.",
        "",
        "| mode | generated tokens/s | ratio over per-task |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {rate:.1f} | {rate / per_task:.2f}x |" for name, rate in rates.items()]
    lines += ["", f"Mixed engine over plain HF mixed generate: {rates['mixed (engine)'] / rates['plain HF generate, mixed']:.2f}x"]
    report = "\n".join(lines) + "\n"
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
