"""The prompt-science study on the embedded model: task embeddings, SPoT retrieval and
transfer, factorized prompts. Writes a markdown report with plots.

    ./dev python -m promptmux.benchmarks.prompt_science_study            # about 26 min, one thread of a busy 2-core CPU
    ./dev python -m promptmux.benchmarks.prompt_science_study --quick    # a smoke run, about 1 min

What it does, on the frozen embedded model (4.8M parameters, byte-level T5):
1. a library of source prompts, one per pretraining task, each tuned briefly from its own
   pretraining prefix (these tasks are the model's own: the prompts reach high accuracy fast);
2. task embeddings (the production recipe, prompts/task_embedding.py) of every source and of
   four targets held out of pretraining, at several data seeds;
3. retrieval: each target's embedding ranks the sources (mean-token and flattened cosine);
4. transfer: each target is tuned for a fixed small budget from every source, from the
   vocabulary init and from the retrieved top-3 weighted average (the `--init retrieved`
   path), with learning curves;
5. factorized prompts: 3 "languages" (final character maps) x 4 "tasks" (arrangements);
   9 pairs trained jointly as [language; task], 3 pairs held out and composed at test time.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from promptmux.prompts.factorized import FactorizedConfig, evaluate_pairs, train_factorized
from promptmux.prompts.records import PromptMeta
from promptmux.prompts.retrieval import Match
from promptmux.prompts.synthetic_tasks import pair_examples, task_examples
from promptmux.prompts.task_embedding import EmbeddingRecipe, compute_task_embedding, shared_init, similarity_matrix
from promptmux.prompts.transfer import weighted_average
from promptmux.prompts.tuning import TrainConfig, evaluate, initial_prompt, tune_prompt
from promptmux.serving.config import ModelConfig
from promptmux.serving.model_loading import load_model

SOURCES = ("copy", "reverse", "upper", "sort", "rotate", "caesar", "duplicate")
TARGETS = ("rotate-caesar", "duplicate-upper", "reverse-upper", "sort-caesar")
LANGUAGES = ("plain", "upper", "caesar")
ARRANGEMENTS = ("reverse", "rotate", "duplicate", "sort")
HELD_OUT_PAIRS = (("plain", "sort"), ("upper", "rotate"), ("caesar", "duplicate"))
PROMPT_LENGTH = 12


@dataclass(frozen=True)
class Sizes:
    seeds: int = 3
    source_steps: int = 10  # from the task's own pretraining prefix: already near its best
    train_examples: int = 600
    dev_examples: int = 40
    transfer_steps: int = 30
    transfer_batch: int = 16
    transfer_lr: float = 0.05
    curve_points: tuple[int, ...] = (10, 20, 30)
    factorized_steps: int = 400
    factorized_batch: int = 16
    factorized_lr: float = 0.05
    factorized_rows: int = 12  # 6 language + 6 task rows, as the paper's 50 + 50 scaled down
    factorized_examples: int = 400


QUICK = Sizes(seeds=2, source_steps=2, train_examples=64, dev_examples=6, transfer_steps=2, transfer_batch=8,
              curve_points=(1, 2), factorized_steps=2, factorized_examples=32)


class Progress:
    """One bar over the whole study, advanced in training steps (the unit of cost)."""

    def __init__(self, total: int) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc="prompt-science study", unit="step", dynamic_ncols=True)

    def advance(self, steps: int, label: str) -> None:
        self.bar.set_postfix_str(label)
        self.bar.update(steps)


def spearman(xs: list[float], ys: list[float]) -> float:
    def ranks(values):
        order = sorted(range(len(values)), key=lambda i: values[i])
        out = [0.0] * len(values)
        for rank, i in enumerate(order):
            out[i] = float(rank)
        return out

    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return cov / var if var else float("nan")


def mean_sd(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def run(out: Path, sizes: Sizes, threads: int, skip_factorized: bool = False) -> dict:
    torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_model(ModelConfig(source="embedded"))
    model, tokenizer = loaded.model, loaded.tokenizer
    recipe = EmbeddingRecipe() if sizes != QUICK else EmbeddingRecipe(steps=2, batch_size=8)
    seeds = list(range(sizes.seeds))
    n_transfer = len(TARGETS) * (len(SOURCES) + 2 * sizes.seeds) * sizes.transfer_steps
    total = (len(SOURCES) * sizes.source_steps + (2 * len(SOURCES) + len(TARGETS) * sizes.seeds) * recipe.steps
             + n_transfer + (0 if skip_factorized else sizes.seeds * sizes.factorized_steps))
    progress = Progress(total)
    started = time.perf_counter()

    def data(task: str, seed: int):
        # Every task and seed draws its own strings: tasks that shared strings would look alike
        # for that reason alone.
        base = zlib.crc32(task.encode()) % 100_000 * 10 + seed
        train = task_examples(task, sizes.train_examples, seed=base)
        dev = task_examples(task, sizes.dev_examples, seed=base + 5_000_000, exclude=[e.input for e in train])
        return train, dev

    # 1. the source library
    sources, source_scores = {}, {}
    for task in SOURCES:
        train, dev = data(task, 0)
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
            train, _ = data(task, seed)
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
            for seed in seeds[1:2]:
                # the library holds every task's seed-0 embedding; the query is another seed
                ranked = sorted((*SOURCES, *TARGETS), key=lambda other: -sim[((task, seed), (other, 0))])
                self_first += ranked[0] == task
                same.append(sim[((task, seed), (task, 0))])
                different.extend(sim[((task, seed), (other, 0))] for other in (*SOURCES, *TARGETS) if other != task)
        similarity[method] = {"sim": sim, "self_first": self_first,
                              "queries": len((*SOURCES, *TARGETS)),
                              "same_task": statistics.fmean(same), "different_task": statistics.fmean(different)}

    # 4. transfer at a fixed small budget
    def tune_from(task: str, prompt: torch.Tensor, seed: int):
        train, dev = data(task, seed)
        config = TrainConfig(tenant="study", task=task, prompt_length=PROMPT_LENGTH, optimizer="adam",
                             lr=sizes.transfer_lr, steps=sizes.transfer_steps, batch_size=sizes.transfer_batch,
                             eval_every=sizes.curve_points[0], max_new_tokens=40, seed=seed, progress=False)
        start, start_loss, _ = evaluate(model, tokenizer, prompt, dev, max_new_tokens=40)
        result = tune_prompt(model, tokenizer, train, dev, config, init=prompt)
        return [(0, start, start_loss)] + [(p.step, p.exact_match, p.loss) for p in result.history
                                           if p.step in sizes.curve_points]

    def area(curve):  # mean exact match over the curve's points: area under the curve, normalised
        return statistics.fmean(em for _, em in curve)

    transfer = {}
    for target in TARGETS:
        entry = {"from_source": {}, "vocab": [], "retrieved": [], "retrieved_sources": []}
        for source in SOURCES:
            entry["from_source"][source] = tune_from(target, sources[source], 0)
            progress.advance(sizes.transfer_steps, f"{target} <- {source}")
        sim = similarity[recipe.similarity]["sim"]
        for seed in seeds:
            vocab_init, _ = initial_prompt(model, tokenizer, TrainConfig(tenant="s", task=target, init="vocab",
                                                                         prompt_length=PROMPT_LENGTH, seed=seed))
            entry["vocab"].append(tune_from(target, vocab_init, seed))
            progress.advance(sizes.transfer_steps, f"{target} vocab/{seed}")
            ranked = sorted(SOURCES, key=lambda s: -sim[((target, seed), (s, 0))])[:3]
            matches = [(Match(_meta(s), sim[((target, seed), (s, 0))]), sources[s]) for s in ranked]
            entry["retrieved_sources"].append([(s, round(sim[((target, seed), (s, 0))], 3)) for s in ranked])
            entry["retrieved"].append(tune_from(target, weighted_average(matches).prompt, seed))
            progress.advance(sizes.transfer_steps, f"{target} retrieved/{seed}")
        transfer[target] = entry

    # 5. factorized prompts
    factorized = [] if skip_factorized else run_factorized(model, tokenizer, sizes, seeds, progress)
    previous = out / "study.json"
    progress.bar.close()
    record = {"sizes": dataclasses.asdict(sizes), "recipe": dataclasses.asdict(recipe), "threads": threads,
              "seconds": time.perf_counter() - started, "source_scores": source_scores,
              "similarity": {m: {**{k: v for k, v in s.items() if k != "sim"},
                                 "pairs": [[f"{a[0]}/{a[1]}", f"{b[0]}/{b[1]}", v] for (a, b), v in s["sim"].items()]}
                             for m, s in similarity.items()},
              "transfer": transfer,
              "factorized": [{f"{lang}+{arr}": em for (lang, arr), em in run.items()} for run in factorized]}
    if skip_factorized:  # keep the factorized results of the previous run in OUT
        old = json.loads(previous.read_text())
        record["factorized"], record["factorized_sizes"] = old["factorized"], old.get("factorized_sizes", old["sizes"])
    else:
        record["factorized_sizes"] = dataclasses.asdict(sizes)
    (out / "study.json").write_text(json.dumps(record))
    write_report(out, record)
    return record



def run_factorized(model, tokenizer, sizes: Sizes, seeds: list[int], progress: "Progress") -> list[dict]:
    """Train language and task prompts jointly on 9 pairs; score all 12 pairs composed."""
    def pairs(count_seed: int, count: int, which):
        return {(lang, arr): pair_examples(lang, arr, count, seed=count_seed * 100 + i)
                for i, (lang, arr) in enumerate(which)}

    all_pairs = [(lang, arr) for lang in LANGUAGES for arr in ARRANGEMENTS]
    trained_pairs = [p for p in all_pairs if p not in HELD_OUT_PAIRS]
    factorized = []
    for seed in seeds:
        config = FactorizedConfig(tenant="study", language_length=sizes.factorized_rows // 2,
                                  task_length=sizes.factorized_rows // 2, steps=sizes.factorized_steps,
                                  batch_size=sizes.factorized_batch, lr=sizes.factorized_lr,
                                  eval_every=sizes.factorized_steps, max_dev_examples=sizes.dev_examples,
                                  seed=seed, progress=False)
        result = train_factorized(model, tokenizer, pairs(seed + 1, sizes.factorized_examples, trained_pairs), {},
                                  config)
        dev = pairs(seed + 50, sizes.dev_examples, all_pairs)
        factorized.append(evaluate_pairs(model, tokenizer, result, dev, config))
        progress.advance(sizes.factorized_steps, f"factorized/{seed}")
    return factorized


def factorized_only(out: Path, sizes: Sizes, threads: int) -> None:
    """Rerun the factorized part alone into OUT/factorized.json (merged by --report-only)."""
    torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_model(ModelConfig(source="embedded"))
    progress = Progress(sizes.seeds * sizes.factorized_steps)
    runs = run_factorized(loaded.model, loaded.tokenizer, sizes, list(range(sizes.seeds)), progress)
    progress.bar.close()
    (out / "factorized.json").write_text(json.dumps({
        "factorized": [{f"{lang}+{arr}": em for (lang, arr), em in run.items()} for run in runs],
        "factorized_sizes": dataclasses.asdict(sizes)}))

def _meta(task: str) -> PromptMeta:
    return PromptMeta(tenant="study", task=task, version=1, content_hash="", d_model=0, length=PROMPT_LENGTH,
                      dtype="float32", created_at=0.0)


# ---------------------------------------------------------------------- report
def _similarities(record: dict, method: str) -> dict:
    def key(text: str):
        task, seed = text.rsplit("/", 1)
        return task, int(seed)

    return {(key(a), key(b)): v for a, b, v in record["similarity"][method]["pairs"]}


def write_report(out: Path, record: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    recipe = EmbeddingRecipe(**record["recipe"])
    seeds = list(range(record["sizes"]["seeds"]))
    method = recipe.similarity
    sim = _similarities(record, method)
    tasks = (*SOURCES, *TARGETS)
    lines = ["# Prompt science on the embedded model", "",
             f"`benchmarks/prompt_science_study.py`, {len(seeds)} seeds, {record['threads']} torch thread(s), "
             f"{record['seconds'] / 60:.1f} min on a 2-core CPU shared with other jobs.", "",
             f"Task-embedding recipe (production default, `task_embedding` config): {recipe.steps} SGD steps at lr "
             f"{recipe.lr}, batch {recipe.batch_size}, {recipe.prompt_length} rows, from one shared init (the text "
             f"prompt {recipe.init_text!r}); similarity: {method} cosine of the displacement from that init.", ""]

    # heat map (seed 0 of every task)
    figure, axis = plt.subplots(figsize=(7.5, 6.5), dpi=110)
    grid = [[sim[((a, 0), (b, 0 if a != b else min(1, len(seeds) - 1)))] for b in tasks] for a in tasks]
    image = axis.imshow(grid, cmap="RdBu_r", vmin=-1, vmax=1)
    axis.set_xticks(range(len(tasks)), tasks, rotation=60, ha="right")
    axis.set_yticks(range(len(tasks)), tasks)
    for i in range(len(tasks)):
        for j in range(len(tasks)):
            axis.text(j, i, f"{grid[i][j]:.2f}", ha="center", va="center", fontsize=6)
    axis.set_title(f"task-embedding similarity ({method}); diagonal: seed 0 vs seed 1")
    figure.colorbar(image, ax=axis, shrink=0.8)
    figure.tight_layout()
    figure.savefig(plots / "similarity-heatmap.png")
    plt.close(figure)

    lines += ["## Task embeddings", "", "![similarity heat map](plots/similarity-heatmap.png)", "",
              "| similarity | second seed ranked first (of all tasks) | mean same-task cosine | mean other-task cosine |",
              "|---|---:|---:|---:|"]
    for name, stats in record["similarity"].items():
        lines.append(f"| {name} | {stats['self_first']} / {stats['queries']} | {stats['same_task']:.2f} | "
                     f"{stats['different_task']:.2f} |")
    lines.append("")

    # retrieval and transfer. At a small budget exact match is often still 0 everywhere, so a
    # source's gain is also measured in dev loss (lower is better), which moves from the first step.
    sizes = record["sizes"]
    top3_hits, beats, beats_loss, gains_x, gains_y = 0, [], [], [], []
    lines += ["## Retrieval and transfer", "",
              f"Budget: {sizes['transfer_steps']} Adam steps (lr {sizes['transfer_lr']}, batch "
              f"{sizes['transfer_batch']}), the same for every init; dev exact match (EM) and dev loss on "
              f"{sizes['dev_examples']} fresh strings. The best source is the one with the highest EM at the budget, "
              "then the lowest dev loss; its gain is the dev-loss drop against the vocabulary init (mean of seeds).",
              "", "| target | best source (EM, loss) | retrieved top 3 (seed 0) | best in top 3 | vocab init EM | "
              "retrieved init EM | vocab init loss | retrieved init loss | Spearman(sim, loss gain) |",
              "|---|---|---|---|---:|---:|---:|---:|---:|"]
    figure, axis = plt.subplots(figsize=(7, 4.5), dpi=110)
    for target, entry in record["transfer"].items():
        vocab_em = [c[-1][1] for c in entry["vocab"]]
        retrieved_em = [c[-1][1] for c in entry["retrieved"]]
        vocab_loss = [c[-1][2] for c in entry["vocab"]]
        retrieved_loss = [c[-1][2] for c in entry["retrieved"]]
        final = {s: (c[-1][1], c[-1][2]) for s, c in entry["from_source"].items()}
        best = max(final, key=lambda s: (final[s][0], -final[s][1]))
        tops = [[s for s, _ in ranked] for ranked in entry["retrieved_sources"]]
        hit = best in tops[0]
        top3_hits += hit
        xs = [sim[((target, 0), (s, 0))] for s in SOURCES]
        ys = [statistics.fmean(vocab_loss) - final[s][1] for s in SOURCES]
        gains_x += xs
        gains_y += ys
        axis.scatter(xs, ys, label=target, s=18)
        beats.append(statistics.fmean(retrieved_em) - statistics.fmean(vocab_em))
        beats_loss.append(statistics.fmean(vocab_loss) - statistics.fmean(retrieved_loss))
        seeds_hit = sum(best in top for top in tops)
        lines.append(f"| {target} | {best} ({final[best][0]:.2f}, {final[best][1]:.2f}) | {', '.join(tops[0])} | "
                     f"{'yes' if hit else 'no'} ({seeds_hit}/{len(tops)} seeds) | {mean_sd(vocab_em)} | "
                     f"{mean_sd(retrieved_em)} | {mean_sd(vocab_loss)} | {mean_sd(retrieved_loss)} | "
                     f"{spearman(xs, ys):.2f} |")
    axis.axhline(0, color="grey", linewidth=0.8)
    axis.set_xlabel(f"task-embedding similarity ({method})")
    axis.set_ylabel("dev-loss drop vs vocab init at the budget")
    axis.set_title("transfer gain against similarity (each point: one source)")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(plots / "transfer-gain-vs-similarity.png")
    plt.close(figure)
    pooled = spearman(gains_x, gains_y)
    em_wins = sum(d >= 0.10 for d in beats)
    lines += ["", f"Best source in the retrieved top 3: **{top3_hits} of {len(TARGETS)}** targets (target >= 3). "
              f"Retrieved init beats the vocabulary init by >= 0.10 exact match on **{em_wins} of {len(TARGETS)}** "
              f"targets (target >= 2); it has the lower dev loss on {sum(d > 0 for d in beats_loss)} of "
              f"{len(TARGETS)} (mean drop {statistics.fmean(beats_loss):.2f}). Spearman of similarity and loss gain, "
              f"pooled over targets and sources: {pooled:.2f}.", "",
              "![transfer gain against similarity](plots/transfer-gain-vs-similarity.png)", ""]
    record["summary"] = {"best_in_top3": top3_hits, "retrieved_beats_vocab_by_0.10": em_wins,
                         "retrieved_lower_loss": sum(d > 0 for d in beats_loss), "spearman_pooled": pooled,
                         "self_first": {m: f"{v['self_first']}/{v['queries']}" for m, v in record["similarity"].items()}}

    # learning curves (dev loss: it moves where exact match is still flat)
    figure, axes = plt.subplots(2, len(TARGETS), figsize=(3.2 * len(TARGETS), 5.6), dpi=110, sharex=True)
    for column, (target, entry) in enumerate(record["transfer"].items()):
        best = max(entry["from_source"], key=lambda s: (entry["from_source"][s][-1][1], -entry["from_source"][s][-1][2]))
        for row, (index, label) in enumerate(((2, "dev loss"), (1, "dev exact match"))):
            axis = axes[row][column]
            for name, curves, color in (("vocab init", entry["vocab"], "tab:grey"),
                                        ("retrieved top-3", entry["retrieved"], "tab:green")):
                steps = [p[0] for p in curves[0]]
                values = [[c[i][index] for c in curves] for i in range(len(steps))]
                means = [statistics.fmean(v) for v in values]
                spreads = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
                axis.plot(steps, means, "o-", color=color, label=name, markersize=3)
                axis.fill_between(steps, [m - s for m, s in zip(means, spreads)],
                                  [m + s for m, s in zip(means, spreads)], color=color, alpha=0.2)
            curve = entry["from_source"][best]
            axis.plot([p[0] for p in curve], [p[index] for p in curve], "s--", color="tab:blue", markersize=3,
                      label=f"best source ({best})")
            if row == 0:
                axis.set_title(target, fontsize=9)
                axis.legend(fontsize=6)
            else:
                axis.set_xlabel("step")
            if column == 0:
                axis.set_ylabel(f"{label} (mean ± sd)")
    figure.tight_layout()
    figure.savefig(plots / "learning-curves.png")
    plt.close(figure)
    lines += ["![learning curves](plots/learning-curves.png)", ""]

    # factorized grid
    runs = record["factorized"]
    figure, axis = plt.subplots(figsize=(6, 3.4), dpi=110)
    means = [[statistics.fmean(r[f"{lang}+{arr}"] for r in runs) for arr in ARRANGEMENTS] for lang in LANGUAGES]
    image = axis.imshow(means, cmap="viridis", vmin=0, vmax=1)
    axis.set_xticks(range(len(ARRANGEMENTS)), ARRANGEMENTS)
    axis.set_yticks(range(len(LANGUAGES)), LANGUAGES)
    for i, lang in enumerate(LANGUAGES):
        for j, arr in enumerate(ARRANGEMENTS):
            unseen = (lang, arr) in HELD_OUT_PAIRS
            axis.text(j, i, f"{means[i][j]:.2f}" + ("\nunseen" if unseen else ""), ha="center", va="center",
                      color="white" if means[i][j] < 0.6 else "black", fontsize=8)
    axis.set_xlabel("task prompt (arrangement)")
    axis.set_ylabel("language prompt (map)")
    axis.set_title("factorized [language; task]: dev exact match")
    figure.colorbar(image, ax=axis)
    figure.tight_layout()
    figure.savefig(plots / "factorized-grid.png")
    plt.close(figure)
    trained = [p for p in ((l, a) for l in LANGUAGES for a in ARRANGEMENTS) if p not in HELD_OUT_PAIRS]
    trained_means = [statistics.fmean(r[f"{l}+{a}"] for r in runs) for l, a in trained]
    fsizes = record.get("factorized_sizes", record["sizes"])
    lines += ["## Factorized prompts", "",
              f"{len(trained)} pairs trained jointly for {fsizes['factorized_steps']} steps of batch "
              f"{fsizes.get('factorized_batch', 16)} at Adam lr {fsizes.get('factorized_lr', 0.05)} "
              f"({fsizes['factorized_rows'] // 2} + {fsizes['factorized_rows'] // 2} rows); "
              f"{len(HELD_OUT_PAIRS)} pairs never trained together, composed at test time.", "",
              "| pair | kind | dev exact match per seed | mean ± sd |", "|---|---|---|---:|"]
    for lang in LANGUAGES:
        for arr in ARRANGEMENTS:
            values = [r[f"{lang}+{arr}"] for r in runs]
            kind = "unseen" if (lang, arr) in HELD_OUT_PAIRS else "trained"
            lines.append(f"| {lang} + {arr} | {kind} | {', '.join(f'{v:.2f}' for v in values)} | {mean_sd(values)} |")
    unseen_best = max(HELD_OUT_PAIRS, key=lambda p: statistics.fmean(r[f"{p[0]}+{p[1]}"] for r in runs))
    unseen_value = statistics.fmean(r[f"{unseen_best[0]}+{unseen_best[1]}"] for r in runs)
    lines += ["", f"Trained pairs: mean {statistics.fmean(trained_means):.2f}, lowest {min(trained_means):.2f} "
              f"(target >= 0.8). Best unseen pair: {unseen_best[0]} + {unseen_best[1]} at {unseen_value:.2f} "
              "(target >= 0.5).", "", "![factorized grid](plots/factorized-grid.png)", ""]
    record["summary"].update({"trained_pairs_min": min(trained_means), "trained_pairs_mean": statistics.fmean(trained_means),
                              "best_unseen_pair": f"{unseen_best[0]}+{unseen_best[1]}", "best_unseen": unseen_value})
    (out / "study.json").write_text(json.dumps(record))
    notes = out / "notes.md"  # the reading of these figures, written by whoever ran the study
    if notes.exists():
        lines += ["", notes.read_text().strip()]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/prompt-science"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the pipeline, proves nothing")
    parser.add_argument("--seeds", type=int, help="seeds (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--report-only", action="store_true", help="redraw the report from OUT/study.json")
    parser.add_argument("--factorized-only", action="store_true",
                        help="run only the factorized part into OUT/factorized.json (--report-only merges it)")
    parser.add_argument("--factorized-steps", type=int, help="override the factorized training steps")
    parser.add_argument("--skip-factorized", action="store_true",
                        help="rerun everything but the factorized part, keeping its results from OUT/study.json")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else Sizes()
    if args.seeds:
        sizes = dataclasses.replace(sizes, seeds=args.seeds)
    if args.factorized_steps:
        sizes = dataclasses.replace(sizes, factorized_steps=args.factorized_steps)
    if args.factorized_only:
        factorized_only(args.out, sizes, args.threads)
        return 0
    if args.report_only:
        record = json.loads((args.out / "study.json").read_text())
        if (args.out / "factorized.json").exists():  # a later --factorized-only run replaces the part
            record.update(json.loads((args.out / "factorized.json").read_text()))
        write_report(args.out, record)
        print(f"report: {args.out / 'report.md'}  summary: {json.dumps(record['summary'])}")
        return 0
    record = run(args.out, sizes, args.threads, args.skip_factorized)
    print(f"report: {args.out / 'report.md'}  summary: {json.dumps(record['summary'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
