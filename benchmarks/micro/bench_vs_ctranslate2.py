"""The decode loop beside CTranslate2's, on the same CPU and the same weights.

CTranslate2 is what users who serve T5 on CPUs pick. It takes token ids only, never input
embeddings (its issue #1117), so a task there is a text prefix; here each task is a soft prompt.
Both sides decode greedily in one process, one after the other, with the same thread count.

- Same weights: the model is saved with `save_pretrained` and converted with
  `ct2-transformers-converter` (fp32, and int8 with `--quantization int8`). Before timing,
  CTranslate2's fp32 tokens and ours are checked against Hugging Face `generate` on the rows.
- Random shapes (`random:t5-small`, `random:t5-base`): 64 rows of 32 input tokens, exactly 64
  new tokens each (EOS ignored on every side). Ours runs engine-direct: the step executor
  driven by plans, with 64 different 20-row soft prompts (and again with no prompt, like for
  like), fp32 and with `model.quantization: int8`; CTranslate2 fp32 and int8; Hugging Face
  `generate` on the plain inputs. Also one request alone (batch-1 latency, 64 tokens).
- The embedded model: `reverse` on 64 fresh strings, to its own EOS: ours by the demo soft
  prompt, CTranslate2 by the pretraining prefix `reverse: `; rows whose text is the reversed
  input are counted.

Each round runs every engine once, and every other round in reverse order (a-b-b-a), so a drift
in the machine's speed hits all engines alike. Figures are ratios within one run:

    python -m promptmux.benchmarks.micro.bench_vs_ctranslate2 [--models t5-small,t5-base,embedded]
        [--threads 1,2] [--rounds 2] [--out benchmarks/results/<date>-<machine>/decode]
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from promptmux.serving.engine.core import Engine
from promptmux.serving.engine.plan import StepPlan
from promptmux.serving.engine.step.executor import StepExecutor
from promptmux.serving.engine.types import GenerationParams, GenerationRequest, PreparedRequest

from ..engine_direct import DirectEngine, register_random_prompts
from ..machine import machine_info

ROWS, INPUT_TOKENS, NEW_TOKENS, PROMPT_ROWS = 64, 32, 64, 20
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def require_ctranslate2():
    try:
        import ctranslate2
    except ImportError:
        raise SystemExit("this benchmark needs CTranslate2: pip install 'promptmux[bench]' (or pip install ctranslate2)")
    return ctranslate2


# ---------------------------------------------------------------------- the two sides
@dataclass
class Side:
    """One engine of the comparison: `run()` decodes the workload once, returns rows' token ids."""

    name: str
    run: Callable[[], list[list[int]]]
    seconds: list[float] = field(default_factory=list)
    tokens: int = 0

    def time_once(self) -> list[list[int]]:
        started = time.perf_counter()
        rows = self.run()
        self.seconds.append(time.perf_counter() - started)
        self.tokens = sum(len(r) for r in rows)
        return rows

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / statistics.median(self.seconds)


def executor_run(engine: Engine, requests: list[PreparedRequest]) -> Callable[[], list[list[int]]]:
    """Engine-direct: one admission plan for every request, then steps until all are done."""
    executor = StepExecutor(engine.context)

    def run() -> list[list[int]]:
        done = dict(executor.execute(StepPlan(admit=tuple(enumerate(requests)))).finished)
        while executor.active_slots:
            done.update(executor.execute(StepPlan()).finished)
        return [done[i].token_ids for i in range(len(requests))]

    return run


class Converted:
    """The model saved and converted for CTranslate2 (fp32 and int8), with token mapping."""

    def __init__(self, engine: Engine, folder: Path, threads: int) -> None:
        ctranslate2 = require_ctranslate2()
        hf, self.tokenizer = folder / "hf", engine.tokenizer
        engine.model.save_pretrained(hf)
        engine.tokenizer.save_pretrained(hf)
        converter = Path(sys.executable).with_name("ct2-transformers-converter")
        self.translators = {}
        for kind, extra in (("fp32", []), ("int8", ["--quantization", "int8"])):
            out = folder / f"ct2-{kind}"
            subprocess.run([str(converter), "--model", str(hf), "--output_dir", str(out), "--force", *extra],
                           check=True, capture_output=True, text=True)
            self.translators[kind] = ctranslate2.Translator(str(out), device="cpu", intra_threads=threads,
                                                            inter_threads=1)
        # CTranslate2's vocabulary lists a name per model id (ids past a byte tokenizer's get
        # `<extra_id_N>` names, the first 125 of them twice): map each name back to the first id
        # that has it.
        self.ids: dict[str, int] = {}
        for i, token in enumerate(json.loads((folder / "ct2-fp32" / "shared_vocabulary.json").read_text())):
            self.ids.setdefault(token, i)

    def runner(self, kind: str, sources: list[list[int]], length: int | None, max_length: int = 64):
        translator = self.translators[kind]
        tokens = [self.tokenizer.convert_ids_to_tokens(ids) for ids in sources]
        options = dict(beam_size=1, max_batch_size=len(tokens), max_decoding_length=length or max_length)
        if length:
            options["min_decoding_length"] = length

        def run() -> list[list[int]]:
            results = translator.translate_batch(tokens, **options)
            return [[self.ids.get(t, -1) for t in r.hypotheses[0]] for r in results]

        return run


def hf_generate(engine: Engine, sources: list[list[int]], length: int) -> Callable[[], list[list[int]]]:
    ids = torch.tensor(sources)
    mask = torch.ones_like(ids)

    def run() -> list[list[int]]:
        with torch.inference_mode():
            out = engine.model.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1,
                                        min_new_tokens=length, max_new_tokens=length)
        return out[:, 1:].tolist()

    return run


# ---------------------------------------------------------------------- workloads
def random_shape(shape: str, threads: int, rounds: int, scratch: Path, bar) -> dict:
    """64 rows x 64 forced tokens on a random shape: ours (prompts / none / int8), CT2, HF."""
    engines = {q: DirectEngine({"source": f"random:{shape}", "quantization": q},
                               {"max_batch_size": ROWS, "max_new_tokens_limit": NEW_TOKENS},
                               torch_threads=threads) for q in ("none", "int8")}
    try:
        fp32, int8 = engines["none"].engine, engines["int8"].engine
        rng = random.Random(0)
        texts = ["".join(rng.choice(LETTERS) for _ in range(INPUT_TOKENS - 1)) for _ in range(ROWS)]
        for engine in (fp32, int8):
            register_random_prompts(engine, "bench", [PROMPT_ROWS] * ROWS, seed=0)

        def prepared(engine: Engine, task: bool) -> list[PreparedRequest]:
            params = GenerationParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)  # every row exactly 64 tokens
            return [engine.prepare(GenerationRequest(tenant="bench", text=t, task=f"task{i}" if task else None,
                                                     params=params)) for i, t in enumerate(texts)]

        sources = [list(p.token_ids) for p in prepared(fp32, task=False)]
        converted = Converted(fp32, scratch / shape, threads)
        sides = [
            Side("promptmux fp32, 64 soft prompts", executor_run(fp32, prepared(fp32, task=True))),
            Side("promptmux fp32, no prompt", executor_run(fp32, prepared(fp32, task=False))),
            Side("promptmux int8, 64 soft prompts", executor_run(int8, prepared(int8, task=True))),
            Side("CTranslate2 fp32", converted.runner("fp32", sources, NEW_TOKENS)),
            Side("CTranslate2 int8", converted.runner("int8", sources, NEW_TOKENS)),
            Side("Hugging Face generate", hf_generate(fp32, sources, NEW_TOKENS)),
        ]
        lone = [
            Side("promptmux fp32, batch 1", executor_run(fp32, prepared(fp32, task=True)[:1])),
            Side("CTranslate2 fp32, batch 1", converted.runner("fp32", sources[:1], NEW_TOKENS)),
            Side("Hugging Face generate, batch 1", hf_generate(fp32, sources[:1], NEW_TOKENS)),
        ]
        reference = sides[5].run()
        exact = {s.name: sum(a == b for a, b in zip(s.run(), reference))
                 for s in (sides[1], sides[3], sides[4])}
        for side in sides + lone:
            side.run()  # warm-up: slot cache, packed weights, CTranslate2's first call
        for round_ in range(rounds):
            order = sides + lone if round_ % 2 == 0 else (sides + lone)[::-1]
            for side in order:
                side.time_once()
                bar.update(1)
    finally:
        for direct in engines.values():
            direct.close()
    return {"model": f"random:{shape}", "threads": threads, "exact_vs_hf": exact, "rows": ROWS,
            "sides": {s.name: {"tokens_per_s": s.tokens_per_s, "seconds": s.seconds, "tokens": s.tokens} for s in sides},
            "latency_ms": {s.name: 1000 * statistics.median(s.seconds) for s in lone}}


def embedded_reverse(threads: int, rounds: int, scratch: Path, bar) -> dict:
    """The demo `reverse` on 64 fresh strings: ours by its soft prompt, CT2 by its text prefix."""
    from promptmux.serving.demo.prompts import seed_demo_prompts

    direct = DirectEngine("embedded", {"max_batch_size": ROWS, "max_new_tokens_limit": 32}, torch_threads=threads)
    try:
        engine = direct.engine
        seed_demo_prompts(engine.store)
        engine.refresh_prompts()
        rng = random.Random(7)
        words = ["".join(rng.choice(LETTERS + "0123456789") for _ in range(rng.randint(3, 16))) for _ in range(ROWS)]
        ours = [engine.prepare(GenerationRequest(tenant="bench", text=w, task="reverse",
                                                 params=GenerationParams(max_new_tokens=32))) for w in words]
        prefixed = [engine.tokenizer(f"reverse: {w}")["input_ids"] for w in words]
        converted = Converted(engine, scratch / "embedded", threads)
        sides = [Side("promptmux fp32, soft prompt", executor_run(engine, ours)),
                 Side("CTranslate2 fp32, text prefix", converted.runner("fp32", prefixed, None, 32)),
                 Side("CTranslate2 int8, text prefix", converted.runner("int8", prefixed, None, 32))]
        correct = {}
        for side in sides:
            rows = side.run()
            correct[side.name] = sum(engine.detokenize(r) == w[::-1] for r, w in zip(rows, words))
        for round_ in range(rounds):
            for side in sides if round_ % 2 == 0 else sides[::-1]:
                side.time_once()
                bar.update(1)
    finally:
        direct.close()
    return {"model": "embedded (reverse)", "threads": threads, "correct": correct, "rows": ROWS,
            "sides": {s.name: {"tokens_per_s": s.tokens_per_s, "seconds": s.seconds, "tokens": s.tokens} for s in sides}}


# ---------------------------------------------------------------------- report
def report(runs: list[dict], machine) -> str:
    lines = ["# promptmux's decode loop beside CTranslate2", "",
             f"Machine: {machine.describe()}; load average at the end {machine.load_average}; CTranslate2 "
             f"{require_ctranslate2().__version__}. Engine-direct, greedy, one process, a-b-b-a rounds (medians). "
             "Command: `python -m promptmux.benchmarks.micro.bench_vs_ctranslate2`.", ""]
    for run in runs:
        sides = run["sides"]
        fp32 = next(v["tokens_per_s"] for k, v in sides.items() if k.startswith("CTranslate2 fp32"))
        int8 = next(v["tokens_per_s"] for k, v in sides.items() if k.startswith("CTranslate2 int8"))
        lines += [f"## {run['model']}, {run['threads']} thread(s)", "",
                  "| engine | tokens/s | ÷ CT2 fp32 | ÷ CT2 int8 |", "|---|---:|---:|---:|"]
        for name, side in sides.items():
            lines.append(f"| {name} | {side['tokens_per_s']:,.0f} | {side['tokens_per_s'] / fp32:.2f} | "
                         f"{side['tokens_per_s'] / int8:.2f} |")
        if "latency_ms" in run:
            ct2 = run["latency_ms"]["CTranslate2 fp32, batch 1"]
            lines += ["", "| batch-1 latency, 64 tokens | ms | ÷ CT2 fp32 |", "|---|---:|---:|"]
            lines += [f"| {name} | {ms:,.0f} | {ms / ct2:.2f} |" for name, ms in run["latency_ms"].items()]
        if "exact_vs_hf" in run:
            lines += ["", "Rows token-exact against Hugging Face `generate` (of 64): "
                      + ", ".join(f"{k} {v}" for k, v in run["exact_vs_hf"].items())]
        if "correct" in run:
            lines += ["", "Rows that are the reversed input (of 64): " + ", ".join(f"{k} {v}" for k, v in run["correct"].items())]
        lines.append("")
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 4.2), squeeze=False)
    for ax, run in zip(axes[0], runs):
        names = list(run["sides"])
        values = [run["sides"][n]["tokens_per_s"] for n in names]
        colours = ["tab:blue" if n.startswith("promptmux") else "tab:orange" if n.startswith("CT") else "tab:gray"
                   for n in names]
        ax.barh(range(len(names)), values, color=colours)
        ax.set_yticks(range(len(names)), [n.replace(", ", "\n") for n in names], fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"{run['model']}\n{run['threads']} thread(s)", fontsize=9)
        ax.set_xlabel("tokens/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="t5-small,t5-base,embedded")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True, help="folder for report.md, runs.json and the plot")
    args = parser.parse_args(argv)
    require_ctranslate2()
    models = args.models.split(",")
    threads = [int(t) for t in args.threads.split(",")]
    runs = []
    steps = sum(args.rounds * (9 if m != "embedded" else 3) for m in models) * len(threads)
    with tempfile.TemporaryDirectory(prefix="promptmux-ct2-") as scratch, tqdm(total=steps, desc="decode vs CT2") as bar:
        for count in threads:
            for model in models:
                folder = Path(scratch) / f"{model}-{count}"
                if model == "embedded":
                    runs.append(embedded_reverse(count, args.rounds, folder, bar))
                else:
                    runs.append(random_shape(model, count, args.rounds, folder, bar))
                shutil.rmtree(folder, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    (args.out / "runs.json").write_text(json.dumps({"machine": machine.to_dict(), "runs": runs}, indent=1))
    (args.out / "report.md").write_text(report(runs, machine))
    plot(runs, args.out / "decode_vs_ctranslate2.png")
    print((args.out / "report.md").read_text())


if __name__ == "__main__":
    main()
