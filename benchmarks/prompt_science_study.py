"""The prompt-science study on the embedded model: task embeddings, SPoT retrieval and
transfer, factorized prompts. Writes a markdown report with plots (prompt_science_report.py).

    ./dev python -m promptmux.benchmarks.prompt_science_study            # about 20 min on a quiet 2-core CPU
    ./dev python -m promptmux.benchmarks.prompt_science_study --quick    # a smoke run, about 1 min
    ./dev python -m promptmux.benchmarks.prompt_science_study --report-only   # redraw from study.json

What it does, on the frozen embedded model (4.8M parameters, byte-level T5):
1. a library of source prompts, one per pretraining task, each tuned briefly from its own
   pretraining prefix (these tasks are the model's own: the prompts reach high accuracy fast);
2. task embeddings (the production recipe, prompts/task_embedding.py) of every source and of
   four targets held out of pretraining, at several data seeds;
3. retrieval: each target's embedding ranks the sources (mean-token and flattened cosine);
4. transfer: each target is tuned for a fixed small budget at every seed from every source,
   from the vocabulary init, from the retrieved top-3 weighted average (the `--init retrieved`
   path) and from the best of the top 3 after a short probe (`--init best-of-k`), with
   learning curves;
5. factorized prompts: 3 "languages" (final character maps) x 4 "tasks" (arrangements);
   9 pairs trained jointly as [language; task], 3 pairs held out and composed at test time,
   from text inits at every seed and, as an ablation, from the vocabulary init at one seed.

Steps 4 and 5 are independent training runs; they run in `--workers` processes (one per
core by default), each loading the model once.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import statistics
import time
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from promptmux.prompts.factorized import FactorizedConfig, evaluate_pairs, train_factorized
from promptmux.prompts.records import PromptMeta
from promptmux.prompts.retrieval import Match
from promptmux.prompts.synthetic_tasks import PRETRAINING_TASKS, pair_examples, task_examples
from promptmux.prompts.task_embedding import EmbeddingRecipe, compute_task_embedding, shared_init, similarity_matrix
from promptmux.prompts.transfer import best_of_k, weighted_average
from promptmux.prompts.tuning import TrainConfig, evaluate, initial_prompt, tune_prompt
from promptmux.serving.config import ModelConfig
from promptmux.serving.model.loading import LoadedModel, load_model

from .prompt_science_report import write_report

SOURCES = ("copy", "reverse", "upper", "sort", "rotate", "caesar", "duplicate")
TARGETS = ("rotate-caesar", "duplicate-upper", "reverse-upper", "sort-caesar")
LANGUAGES = ("plain", "upper", "caesar")
ARRANGEMENTS = ("reverse", "rotate", "duplicate", "sort")
HELD_OUT_PAIRS = (("plain", "sort"), ("upper", "rotate"), ("caesar", "duplicate"))
# Each factorized prompt starts from the pretraining prefix that names its part: "plain"
# keeps the string as it is, which the model calls "copy".
FACTORIZED_INIT_TEXTS = {"plain": "copy: ", "upper": "upper: ", "caesar": "caesar: ", "reverse": "reverse: ",
                         "rotate": "rotate: ", "duplicate": "duplicate: ", "sort": "sort: "}
PROMPT_LENGTH = 12


@dataclass(frozen=True)
class Sizes:
    seeds: int = 3
    source_steps: int = 10  # from the task's own pretraining prefix: already near its best
    train_examples: int = 600
    dev_examples: int = 40
    transfer_steps: int = 60
    transfer_batch: int = 16
    transfer_lr: float = 0.05
    transfer_warmup: int = 6  # without it, Adam at 0.05 spiked the loss in some runs
    transfer_schedule: str = "constant"  # a cosine decay left too little of 60 steps to learn in
    curve_points: tuple[int, ...] = (15, 30, 45, 60)
    probe_steps: int = 10  # per source, for the best-of-k init (not counted in the budget)
    factorized_steps: int = 1000
    factorized_batch: int = 32
    factorized_lr: float = 0.05
    factorized_warmup: int = 30
    factorized_rows: int = 12  # rows of each language and each task prompt
    factorized_examples: int = 400  # per trained pair
    factorized_vocab_ablation: bool = True  # one more run, seed 0, from the vocabulary init


QUICK = Sizes(seeds=2, source_steps=2, train_examples=64, dev_examples=6, transfer_steps=2, transfer_batch=8,
              probe_steps=1,
              transfer_warmup=0, curve_points=(1, 2), factorized_steps=2, factorized_warmup=0,
              factorized_examples=32, factorized_vocab_ablation=False)


class Progress:
    """One bar over the whole study, advanced in training steps (the unit of cost)."""

    def __init__(self, total: int) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc="prompt-science study", unit="step", dynamic_ncols=True)

    def advance(self, steps: int, label: str) -> None:
        self.bar.set_postfix_str(label)
        self.bar.update(steps)


def study_data(task: str, seed: int, sizes: Sizes):
    # Every task and seed draws its own strings: tasks that shared strings would look alike
    # for that reason alone.
    base = zlib.crc32(task.encode()) % 100_000 * 10 + seed
    train = task_examples(task, sizes.train_examples, seed=base)
    dev = task_examples(task, sizes.dev_examples, seed=base + 5_000_000, exclude=[e.input for e in train])
    return train, dev


# ------------------------------------------------------------------ one training run each
def tune_curve(loaded: LoadedModel, task: str, prompt: torch.Tensor, seed: int, sizes: Sizes) -> list:
    """Tune `task` from `prompt` for the fixed budget: [(step, exact match, dev loss)], step 0 first."""
    train, dev = study_data(task, seed, sizes)
    config = TrainConfig(tenant="study", task=task, prompt_length=PROMPT_LENGTH, optimizer="adam",
                         lr=sizes.transfer_lr, schedule=sizes.transfer_schedule, warmup_steps=sizes.transfer_warmup,
                         steps=sizes.transfer_steps, batch_size=sizes.transfer_batch,
                         eval_every=sizes.curve_points[0], max_new_tokens=40, seed=seed, progress=False)
    start, start_loss, _ = evaluate(loaded.model, loaded.tokenizer, prompt, dev, max_new_tokens=40)
    result = tune_prompt(loaded.model, loaded.tokenizer, train, dev, config, init=prompt)
    return [(0, start, start_loss)] + [(p.step, p.exact_match, p.loss) for p in result.history
                                       if p.step in sizes.curve_points]


def transfer_job(loaded: LoadedModel, target: str, seed: int, sources: dict[str, torch.Tensor],
                 ranked: list[tuple[str, float]], sizes: Sizes) -> dict:
    """One target at one seed from every source, the vocabulary init and the two retrieval
    inits over the `ranked` top sources: their similarity-weighted average, and best-of-k."""
    vocab, _ = initial_prompt(loaded.model, loaded.tokenizer, TrainConfig(
        tenant="study", task=target, init="vocab", prompt_length=PROMPT_LENGTH, seed=seed))
    matches = [(Match(_meta(name), score), sources[name]) for name, score in ranked]
    train, dev = study_data(target, seed, sizes)
    # best-of-k picks on its own fresh strings, so the dev strings still measure only the result
    probe_dev = task_examples(target, sizes.dev_examples, seed=zlib.crc32(target.encode()) + 9_000_000 + seed,
                              exclude=[e.input for e in (*train, *dev)])
    probe_config = TrainConfig(tenant="study", task=target, prompt_length=PROMPT_LENGTH, optimizer="adam",
                               lr=sizes.transfer_lr, warmup_steps=sizes.transfer_warmup,
                               batch_size=sizes.transfer_batch, max_new_tokens=40, seed=seed, progress=False)
    chosen = best_of_k(loaded.model, loaded.tokenizer, train, probe_dev, matches, probe_config, sizes.probe_steps)
    inits = {**sources, "vocab": vocab, "retrieved": weighted_average(matches).prompt, "best-of-k": chosen.prompt}
    curves = {name: tune_curve(loaded, target, prompt, seed, sizes) for name, prompt in inits.items()}
    curves["best-of-k chose"] = chosen.metadata["chosen"]["task"]
    return curves


def factorized_pairs(count_seed: int, count: int, which) -> dict:
    return {(lang, arr): pair_examples(lang, arr, count, seed=count_seed * 100 + i) for i, (lang, arr) in enumerate(which)}


def factorized_job(loaded: LoadedModel, seed: int, init: str, sizes: Sizes) -> dict:
    """Train language and task prompts jointly on 9 pairs; score all 12 pairs composed."""
    all_pairs = [(lang, arr) for lang in LANGUAGES for arr in ARRANGEMENTS]
    trained_pairs = [p for p in all_pairs if p not in HELD_OUT_PAIRS]
    config = FactorizedConfig(tenant="study", language_length=sizes.factorized_rows,
                              task_length=sizes.factorized_rows, steps=sizes.factorized_steps,
                              batch_size=sizes.factorized_batch, lr=sizes.factorized_lr, schedule="cosine",
                              warmup_steps=sizes.factorized_warmup, eval_every=sizes.factorized_steps,
                              max_dev_examples=sizes.dev_examples, seed=seed, progress=False,
                              init_texts=FACTORIZED_INIT_TEXTS if init == "text" else {})
    result = train_factorized(loaded.model, loaded.tokenizer,
                              factorized_pairs(seed + 1, sizes.factorized_examples, trained_pairs), {}, config)
    dev = factorized_pairs(seed + 50, sizes.dev_examples, all_pairs)
    scores = evaluate_pairs(loaded.model, loaded.tokenizer, result, dev, config)
    return {f"{lang}+{arr}": em for (lang, arr), em in scores.items()}


def prefix_ceilings(loaded: LoadedModel, sizes: Sizes) -> dict:
    """Exact match of the frozen model given the pretraining prefix of each pair it was
    pretrained on: how well the model itself does the pair, whatever the prompt."""
    ceilings = {}
    for lang in LANGUAGES:
        for arr in ARRANGEMENTS:
            task = arr if lang == "plain" else f"{arr}-{lang}"
            if task in PRETRAINING_TASKS:
                dev = task_examples(task, 4 * sizes.dev_examples, seed=7, with_prefix=True)
                ceilings[f"{lang}+{arr}"] = evaluate(loaded.model, loaded.tokenizer, None, dev, max_new_tokens=40)[0]
    return ceilings


# ------------------------------------------------------------------ the worker processes
_worker_model: LoadedModel | None = None  # one per worker process, loaded by its initializer


def _load_worker(threads: int) -> None:
    global _worker_model
    torch.set_num_threads(threads)
    _worker_model = load_model(ModelConfig(source="embedded"))


def _in_worker(job: Callable, *args):
    return job(_worker_model, *args)


class Jobs:
    """Runs (label, steps, job, args) in worker processes, or inline when `workers` is 1."""

    def __init__(self, workers: int, threads: int, loaded: LoadedModel) -> None:
        self.workers, self.threads, self.loaded = workers, threads, loaded

    def run(self, jobs: list[tuple[str, int, Callable, tuple]], progress: Progress) -> dict:
        results = {}
        if self.workers == 1:
            for label, steps, job, args in jobs:
                results[label] = job(self.loaded, *args)
                progress.advance(steps, label)
            return results
        context = multiprocessing.get_context("spawn")  # forked torch thread pools can deadlock
        with ProcessPoolExecutor(self.workers, mp_context=context, initializer=_load_worker,
                                 initargs=(self.threads,)) as pool:
            futures = {pool.submit(_in_worker, job, *args): (label, steps) for label, steps, job, args in jobs}
            for future in as_completed(futures):
                label, steps = futures[future]
                results[label] = future.result()
                progress.advance(steps, label)
        return results


# ------------------------------------------------------------------ the study
def run(out: Path, sizes: Sizes, workers: int, threads: int) -> dict:
    torch.set_num_threads(threads * workers)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_model(ModelConfig(source="embedded"))
    model, tokenizer = loaded.model, loaded.tokenizer
    recipe = EmbeddingRecipe() if sizes != QUICK else EmbeddingRecipe(steps=2, batch_size=8)
    seeds = list(range(sizes.seeds))
    transfer_steps = (len(SOURCES) + 3) * sizes.transfer_steps + 3 * sizes.probe_steps
    factorized_runs = [(seed, "text") for seed in seeds] + ([(0, "vocab")] if sizes.factorized_vocab_ablation else [])
    total = (len(SOURCES) * sizes.source_steps + (2 * len(SOURCES) + len(TARGETS) * sizes.seeds) * recipe.steps
             + len(TARGETS) * len(seeds) * transfer_steps + len(factorized_runs) * sizes.factorized_steps)
    progress = Progress(total)
    started = time.perf_counter()

    # 1. the source library
    sources, source_scores = {}, {}
    for task in SOURCES:
        train, dev = study_data(task, 0, sizes)
        config = TrainConfig(tenant="study", task=task, prompt_length=PROMPT_LENGTH, init="text",
                             init_text=task.replace("-", " ") + ": ", optimizer="adam", lr=sizes.transfer_lr,
                             steps=sizes.source_steps, batch_size=16, eval_every=sizes.source_steps,
                             max_new_tokens=40, progress=False)
        result = tune_prompt(model, tokenizer, train, dev, config)
        sources[task], source_scores[task] = result.prompt, result.best.exact_match
        progress.advance(sizes.source_steps, f"source {task}")

    # 2. task embeddings at every seed
    init = shared_init(model, tokenizer, recipe)
    embeddings: dict[tuple[str, int], torch.Tensor] = {}
    for task in (*SOURCES, *TARGETS):
        # the library needs one seed of each source, plus a second to check self-retrieval
        for seed in (seeds if task in TARGETS else seeds[:2]):
            train, _ = study_data(task, seed, sizes)
            seeded = dataclasses.replace(recipe, data_seed=seed)
            embeddings[(task, seed)] = compute_task_embedding(model, tokenizer, train, seeded,
                                                              model_name=loaded.name, init=init).tensor
            progress.advance(recipe.steps, f"embed {task}/{seed}")

    # 3. similarity: self-retrieval of a second seed, and each target's ranking of the sources
    similarity = {}
    for method in ("mean-token", "flattened"):
        keys = list(embeddings)
        matrix = similarity_matrix([embeddings[k] for k in keys], init, method)
        sim = {(a, b): float(matrix[i, j]) for i, a in enumerate(keys) for j, b in enumerate(keys)}
        self_first = 0
        same, different = [], []
        for task in (*SOURCES, *TARGETS):
            # the library holds every task's seed-0 embedding; the query is another seed
            ranked = sorted((*SOURCES, *TARGETS), key=lambda other: -sim[((task, 1), (other, 0))])
            self_first += ranked[0] == task
            same.append(sim[((task, 1), (task, 0))])
            different.extend(sim[((task, 1), (other, 0))] for other in (*SOURCES, *TARGETS) if other != task)
        similarity[method] = {"sim": sim, "self_first": self_first, "queries": len((*SOURCES, *TARGETS)),
                              "same_task": statistics.fmean(same), "different_task": statistics.fmean(different)}

    # 4 and 5. transfer at a fixed small budget, and factorized prompts, in parallel
    sim = similarity[recipe.similarity]["sim"]
    retrieved_sources, jobs = {}, []
    for target in TARGETS:
        for seed in seeds:
            ranked = sorted(SOURCES, key=lambda s: -sim[((target, seed), (s, 0))])[:3]
            retrieved_sources[(target, seed)] = [(s, round(sim[((target, seed), (s, 0))], 3)) for s in ranked]
            jobs.append((f"transfer {target}/{seed}", transfer_steps, transfer_job,
                         (target, seed, sources, [(s, sim[((target, seed), (s, 0))]) for s in ranked], sizes)))
    # the longest runs first, so no worker idles at the end
    jobs[:0] = [(f"factorized {init_name}/{seed}", sizes.factorized_steps, factorized_job, (seed, init_name, sizes))
                for seed, init_name in factorized_runs]
    results = Jobs(workers, threads, loaded).run(jobs, progress)
    progress.bar.close()

    transfer = {target: {"from_source": {s: [results[f"transfer {target}/{seed}"][s] for seed in seeds]
                                         for s in SOURCES},
                         "vocab": [results[f"transfer {target}/{seed}"]["vocab"] for seed in seeds],
                         "retrieved": [results[f"transfer {target}/{seed}"]["retrieved"] for seed in seeds],
                         "best_of_k": [results[f"transfer {target}/{seed}"]["best-of-k"] for seed in seeds],
                         "best_of_k_chose": [results[f"transfer {target}/{seed}"]["best-of-k chose"] for seed in seeds],
                         "retrieved_sources": [retrieved_sources[(target, seed)] for seed in seeds]}
                for target in TARGETS}
    record = {"sizes": dataclasses.asdict(sizes), "recipe": dataclasses.asdict(recipe), "workers": workers,
              "threads": threads, "cpus": os.cpu_count(), "seconds": time.perf_counter() - started,
              "source_scores": source_scores,
              "similarity": {m: {**{k: v for k, v in s.items() if k != "sim"},
                                 "pairs": [[f"{a[0]}/{a[1]}", f"{b[0]}/{b[1]}", v] for (a, b), v in s["sim"].items()]}
                             for m, s in similarity.items()},
              "transfer": transfer,
              "factorized": [results[f"factorized text/{seed}"] for seed in seeds],
              "factorized_vocab": [results[f"factorized vocab/{seed}"] for seed, name in factorized_runs
                                   if name == "vocab"],
              "factorized_init_texts": FACTORIZED_INIT_TEXTS,
              "factorized_grid": {"languages": LANGUAGES, "arrangements": ARRANGEMENTS, "held_out": HELD_OUT_PAIRS},
              "prefix_ceilings": prefix_ceilings(loaded, sizes)}
    (out / "study.json").write_text(json.dumps(record))
    write_report(out, record)
    return record


def _meta(task: str) -> PromptMeta:
    return PromptMeta(tenant="study", task=task, version=1, content_hash="", d_model=0, length=PROMPT_LENGTH,
                      dtype="float32", created_at=0.0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/prompt-science"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the pipeline, proves nothing")
    parser.add_argument("--seeds", type=int, help="seeds (default 3)")
    parser.add_argument("--workers", type=int, default=max(1, min(2, os.cpu_count() or 1)),
                        help="processes for the training runs (default: one per core, at most 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--report-only", action="store_true", help="redraw the report from OUT/study.json")
    args = parser.parse_args(argv)
    if args.report_only:
        record = json.loads((args.out / "study.json").read_text())
        write_report(args.out, record)
        print(f"report: {args.out / 'report.md'}  summary: {json.dumps(record['summary'])}")
        return 0
    sizes = QUICK if args.quick else Sizes()
    if args.seeds:
        if args.seeds < 2:
            parser.error(f"--seeds {args.seeds}: the study needs at least 2 (a second seed checks self-retrieval)")
        sizes = dataclasses.replace(sizes, seeds=args.seeds)
    if args.workers < 1 or args.threads < 1:
        parser.error("--workers and --threads must be >= 1")
    record = run(args.out, sizes, args.workers, args.threads)
    print(f"report: {args.out / 'report.md'}  summary: {json.dumps(record['summary'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
