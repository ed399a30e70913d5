"""`promptmux bench gpu`: a T5-XXL-shaped model with random weights, bf16, on one CUDA GPU.

Measures generated tokens/s of mixed-task batches (engine-direct: the cost of the model, not
of gRPC) at several batch sizes, and compares decoding with the memory-bandwidth bound.
Decode throughput is isolated from encoding by timing each batch twice, with `new_tokens` and
with 1 new token: decode time = T(new_tokens) - T(1), which covers steps 2..new_tokens.

The bound counts what those steps read from memory (decode_bytes.py): the decoder's weights
less the cross-attention K/V projections (cached after step 1), plus every row's cache:
cross-attention K/V at the encoder length and self-attention K/V up to the step. It is given
against the card's nominal bandwidth and against a measured device-to-device copy.

Random weights may emit EOS at any step, so EOS is suppressed for benchmark rows (a hook on
the output projection) and the run checks that generated tokens = batch x new tokens.

    promptmux bench gpu --output out/bench        # t5-xxl, bf16, batch sizes 1,8,32,64
    promptmux bench gpu --batch-sizes 1,16,128 --new-tokens 128 --hbm-gbps 3350

Random T5-XXL weights need about 23 GB of GPU memory in bf16 (they are built in bf16
directly; building in fp32 first would need 44 GB).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from .decode_bytes import DecodeStepBytes, decode_step_bytes

# Nominal HBM bandwidth (GB/s) by device name; `--hbm-gbps` overrides, and the measured copy
# bandwidth is reported next to it.
NOMINAL_HBM_GBPS = {
    "H200": 4800,
    "H100 NVL": 3900,
    "H100 PCIe": 2000,
    "H100": 3350,  # SXM
    "GH200": 4000,
    "A100-SXM4-80GB": 2039,
    "A100 80GB PCIe": 1935,
    "A100": 1555,
    "L40S": 864,
    "A10G": 600,
    "L4": 300,
}


MODES = ("static", "continuous")


class NoCudaError(RuntimeError):
    pass


class UnsupportedModeError(RuntimeError):
    pass


def add_gpu_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="random:t5-xxl", help="model source (default random:t5-xxl)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--device", default="cuda", help="CUDA device, e.g. cuda or cuda:1")
    parser.add_argument("--batch-sizes", default="1,8,32,64", help="comma-separated batch sizes")
    parser.add_argument("--tasks", type=int, default=64, help="distinct prompts spread over each batch")
    parser.add_argument("--prompt-length", type=int, default=100)
    parser.add_argument("--input-length", type=int, default=128, help="input characters per request")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per batch size (best is kept)")
    parser.add_argument("--hbm-gbps", type=float, help="HBM bandwidth in GB/s (default: by device name)")
    parser.add_argument("--decode-graphs", default="auto", choices=["auto", "cuda-graphs", "compile", "none"],
                        help="how the step loop runs its decoder forward (engine.decode_graphs; auto: CUDA graphs)")
    parser.add_argument("--mode", default="static", choices=MODES,
                        help="static: batch-at-a-time (engine.run_batch); continuous: the step loop (serving/engine/step/executor.py)")
    parser.add_argument("--output", type=Path,
                        help="results folder, created if missing (default benchmarks/results/<date>-<gpu>); "
                             "on a device that returns only one folder, point it there, e.g. --output \"$OUT/bench\"")


def require_cuda(device: str) -> None:
    if not torch.cuda.is_available():
        raise NoCudaError(
            "promptmux bench gpu needs a CUDA GPU, and torch.cuda.is_available() is False here "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'}). Run it on a machine "
            "with an NVIDIA GPU and a CUDA build of torch; for CPU figures run `promptmux bench suite`."
        )
    index = torch.device(device).index or 0
    if index >= torch.cuda.device_count():
        raise NoCudaError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")


@dataclass
class GpuPoint:
    batch_size: int
    new_tokens: int
    encoder_length: int  # padded encoder positions of the batch: the cross-attention cache length
    generated_tokens: int  # = batch_size * new_tokens (EOS suppressed; checked)
    total_s: float  # encode + decode of `new_tokens`
    one_token_s: float  # encode + the first token
    end_to_end_tps: float
    decode_tps: float  # tokens of steps 2..new_tokens / (total_s - one_token_s)
    step_gb: float  # mean bytes read per decode step (weights + every row's cache), GB
    bound_nominal_tps: float  # decode tokens/s at the nominal HBM bandwidth
    bound_copy_tps: float  # decode tokens/s at the measured device-copy bandwidth

    @property
    def fraction_nominal(self) -> float:
        return self.decode_tps / self.bound_nominal_tps

    @property
    def fraction_copy(self) -> float:
        return self.decode_tps / self.bound_copy_tps


def weight_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(all weights, decoder weights incl. lm_head), each tensor counted once (tied ones too)."""

    def total(params) -> int:
        seen: dict[int, torch.nn.Parameter] = {}
        for p in params:
            seen.setdefault(id(p), p)
        return sum(p.numel() * p.element_size() for p in seen.values())

    decode = list(model.decoder.parameters()) + list(model.lm_head.parameters())
    return total(model.parameters()), total(decode)


def nominal_bandwidth_gbps(name: str) -> float | None:
    for key, value in NOMINAL_HBM_GBPS.items():  # most specific names first
        if key in name:
            return float(value)
    return None


def measured_copy_gbps(device: torch.device, gib: float = 2.0) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read and written (a copy of N bytes moves 2N).

    About 3.0 TB/s on an H100 SXM and 4.3 TB/s on an H200: what a memory-bound kernel can reach.
    """
    n = int(gib * 2**30) // 4
    src = torch.empty(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    del src, dst
    return 2 * n * 4 / best / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    """Build parameters in `dtype` directly: an 11B model in fp32 first would need 44 GB."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_engine(model: str, dtype: str, device: str, store_root: str, max_batch_size: int,
                 decode_graphs: str = "auto"):
    from promptmux.serving.config import EngineConfig, ModelConfig, PromptmuxConfig, StoreConfig
    from promptmux.serving.engine.core import Engine

    config = PromptmuxConfig(
        model=ModelConfig(source=model, dtype=dtype, device=device),
        store=StoreConfig(root=Path(store_root), max_prompt_length=1024),
        engine=EngineConfig(max_batch_size=max_batch_size, max_new_tokens_limit=1024, max_input_tokens=2048,
                            decode_graphs=decode_graphs),
    )
    with _default_dtype(torch.bfloat16 if dtype == "bfloat16" else torch.float32):
        return Engine.from_config(config)


def batch_runner(engine, mode: str) -> Callable[[list], int]:
    """A function that runs one batch of requests to completion and returns the tokens generated.

    `static` runs the batch-at-a-time path (`engine.run_batch`, Hugging Face `generate`).
    `continuous` runs the step loop (serving/engine/step/executor.py): the batch is prepared once,
    admitted in one encoder forward, then decoded one step at a time over the engine's slots
    until every row is done, which is the loop a replica runs with its slots full.
    """
    check_mode(mode)
    if mode == "static":
        return lambda requests: engine.run_batch(requests).stats.output_tokens
    from promptmux.serving.engine.plan import StepPlan
    from promptmux.serving.engine.step.executor import StepExecutor

    steps = StepExecutor(engine.context)  # its slot cache is allocated once, for every batch

    def run(requests) -> int:
        outputs = steps.execute(StepPlan(admit=tuple((i, engine.prepare(r)) for i, r in enumerate(requests))))
        if outputs.errors:
            first = next(iter(outputs.errors.values()))
            raise RuntimeError(f"{len(outputs.errors)} of {len(requests)} requests failed admission: {first}")
        generated = len(outputs.tokens)
        while steps.active_slots:
            generated += len(steps.execute(StepPlan()).tokens)
        return generated

    return run


def check_mode(mode: str) -> None:
    """Refuse a mode this build cannot run, before minutes go into building the model."""
    if mode not in MODES:
        raise UnsupportedModeError(f"--mode {mode!r} is unknown; expected one of {', '.join(MODES)}")


def measure(
    engine, batch_sizes: Sequence[int], *, tasks: int, prompt_length: int, input_length: int, new_tokens: int,
    repeats: int, nominal_gbps: float, copy_gbps: float, mode: str = "static", log=print,
) -> list[GpuPoint]:
    from promptmux.serving.engine.types import GenerationParams, GenerationRequest

    if new_tokens < 2:
        raise ValueError(f"--new-tokens {new_tokens}: decoding is timed as T(new tokens) - T(1), so it needs >= 2")
    run = batch_runner(engine, mode)
    d_model = engine.loaded.d_model
    generator = torch.Generator().manual_seed(0)
    for t in range(tasks):
        engine.store.register("bench", f"task{t}", 0.05 * torch.randn(prompt_length, d_model, generator=generator))
    engine.refresh_prompts()
    rng = random.Random(0)
    device = engine.device

    def batch(size: int, tokens: int):
        # Random weights may pick EOS at any step; a benchmark row never stops early.
        params = GenerationParams(max_new_tokens=tokens, ignore_eos=True)
        return [
            GenerationRequest(tenant="bench", task=f"task{i % tasks}", params=params,
                              text="".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(input_length)))
            for i in range(size)
        ]

    def encoder_length(requests) -> int:
        # Every row has a prompt of prompt_length rows; the batch pads to its longest input.
        return prompt_length + max(len(engine.tokenizer(r.text)["input_ids"]) for r in requests)

    def timed(requests, tokens: int) -> float:
        _sync(device)
        start = time.perf_counter()
        generated = run(requests)
        _sync(device)
        seconds = time.perf_counter() - start
        if generated != len(requests) * tokens:
            raise RuntimeError(
                f"batch of {len(requests)} generated {generated} tokens, expected {len(requests)} x {tokens} = "
                f"{len(requests) * tokens}: rows ended early although they ignore EOS, so the timing would "
                "count steps that made no token; check the engine's stopping rules"
            )
        return seconds

    points = []
    for size in batch_sizes:
        full, first = batch(size, new_tokens), batch(size, 1)
        timed(full, new_tokens)  # warm-up: kernels, allocator, prompt cache
        total = min(timed(full, new_tokens) for _ in range(repeats))
        one = min(timed(first, 1) for _ in range(repeats))
        decode_s = max(total - one, 1e-9)
        generated = size * new_tokens
        decode_tokens = generated - size  # every row's first token came with T(1)
        accounting = decode_step_bytes(engine.model, encoder_length(full))
        point = GpuPoint(
            batch_size=size,
            new_tokens=new_tokens,
            encoder_length=accounting.encoder_length,
            generated_tokens=generated,
            total_s=total,
            one_token_s=one,
            end_to_end_tps=generated / total,
            decode_tps=decode_tokens / decode_s,
            step_gb=accounting.decode_bytes(size, new_tokens) / (new_tokens - 1) / 1e9,
            bound_nominal_tps=accounting.bound_tokens_per_s(size, new_tokens, nominal_gbps),
            bound_copy_tps=accounting.bound_tokens_per_s(size, new_tokens, copy_gbps),
        )
        points.append(point)
        log(f"  batch {size:>4}: {point.end_to_end_tps:9.1f} tok/s end to end, {point.decode_tps:9.1f} tok/s "
            f"decoding, {point.step_gb:6.2f} GB per step; {point.fraction_nominal:6.1%} of the bound at nominal "
            f"bandwidth, {point.fraction_copy:6.1%} at measured copy bandwidth")
    return points


def report_markdown(points: Sequence[GpuPoint], meta: dict) -> str:
    lines = [
        f"# promptmux GPU benchmark: {meta['model']}, {meta['mode']} batching",
        "",
        f"Card: **{meta['device_name']}**; model `{meta['model']}` in {meta['dtype']}; "
        f"{meta['all_weight_gb']:.2f} GB of weights, of which a decode step reads {meta['step_weight_gb']:.2f} GB "
        f"(decoder and output projection, {meta['decoder_weight_gb']:.2f} GB, less the cross-attention K/V "
        f"projections, {meta['cross_kv_weight_gb']:.2f} GB, cached after step 1).",
        "",
        f"Bandwidth: nominal {meta['nominal_gbps']:.0f} GB/s ({meta['nominal_source']}); measured device-to-device "
        f"copy {meta['copy_gbps']:.0f} GB/s (bytes read + written).",
        "",
        f"Workload: mixed batches over {meta['tasks']} tasks, prompt length {meta['prompt_length']}, "
        f"{meta['input_length']} input characters, {meta['new_tokens']} new tokens (EOS suppressed, so every row "
        f"makes them all), greedy, engine-direct (no gRPC). Best of {meta['repeats']} after a warm-up. {meta['when']}.",
        "",
        "Bound: bytes per decode step = decoder weights − cross-attention K/V projection weights + batch × "
        "(cross-attention K/V at the encoder length + self-attention K/V up to the step); "
        "bound tokens/s = batch × steps / (bytes of steps 2..N ÷ bandwidth). "
        "Decode tokens/s = tokens after the first / (T(N new tokens) − T(1 token)).",
        "",
        "| batch | encoder length | end-to-end tok/s | decode tok/s | GB per step | bound (nominal) | fraction "
        "| bound (measured copy) | fraction |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        lines.append(
            f"| {p.batch_size} | {p.encoder_length} | {p.end_to_end_tps:.1f} | {p.decode_tps:.1f} | {p.step_gb:.2f} | "
            f"{p.bound_nominal_tps:.0f} | {p.fraction_nominal:.1%} | {p.bound_copy_tps:.0f} | {p.fraction_copy:.1%} |"
        )
    return "\n".join(lines) + "\n"


def run_gpu_bench(
    *, model: str, dtype: str, device: str, batch_sizes: Sequence[int], tasks: int, prompt_length: int,
    input_length: int, new_tokens: int, repeats: int, hbm_gbps: float | None, output: Path | None,
    mode: str = "static", decode_graphs: str = "auto", require_gpu: bool = True, log=print,
) -> Path:
    """Measure and write gpu.md and gpu.json; `require_gpu=False` lets tests run it on CPU."""
    check_mode(mode)
    if require_gpu:
        require_cuda(device)
    torch_device = torch.device(device)
    if torch_device.type == "cuda":
        name = torch.cuda.get_device_name(torch_device)
        copy_gbps = measured_copy_gbps(torch_device)
    else:
        name, copy_gbps = "cpu", measured_copy_gbps(torch_device, gib=0.0625)
    nominal = nominal_bandwidth_gbps(name)
    if hbm_gbps:
        bandwidth, source = hbm_gbps, "--hbm-gbps"
    elif nominal:
        bandwidth, source = nominal, "the card's nominal figure"
    else:
        bandwidth, source = copy_gbps, "measured copy: this device is not in the table; pass --hbm-gbps"
    log(f"building {model} ({dtype}) on {device} ...")
    with tempfile.TemporaryDirectory(prefix="promptmux-gpu-bench-") as root:
        engine = build_engine(model, dtype, device, root, max(batch_sizes), decode_graphs)
        all_bytes, _ = weight_bytes(engine.model)
        accounting: DecodeStepBytes = decode_step_bytes(engine.model, encoder_length=0)
        points = measure(engine, batch_sizes, tasks=tasks, prompt_length=prompt_length, input_length=input_length,
                         new_tokens=new_tokens, repeats=repeats, nominal_gbps=bandwidth, copy_gbps=copy_gbps,
                         mode=mode, log=log)
    meta = {
        "device_name": name, "model": model, "dtype": dtype, "mode": mode, "decode_graphs": decode_graphs,
        "nominal_gbps": bandwidth, "nominal_source": source, "copy_gbps": copy_gbps,
        "all_weight_gb": all_bytes / 1e9, "decoder_weight_gb": accounting.decoder_weight_bytes / 1e9,
        "cross_kv_weight_gb": accounting.cross_kv_weight_bytes / 1e9,
        "step_weight_gb": accounting.weight_bytes_per_step / 1e9,
        "cache_mb_per_row_per_position": accounting.self_cache_bytes_per_position / 1e6,
        "tasks": tasks, "prompt_length": prompt_length, "input_length": input_length, "new_tokens": new_tokens,
        "repeats": repeats, "when": f"{datetime.datetime.now():%Y-%m-%d %H:%M}",
    }
    if output is None:
        from ..machine import machine_info, results_folder_name
        from .suite import RESULTS_DIR

        output = RESULTS_DIR / results_folder_name(machine_info())
    output.mkdir(parents=True, exist_ok=True)
    (output / "gpu.md").write_text(report_markdown(points, meta))
    (output / "gpu.json").write_text(json.dumps({"meta": meta, "points": [
        {**asdict(p), "fraction_nominal": p.fraction_nominal, "fraction_copy": p.fraction_copy} for p in points
    ]}, indent=2))
    log(f"report: {output / 'gpu.md'}")
    return output


def run_gpu_command(args: argparse.Namespace) -> int:
    try:
        sizes = [int(v) for v in args.batch_sizes.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"--batch-sizes {args.batch_sizes!r}: expected comma-separated integers, e.g. 1,8,32") from None
    try:
        run_gpu_bench(
            model=args.model, dtype=args.dtype, device=args.device, batch_sizes=sizes, tasks=args.tasks,
            prompt_length=args.prompt_length, input_length=args.input_length, new_tokens=args.new_tokens,
            repeats=args.repeats, hbm_gbps=args.hbm_gbps, output=args.output, mode=args.mode,
            decode_graphs=args.decode_graphs,
        )
    except (NoCudaError, UnsupportedModeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
