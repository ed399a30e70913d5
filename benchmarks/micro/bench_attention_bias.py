"""T5 attention with one merged bias (SDPA) against HF's eager T5 attention, and HF's own SDPA.

The workload is the engine's: a t5-small-shaped model with random weights, a padded mixed
batch of 32 rows, each [prompt (100 rows); input (up to 128 tokens); zeros]. Each figure is
a ratio measured in one run (medians of interleaved repetitions on one model instance).

    python -m promptmux.benchmarks.micro.bench_attention_bias            # writes results/<date>-<machine>/micro/attention_bias_cpu.md
    python -m promptmux.benchmarks.micro.bench_attention_bias --quick    # fewer repetitions, prints only
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from promptmux.kernels.t5_attention_bias import T5_BIAS_ATTENTION, install_t5_bias_attention, set_t5_attention
from promptmux.serving.model.shapes import build_random_model

from ..machine import dated_results_dir

RESULTS = dated_results_dir()
IMPLEMENTATIONS = ("eager", "sdpa", T5_BIAS_ATTENTION)


def padded_mixed_batch(batch: int, prompt_len: int, max_input: int, d_model: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    input_lengths = torch.randint(max_input // 4, max_input + 1, (batch,), generator=gen)
    input_lengths[0] = max_input  # the longest row sets S, as in a real batch
    total = prompt_len + input_lengths  # [B]
    seq_len = prompt_len + max_input
    mask = (torch.arange(seq_len)[None, :] < total[:, None]).long()  # [B, S]
    embeds = torch.randn(batch, seq_len, d_model, generator=gen) * mask[..., None]  # [B, S, D]
    return embeds, mask


def interleaved_medians(model, workloads: dict[str, Callable], reps: int):
    """Median seconds per (workload, implementation), and each pair's warm-up output.

    Every round runs each pair once, so drifting load on a shared machine hits all alike.
    """
    times: dict[tuple[str, str], list[float]] = {}
    outputs: dict[tuple[str, str], object] = {}
    for round_index in range(reps + 1):  # round 0 is warm-up
        for impl in IMPLEMENTATIONS:
            set_t5_attention(model, impl)  # every attention module, checked
            for name, work in workloads.items():
                start = time.perf_counter()
                with torch.inference_mode():
                    result = work()
                if round_index:
                    times.setdefault((name, impl), []).append(time.perf_counter() - start)
                else:
                    outputs[(name, impl)] = result
    return {key: statistics.median(ts) for key, ts in times.items()}, outputs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one timed round; print only")
    parser.add_argument("--machine", default="2-core CPU", help="how to name this machine in the results")
    parser.add_argument("--shape", default="t5-small")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=100)
    parser.add_argument("--max-input", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]

    model = build_random_model(args.shape).eval()
    install_t5_bias_attention(model)  # registers the implementation; the loop below switches
    embeds, mask = padded_mixed_batch(args.batch, args.prompt_len, args.max_input, model.config.d_model)

    encoder_name = "encoder forward"
    generate_name = f"generate {args.new_tokens} tokens (encoder + greedy decode)"
    workloads = {
        encoder_name: lambda: model.encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state,
        generate_name: lambda: model.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            do_sample=False,
        ),
    }
    medians, outputs = interleaved_medians(model, workloads, reps=1 if args.quick else 3)
    valid = mask.bool()
    agreement = {  # a benchmark of a wrong answer is worthless
        impl: (
            (outputs[(encoder_name, impl)] - outputs[(encoder_name, "eager")])[valid].abs().max().item(),
            torch.equal(outputs[(generate_name, impl)], outputs[(generate_name, "eager")]),
        )
        for impl in IMPLEMENTATIONS
    }

    lines = [
        "# T5 attention: one merged bias through SDPA vs eager",
        "",
        f"Machine: {args.machine}. torch {torch.__version__}, {torch.get_num_threads()} threads, fp32. "
        f"Model: {args.shape} shape, random weights. Batch {args.batch}, prompt {args.prompt_len} rows + input "
        f"up to {args.max_input} tokens (S = {embeds.shape[1]}), right-padded mixed lengths. "
        f"Medians of interleaved rounds; ratio > 1 means faster than eager. 1-minute load average "
        f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after (other jobs share the cores).",
        "",
        f"`sdpa` is transformers' own SDPA path (merges bias and mask again in every layer); "
        f"`{T5_BIAS_ATTENTION}` merges once per stack forward.",
        "",
        "| workload | eager s | sdpa s | merged s | eager / sdpa | eager / merged | sdpa / merged |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in workloads:
        e, s, m = (medians[(name, impl)] for impl in IMPLEMENTATIONS)
        lines.append(f"| {name} | {e:.3f} | {s:.3f} | {m:.3f} | {e / s:.2f}x | {e / m:.2f}x | {s / m:.2f}x |")
    lines += ["", "Agreement with eager (max abs diff of encoder states at valid positions; greedy tokens equal):", ""]
    for impl in IMPLEMENTATIONS[1:]:
        diff, same = agreement[impl]
        lines.append(f"- {impl}: {diff:.2e}, tokens equal: {same}")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "attention_bias_cpu.md").write_text(text)
        print(f"wrote {RESULTS / 'attention_bias_cpu.md'}")


if __name__ == "__main__":
    main()
