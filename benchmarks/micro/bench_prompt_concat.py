"""Fused prompt gather + mask against a per-request concatenate-and-pad loop.

Every request of a batch has its own task prompt (the mixed-task case), stored in the bank as
16-row pages at scattered places, as the device prompt cache lays them out. Each figure is a
ratio measured in one run (loop time / op time, medians of interleaved repetitions), because
the machines are shared and noisy.

    python -m promptmux.benchmarks.micro.bench_prompt_concat            # CPU table -> results/*.md
    python -m promptmux.benchmarks.micro.bench_prompt_concat --quick    # a smaller grid, one minute
On a CUDA machine the same grid also runs Triton vs torch vs loop on the GPU.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from promptmux.kernels.prompt_concat import EncoderInputs, build_encoder_inputs, pack_segments

from ..machine import dated_results_dir

RESULTS = dated_results_dir()
PAGE_ROWS = 16
VOCAB = 8192  # the gather reads whole rows; table height barely matters, memory does
DISTINCT_TASKS = 16
INPUT_TOKENS = 64
MEMORY_LIMIT = 2 * 1024**3


@dataclass(frozen=True)
class Case:
    batch: int
    prompt_len: int
    dim: int

    def bytes_needed(self, element_size: int = 4) -> int:
        seq_len = self.prompt_len + INPUT_TOKENS
        output = self.batch * seq_len * self.dim
        # The loop keeps its per-row pieces and the stacked result alive together.
        return element_size * (2 * output + (VOCAB + DISTINCT_TASKS * self.prompt_len) * self.dim)


def make_inputs(case: Case, device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    pages_per_prompt = -(-case.prompt_len // PAGE_ROWS)
    n_pages = DISTINCT_TASKS * pages_per_prompt
    bank = torch.randn(n_pages * PAGE_ROWS, case.dim, generator=gen)  # [R, D]
    embedding = torch.randn(VOCAB, case.dim, generator=gen)  # [V, D]
    placement = torch.randperm(n_pages, generator=gen).view(DISTINCT_TASKS, pages_per_prompt)
    prompts = []
    for task in range(DISTINCT_TASKS):
        segments, left = [], case.prompt_len
        for page in placement[task].tolist():
            segments.append((page * PAGE_ROWS, min(PAGE_ROWS, left)))
            left -= PAGE_ROWS
        prompts.append(segments)
    rows = [prompts[b % DISTINCT_TASKS] for b in range(case.batch)]
    input_lengths = torch.randint(INPUT_TOKENS // 2, INPUT_TOKENS + 1, (case.batch,), generator=gen)
    input_ids = torch.randint(0, VOCAB, (case.batch, INPUT_TOKENS), generator=gen)
    seq_len = case.prompt_len + int(input_lengths.max())
    move = lambda t: t.to(device)  # noqa: E731
    return move(input_ids), move(input_lengths), move(embedding), move(bank), rows, seq_len


def concat_and_pad_loop(input_ids, input_lengths, embedding, bank, rows, seq_len) -> EncoderInputs:
    """What one writes without the op: a Python loop over requests, torch.cat, pad, stack."""
    lengths = input_lengths.tolist()
    embeds, masks, prompt_lengths = [], [], []
    for b, segments in enumerate(rows):
        pieces = [bank[offset : offset + length] for offset, length in segments]
        pieces.append(embedding[input_ids[b, : lengths[b]]])
        row = torch.cat(pieces)  # [P_b + L_b, D]
        embeds.append(torch.nn.functional.pad(row, (0, 0, 0, seq_len - row.shape[0])))
        mask = torch.zeros(seq_len, dtype=torch.long, device=row.device)
        mask[: row.shape[0]] = 1
        masks.append(mask)
        prompt_lengths.append(row.shape[0] - lengths[b])
    prompt = torch.tensor(prompt_lengths, device=embedding.device)
    return EncoderInputs(torch.stack(embeds), torch.stack(masks), prompt, prompt + input_lengths)


def median_seconds(contenders: dict[str, Callable[[], object]], sync: Callable[[], None], budget_s: float) -> dict:
    """Interleaved repetitions (so drifting load hits every contender alike); medians."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    first = times[next(iter(times))]
    deadline = time.perf_counter() + budget_s
    while len(first) < 3 or (time.perf_counter() < deadline and len(first) < 20):
        for name, fn in contenders.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def run_grid(cases: list[Case], device: str, backends: list[str], budget_s: float) -> list[dict]:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows_out = []
    for case in cases:
        if case.bytes_needed() > MEMORY_LIMIT:
            rows_out.append({"case": case, "skipped": f"needs ~{case.bytes_needed() / 1024**3:.1f} GiB"})
            continue
        input_ids, input_lengths, embedding, bank, rows, seq_len = make_inputs(case, device)

        def op(backend: str) -> Callable[[], object]:
            # Segment packing is part of the op's cost: the engine does it for every batch.
            return lambda: build_encoder_inputs(
                input_ids, input_lengths, embedding, bank, pack_segments(rows, device), seq_len, backend=backend
            )

        contenders = {"loop": lambda: concat_and_pad_loop(input_ids, input_lengths, embedding, bank, rows, seq_len)}
        contenders.update({backend: op(backend) for backend in backends})
        # Warm-up (allocator, caches, Triton compile) doubles as the check that every contender
        # gives the loop's answer: a benchmark of a wrong answer is worthless.
        expected = contenders["loop"]()
        for backend in backends:
            got = contenders[backend]()
            assert torch.equal(got.embeds, expected.embeds) and torch.equal(got.attention_mask, expected.attention_mask)
        del got
        seconds = median_seconds(contenders, sync, budget_s)
        rows_out.append({"case": case, "seconds": seconds})
        del input_ids, input_lengths, embedding, bank, expected
        print(format_row(rows_out[-1], backends), flush=True)
    return rows_out


def format_row(row: dict, backends: list[str]) -> str:
    case = row["case"]
    head = f"| {case.batch} | {case.prompt_len} | {case.dim} |"
    if "skipped" in row:
        return head + " skipped: " + row["skipped"] + " |" + " |" * (len(backends) * 2)
    s = row["seconds"]
    ratios = " | ".join(f"{s['loop'] / s[b]:.1f}x" for b in backends)
    times = " | ".join(f"{s[b] * 1e3:.2f}" for b in backends)
    return f"{head} {s['loop'] * 1e3:.2f} | {times} | {ratios} |"


def table(rows: list[dict], backends: list[str], title: str, machine: str, load: str, command: str) -> str:
    header = (
        "| B | prompt len | D | loop ms | "
        + " | ".join(f"{b} ms" for b in backends)
        + " | "
        + " | ".join(f"loop / {b}" for b in backends)
        + " |"
    )
    rule = "|" + "---|" * (4 + 2 * len(backends))
    lines = [
        f"# {title}",
        "",
        f"Machine: {machine}. torch {torch.__version__}, {torch.get_num_threads()} threads, fp32. {load}",
        f"Command: `{command}`.",
        f"Mixed batch: {DISTINCT_TASKS} distinct task prompts in {PAGE_ROWS}-row pages at scattered bank "
        f"places; inputs of {INPUT_TOKENS // 2}-{INPUT_TOKENS} tokens; vocabulary {VOCAB} rows. Medians of "
        "interleaved repetitions, segment packing included in the op. Ratio > 1 means the op is faster.",
        "",
        header,
        rule,
        *(format_row(r, backends) for r in rows),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smaller grid and shorter timing budget")
    parser.add_argument("--machine", default="2-core CPU", help="how to name this machine in the results")
    parser.add_argument("--no-write", action="store_true", help="print only; leave benchmarks/results alone")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice); 1 steadies "
        "figures on a machine whose cores other jobs also use"
    )
    args = parser.parse_args(argv)
    command = " ".join(["python -m promptmux.benchmarks.micro.bench_prompt_concat", *(sys.argv[1:] if argv is None else argv)])
    if args.threads:
        torch.set_num_threads(args.threads)

    batches, prompts, dims = ([1, 8, 64, 256], [1, 10, 100, 1000], [512, 4096])
    budget = 0.3
    if args.quick:
        batches, prompts, dims, budget = [1, 64], [10, 1000], [512], 0.2
    cases = [Case(b, p, d) for d in dims for p in prompts for b in batches]

    targets = [("cpu", ["torch"], "prompt_concat_cpu.md", args.machine)]
    if torch.cuda.is_available():
        targets.append(("cuda", ["triton", "torch"], "prompt_concat_cuda.md", torch.cuda.get_device_name()))
    for device, backends, filename, machine in targets:
        print(f"\n{device}: loop / op ratios ({machine})")
        load_before = os.getloadavg()[0]
        rows = run_grid(cases, device, backends, budget)
        load = f"1-minute load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after."
        text = table(rows, backends, f"Prompt concat + mask: op vs per-request loop ({device})", machine, load, command)
        print(text)
        if not args.no_write and not args.quick:
            RESULTS.mkdir(parents=True, exist_ok=True)
            (RESULTS / filename).write_text(text)
            print(f"wrote {RESULTS / filename}")


if __name__ == "__main__":
    main()
