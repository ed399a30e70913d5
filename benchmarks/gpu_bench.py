"""`promptmux bench gpu`: a T5-XXL-shaped model with random weights, bf16, on one CUDA GPU.

Measures generated tokens/s of mixed-task batches (engine-direct: the cost of the model, not
of gRPC) at several batch sizes, and compares decoding with the memory-bandwidth bound.
Decoding one token per row reads every weight once per step, so

    bound tokens/s = batch size * HBM bandwidth / weight bytes

Two weight counts are reported: all the model's weights (the project's headline definition)
and only what a decode step reads (decoder stack plus output projection; the encoder runs
once per request). Decode throughput is isolated from encoding by timing each batch twice,
with `new_tokens` and with 1 new token: decode time = T(new_tokens) - T(1).

    promptmux bench gpu                           # t5-xxl, bf16, batch sizes 1,8,32,64
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
from typing import Sequence

import torch

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


class NoCudaError(RuntimeError):
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
    parser.add_argument("--output", type=Path, help="results folder (default benchmarks/results/<date>-<gpu>)")


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
    generated_tokens: int
    total_s: float  # encode + decode of `new_tokens`
    one_token_s: float  # encode + the first token
    end_to_end_tps: float
    decode_tps: float
    bound_all_weights_tps: float
    bound_decode_weights_tps: float

    @property
    def fraction_all(self) -> float:
        return self.decode_tps / self.bound_all_weights_tps

    @property
    def fraction_decode(self) -> float:
        return self.decode_tps / self.bound_decode_weights_tps


def weight_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(all weights, weights a decode step reads), each tensor counted once (tied ones too)."""

    def total(params) -> int:
        seen, size = set(), 0
        for p in params:
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                size += p.numel() * p.element_size()
        return size

    decode = list(model.decoder.parameters()) + list(model.lm_head.parameters())
    return total(model.parameters()), total(decode)


def nominal_bandwidth_gbps(name: str) -> float | None:
    for key, value in NOMINAL_HBM_GBPS.items():  # most specific names first
        if key in name:
            return float(value)
    return None


def measured_copy_gbps(device: torch.device, gib: float = 2.0) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second)."""
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


def build_engine(model: str, dtype: str, device: str, store_root: str, max_batch_size: int):
    from promptmux.serving.config import EngineConfig, ModelConfig, PromptmuxConfig, StoreConfig
    from promptmux.serving.engine import Engine

    config = PromptmuxConfig(
        model=ModelConfig(source=model, dtype=dtype, device=device),
        store=StoreConfig(root=Path(store_root), max_prompt_length=1024),
        engine=EngineConfig(max_batch_size=max_batch_size, max_new_tokens_limit=1024, max_input_tokens=2048),
    )
    with _default_dtype(torch.bfloat16 if dtype == "bfloat16" else torch.float32):
        return Engine.from_config(config)


def measure(
    engine, batch_sizes: Sequence[int], *, tasks: int, prompt_length: int, input_length: int, new_tokens: int,
    repeats: int, bandwidth_gbps: float, log=print,
) -> list[GpuPoint]:
    from promptmux.serving.requests import GenerationParams, GenerationRequest

    d_model = engine.loaded.d_model
    generator = torch.Generator().manual_seed(0)
    for t in range(tasks):
        engine.store.register("bench", f"task{t}", 0.05 * torch.randn(prompt_length, d_model, generator=generator))
    engine.refresh_prompts()
    rng = random.Random(0)
    all_bytes, decode_bytes = weight_bytes(engine.model)
    device = engine.device

    def batch(size: int, tokens: int):
        params = GenerationParams(max_new_tokens=tokens)
        return [
            GenerationRequest(tenant="bench", task=f"task{i % tasks}", params=params,
                              text="".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(input_length)))
            for i in range(size)
        ]

    def timed(requests) -> tuple[float, int]:
        _sync(device)
        start = time.perf_counter()
        output = engine.run_batch(requests)
        _sync(device)
        return time.perf_counter() - start, output.stats.output_tokens

    points = []
    for size in batch_sizes:
        full, first = batch(size, new_tokens), batch(size, 1)
        timed(full)  # warm-up: kernels, allocator, prompt cache
        total, generated = min(timed(full) for _ in range(repeats))
        one, _ = min(timed(first) for _ in range(repeats))
        decode_s = max(total - one, 1e-9)
        decode_tokens = max(generated - size, 0)  # every row's first token came with T(1)
        point = GpuPoint(
            batch_size=size,
            new_tokens=new_tokens,
            generated_tokens=generated,
            total_s=total,
            one_token_s=one,
            end_to_end_tps=generated / total,
            decode_tps=decode_tokens / decode_s,
            bound_all_weights_tps=size * bandwidth_gbps * 1e9 / all_bytes,
            bound_decode_weights_tps=size * bandwidth_gbps * 1e9 / decode_bytes,
        )
        points.append(point)
        log(f"  batch {size:>4}: {point.end_to_end_tps:9.1f} tok/s end to end, {point.decode_tps:9.1f} tok/s decoding, "
            f"{point.fraction_all:6.1%} of the all-weights bound, {point.fraction_decode:6.1%} of the decode-weights bound")
    return points


def report_markdown(points: Sequence[GpuPoint], meta: dict) -> str:
    lines = [
        "# promptmux GPU benchmark: T5-XXL shape, random weights",
        "",
        f"Device: {meta['device_name']}; model `{meta['model']}` in {meta['dtype']}; "
        f"{meta['all_weight_gb']:.2f} GB of weights, {meta['decode_weight_gb']:.2f} GB read per decode step. "
        f"HBM bandwidth used for the bound: {meta['bandwidth_gbps']:.0f} GB/s ({meta['bandwidth_source']}); "
        f"measured device copy bandwidth {meta['copy_gbps']:.0f} GB/s.",
        "",
        f"Workload: mixed batches over {meta['tasks']} tasks, prompt length {meta['prompt_length']}, "
        f"{meta['input_length']} input characters, {meta['new_tokens']} new tokens, greedy, engine-direct "
        f"(no gRPC). Best of {meta['repeats']} after a warm-up. {meta['when']}.",
        "",
        "Bound: tokens/s = batch × bandwidth / weight bytes (weights read once per decode step). "
        "Decode tokens/s = tokens after the first / (T(new tokens) − T(1 token)).",
        "",
        "| batch | end-to-end tok/s | decode tok/s | bound (all weights) | fraction | bound (decode weights) | fraction |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        lines.append(
            f"| {p.batch_size} | {p.end_to_end_tps:.1f} | {p.decode_tps:.1f} | {p.bound_all_weights_tps:.0f} | "
            f"{p.fraction_all:.1%} | {p.bound_decode_weights_tps:.0f} | {p.fraction_decode:.1%} |"
        )
    return "\n".join(lines) + "\n"


def run_gpu_bench(
    *, model: str, dtype: str, device: str, batch_sizes: Sequence[int], tasks: int, prompt_length: int,
    input_length: int, new_tokens: int, repeats: int, hbm_gbps: float | None, output: Path | None,
    require_gpu: bool = True, log=print,
) -> Path:
    """Measure and write gpu.md and gpu.json; `require_gpu=False` lets tests run it on CPU."""
    if require_gpu:
        require_cuda(device)
    torch_device = torch.device(device)
    if torch_device.type == "cuda":
        name = torch.cuda.get_device_name(torch_device)
        copy_gbps = measured_copy_gbps(torch_device)
    else:
        name, copy_gbps = "cpu", float("nan")
    nominal = nominal_bandwidth_gbps(name)
    if hbm_gbps:
        bandwidth, source = hbm_gbps, "--hbm-gbps"
    elif nominal:
        bandwidth, source = nominal, "nominal for this device"
    elif copy_gbps == copy_gbps:
        bandwidth, source = copy_gbps, "measured copy bandwidth (device not in the table; pass --hbm-gbps)"
    else:
        bandwidth, source = 50.0, "a placeholder for CPU runs"
    log(f"building {model} ({dtype}) on {device} ...")
    with tempfile.TemporaryDirectory(prefix="promptmux-gpu-bench-") as root:
        engine = build_engine(model, dtype, device, root, max(batch_sizes))
        all_bytes, decode_bytes = weight_bytes(engine.model)
        points = measure(engine, batch_sizes, tasks=tasks, prompt_length=prompt_length, input_length=input_length,
                         new_tokens=new_tokens, repeats=repeats, bandwidth_gbps=bandwidth, log=log)
    meta = {
        "device_name": name, "model": model, "dtype": dtype, "bandwidth_gbps": bandwidth, "bandwidth_source": source,
        "copy_gbps": copy_gbps, "all_weight_gb": all_bytes / 1e9, "decode_weight_gb": decode_bytes / 1e9,
        "tasks": tasks, "prompt_length": prompt_length, "input_length": input_length, "new_tokens": new_tokens,
        "repeats": repeats, "when": f"{datetime.datetime.now():%Y-%m-%d %H:%M}",
    }
    if output is None:
        from .machine import machine_info, results_folder_name
        from .suite import RESULTS_DIR

        output = RESULTS_DIR / results_folder_name(machine_info())
    output.mkdir(parents=True, exist_ok=True)
    (output / "gpu.md").write_text(report_markdown(points, meta))
    (output / "gpu.json").write_text(json.dumps({"meta": meta, "points": [
        {**asdict(p), "fraction_all": p.fraction_all, "fraction_decode": p.fraction_decode} for p in points
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
            repeats=args.repeats, hbm_gbps=args.hbm_gbps, output=args.output,
        )
    except NoCudaError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
