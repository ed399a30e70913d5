"""What the per-row logits controls cost the step loop: time per generated token of a full
batch with every row using them, against the same batch without.

The step executor, engine-direct, one model instance. Each workload is 64 rows of `reverse`
on random 3-16 character strings, every row forced to `--tokens` tokens (ignore_eos, so both
sides produce the same number of tokens):
- `eos-mask`: ignore_eos alone (the EOS mask; no history);
- each control alone on top of it: repetition_penalty 1.2, no_repeat_ngram_size 3, a stop
  sequence that never matches (its check runs every step), logprobs with 5 alternatives;
- `all-controls`: all of them.
Both produce the same tokens per row, so the figure, all-controls / eos-mask, is what the
controls add per token. Rounds run a-b-b-a; the figure is the ratio of medians, in one run.

    python -m promptmux.benchmarks.micro.bench_row_controls              # writes results/<date>-<machine>/row_controls.md
    python -m promptmux.benchmarks.micro.bench_row_controls --quick      # fewer rounds, prints only
"""
from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from promptmux.prompts.store import PromptStore
from promptmux.serving.config import EngineConfig, ModelConfig
from promptmux.serving.demo.prompts import seed_demo_prompts
from promptmux.serving.engine.core import Engine
from promptmux.serving.engine.plan import StepPlan
from promptmux.serving.engine.step.executor import StepExecutor
from promptmux.serving.engine.types import GenerationParams, GenerationRequest
from promptmux.serving.model.loading import load_model

from ..machine import machine_info, results_folder_name

RESULTS = Path(__file__).resolve().parents[1] / "results"
ROWS = 64


def workloads(tokens: int) -> dict[str, GenerationParams]:
    base = dict(max_new_tokens=tokens, ignore_eos=True)
    return {
        "eos-mask": GenerationParams(**base),
        "repetition-penalty": GenerationParams(**base, repetition_penalty=1.2),
        "3-gram bans": GenerationParams(**base, no_repeat_ngram_size=3),
        "stop sequence": GenerationParams(**base, stop=("@@@@",)),
        "logprobs 5": GenerationParams(**base, logprobs=5),
        "all-controls": GenerationParams(**base, repetition_penalty=1.2, no_repeat_ngram_size=3, stop=("@@@@",),
                                         logprobs=5),
    }


def seconds_per_token(engine: Engine, executor: StepExecutor, params: GenerationParams, seed: int) -> float:
    rng = random.Random(seed)
    texts = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(rng.randint(3, 16)))
             for _ in range(ROWS)]
    prepared = [engine.prepare(GenerationRequest("demo", t, task="reverse", params=params)) for t in texts]
    executor.execute(StepPlan(admit=tuple(enumerate(prepared))))  # admission and the first step, not timed
    produced, started = 0, time.perf_counter()
    with torch.inference_mode():
        while executor.active_slots:
            produced += len(executor.execute(StepPlan()).tokens)
    return (time.perf_counter() - started) / produced


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="2 rounds, print only")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    loaded = load_model(ModelConfig(source="embedded", dtype="float32"))
    store = PromptStore(tempfile.mkdtemp(prefix="bench-controls-"), d_model=loaded.d_model, max_length=128)
    seed_demo_prompts(store)
    engine = Engine(loaded, store, EngineConfig(max_batch_size=ROWS, max_input_tokens=64,
                                                max_new_tokens_limit=max(args.tokens, 64)))
    executor = StepExecutor(engine.context)
    cases = workloads(args.tokens)
    rounds = 2 if args.quick else args.rounds
    times: dict[str, list[float]] = {name: [] for name in cases}
    for round_index in range(rounds + 1):  # round 0 warms up
        order = list(cases) if round_index % 2 else list(reversed(cases))  # a-b-b-a over all workloads
        for name in order:
            spent = seconds_per_token(engine, executor, cases[name], seed=round_index)
            if round_index:
                times[name].append(spent)
    medians = {name: statistics.median(t) for name, t in times.items()}
    ratio = medians["all-controls"] / medians["eos-mask"]
    info = machine_info()
    lines = [
        "# The per-row logits controls in the step loop",
        "",
        f"Machine: {info.describe()}; one torch thread; embedded model, {ROWS} rows of `reverse`, "
        f"{args.tokens} tokens each (ignore_eos), {rounds} rounds a-b-b-a, medians.",
        "",
        "| workload (every row) | µs per generated token | / eos-mask |",
        "|---|---:|---:|",
        *(f"| {name} | {medians[name] * 1e6:.1f} | {medians[name] / medians['eos-mask']:.2f} |" for name in cases),
        "",
        f"all-controls / eos-mask: **{ratio:.2f}x** the time per token (repetition penalty, 3-gram bans, a stop "
        "sequence checked every step and 5 logprob alternatives on every row, against the EOS mask alone).",
        "",
        "`python -m promptmux.benchmarks.micro.bench_row_controls`",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick:
        folder = RESULTS / results_folder_name(info)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "row_controls.md").write_text(text)
        print(f"wrote {folder / 'row_controls.md'}")


if __name__ == "__main__":
    main()
