"""The prompt-science study's report: `report.md` and its plots, from `study.json`.

How the figures are read:
- A transfer run's score is its area under the exact-match curve (AUC): the mean dev exact
  match over the curve's points after step 0. It rewards a source that helps early as well
  as at the budget.
- The best source of a target has the highest AUC averaged over the seeds. Sources within one
  dev string's worth of the top AUC (1 / dev examples) are tied: so few hits are noise, and
  exact match is often still 0 at a small budget. A tie goes to the lowest dev loss averaged
  over the curve and the seeds.
- The best source counts as retrieved when it is in the top 3 for at least half the seeds.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from promptmux.prompts.task_embedding import EmbeddingRecipe

ARRANGEMENT_CEILING = 0.9  # the frozen model does an arrangement when its own prefix scores this


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


def area(curve: list) -> float:
    """Mean exact match over the curve's points after step 0."""
    return statistics.fmean(point[1] for point in curve[1:])


def _similarities(record: dict, method: str) -> dict:
    def key(text: str):
        task, seed = text.rsplit("/", 1)
        return task, int(seed)

    return {(key(a), key(b)): v for a, b, v in record["similarity"][method]["pairs"]}


class TargetFigures:
    """Per-target transfer figures, averaged over seeds."""

    def __init__(self, target: str, entry: dict, sim: dict, seeds: list[int], dev_examples: int) -> None:
        self.target = target
        self.sources = list(entry["from_source"])
        self.auc = {s: statistics.fmean(area(c) for c in curves) for s, curves in entry["from_source"].items()}
        self.final_em = {s: statistics.fmean(c[-1][1] for c in curves) for s, curves in entry["from_source"].items()}
        self.final_loss = {s: statistics.fmean(c[-1][2] for c in curves) for s, curves in entry["from_source"].items()}
        self.loss_area = {s: statistics.fmean(statistics.fmean(p[2] for p in c[1:]) for c in curves)
                          for s, curves in entry["from_source"].items()}
        top = max(self.auc.values())
        tied = [s for s in self.sources if self.auc[s] >= top - 1.0 / dev_examples]
        self.best = min(tied, key=lambda s: self.loss_area[s])
        self.tops = [[s for s, _ in ranked] for ranked in entry["retrieved_sources"]]
        self.seeds_hit = sum(self.best in top for top in self.tops)
        self.hit = 2 * self.seeds_hit >= len(self.tops)
        self.vocab_em = [c[-1][1] for c in entry["vocab"]]
        self.retrieved_em = [c[-1][1] for c in entry["retrieved"]]
        self.vocab_loss = [c[-1][2] for c in entry["vocab"]]
        self.retrieved_loss = [c[-1][2] for c in entry["retrieved"]]
        self.best_of_k_em = [c[-1][1] for c in entry.get("best_of_k", [])]
        self.best_of_k_chose = entry.get("best_of_k_chose", [])
        self.vocab_auc = statistics.fmean(area(c) for c in entry["vocab"])
        self.retrieved_auc = statistics.fmean(area(c) for c in entry["retrieved"])
        self.similarity = {s: statistics.fmean(sim[((target, seed), (s, 0))] for seed in seeds) for s in self.sources}
        self.auc_gain = {s: self.auc[s] - self.vocab_auc for s in self.sources}
        self.loss_gain = {s: statistics.fmean(self.vocab_loss) - self.final_loss[s] for s in self.sources}

    @property
    def em_margin(self) -> float:
        return statistics.fmean(self.retrieved_em) - statistics.fmean(self.vocab_em)

    def recovered(self) -> tuple[float | None, float | None]:
        """The retrieved init's share of the best source's gain over the vocabulary init, by
        AUC and at the budget; None where the best source gains (almost) nothing."""
        auc_gain = self.auc[self.best] - self.vocab_auc
        final_gain = self.final_em[self.best] - statistics.fmean(self.vocab_em)
        by_auc = (self.retrieved_auc - self.vocab_auc) / auc_gain if auc_gain > 0.02 else None
        by_final = self.em_margin / final_gain if final_gain > 0.02 else None
        return by_auc, by_final


def _best_of_k_cell(f: TargetFigures) -> str:
    if not f.best_of_k_em:
        return "—"
    return f"{mean_sd(f.best_of_k_em)} ({', '.join(f.best_of_k_chose)})"


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.0f}%"


def write_report(out: Path, record: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    recipe = EmbeddingRecipe(**record["recipe"])
    sizes = record["sizes"]
    seeds = list(range(sizes["seeds"]))
    method = recipe.similarity
    sim = _similarities(record, method)
    sources = list(record["source_scores"])
    targets = list(record["transfer"])
    tasks = (*sources, *targets)
    lines = ["# Prompt science on the embedded model", "",
             f"`benchmarks/prompt_science_study.py`, {len(seeds)} seeds, {record['workers']} worker process(es) of "
             f"{record['threads']} torch thread(s) on a {record['cpus']}-CPU machine, {record['seconds'] / 60:.1f} min.",
             "", f"Task-embedding recipe (production default, `task_embedding` config): {recipe.steps} SGD steps at lr "
             f"{recipe.lr}, batch {recipe.batch_size}, {recipe.prompt_length} rows, from one shared init (the text "
             f"prompt {recipe.init_text!r}); similarity: {method} cosine of the displacement from that init.", ""]

    # heat map (seed 0 of every task; the diagonal compares seed 1 with seed 0)
    figure, axis = plt.subplots(figsize=(7.5, 6.5), dpi=110)
    grid = [[sim[((a, 0), (b, 0 if a != b else 1))] for b in tasks] for a in tasks]
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

    # retrieval and transfer
    figures = [TargetFigures(t, record["transfer"][t], sim, seeds, sizes["dev_examples"]) for t in targets]
    lines += ["## Retrieval and transfer", "",
              f"Budget: {sizes['transfer_steps']} Adam steps (lr {sizes['transfer_lr']}, {sizes['transfer_warmup']} "
              f"warmup, {sizes.get('transfer_schedule', 'constant')} rate, batch {sizes['transfer_batch']}), the same for "
              f"every init, at each of "
              f"{len(seeds)} seeds (the seed picks the training strings, the dev strings and the target's "
              f"embedding); dev exact match (EM) and dev loss on {sizes['dev_examples']} fresh strings. AUC: mean EM "
              f"over steps {', '.join(str(p) for p in sizes['curve_points'])}. The best source has the highest mean "
              f"AUC; sources within one dev string of it (1/{sizes['dev_examples']}) are tied, and a tie goes to the "
              "lowest dev loss averaged over the curve. It counts as retrieved when it is in the top 3 for at least "
              "half the seeds.", "",
              "| target | best source (AUC, EM, loss) | retrieved top 3 (seed 0) | best in top 3 | vocab init EM | "
              "retrieved init EM | retrieved share of the best source's gain (AUC / at the budget) | "
              "best-of-k init EM (its choice per seed) | Spearman(sim, AUC gain) | Spearman(sim, loss gain) |",
              "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for f in figures:
        by_auc, by_final = f.recovered()
        sims = [f.similarity[s] for s in f.sources]
        lines.append(
            f"| {f.target} | {f.best} ({f.auc[f.best]:.2f}, {f.final_em[f.best]:.2f}, {f.final_loss[f.best]:.2f}) | "
            f"{', '.join(f.tops[0])} | {'yes' if f.hit else 'no'} ({f.seeds_hit}/{len(f.tops)} seeds) | "
            f"{mean_sd(f.vocab_em)} | {mean_sd(f.retrieved_em)} | {_percent(by_auc)} / {_percent(by_final)} | "
            f"{_best_of_k_cell(f)} | "
            f"{spearman(sims, [f.auc_gain[s] for s in f.sources]):.2f} | "
            f"{spearman(sims, [f.loss_gain[s] for s in f.sources]):.2f} |")
    lines += ["", "Each source's mean AUC per target (the best in bold; * marks the retrieved top 3 at seed 0):", "",
              "| target | " + " | ".join(sources) + " | vocab | retrieved |",
              "|---|" + "---:|" * (len(sources) + 2)]
    for f in figures:
        cells = [(f"**{f.auc[s]:.2f}**" if s == f.best else f"{f.auc[s]:.2f}") + ("*" if s in f.tops[0] else "")
                 for s in sources]
        lines.append(f"| {f.target} | " + " | ".join(cells) + f" | {f.vocab_auc:.2f} | {f.retrieved_auc:.2f} |")

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for f in figures:
        xs = [f.similarity[s] for s in f.sources]
        axes[0].scatter(xs, [f.auc_gain[s] for s in f.sources], label=f.target, s=18)
        axes[1].scatter(xs, [f.loss_gain[s] for s in f.sources], label=f.target, s=18)
    for axis, label in zip(axes, ("AUC gain over the vocab init", "dev-loss drop vs the vocab init at the budget")):
        axis.axhline(0, color="grey", linewidth=0.8)
        axis.set_xlabel(f"task-embedding similarity ({method}, mean of seeds)")
        axis.set_ylabel(label)
        axis.legend(fontsize=7)
    figure.suptitle("transfer gain against similarity (each point: one source, mean of seeds)")
    figure.tight_layout()
    figure.savefig(plots / "transfer-gain-vs-similarity.png")
    plt.close(figure)
    pooled_x = [f.similarity[s] for f in figures for s in f.sources]
    pooled_auc = spearman(pooled_x, [f.auc_gain[s] for f in figures for s in f.sources])
    pooled_loss = spearman(pooled_x, [f.loss_gain[s] for f in figures for s in f.sources])
    top3_hits = sum(f.hit for f in figures)
    em_wins = sum(f.em_margin >= 0.10 for f in figures)
    best_of_k_wins = sum(bool(f.best_of_k_em) and statistics.fmean(f.best_of_k_em) - statistics.fmean(f.vocab_em)
                         >= 0.10 for f in figures)
    lower_loss = sum(statistics.fmean(f.retrieved_loss) < statistics.fmean(f.vocab_loss) for f in figures)
    lines += ["", f"Best source in the retrieved top 3: **{top3_hits} of {len(figures)}** targets (target >= 3). "
              f"Retrieved init beats the vocabulary init by >= 0.10 exact match at the budget on **{em_wins} of "
              f"{len(figures)}** targets (target >= 2); it has the lower dev loss on {lower_loss} of {len(figures)}. "
              f"The best-of-k init ({sizes.get('probe_steps', 10)} probe steps from each of the top 3, scored on "
              "separate strings, then the budget) "
              f"beats the vocabulary init by >= 0.10 on {best_of_k_wins} of {len(figures)}. "
              f"Spearman of similarity and gain, pooled over targets and sources: {pooled_auc:.2f} by AUC, "
              f"{pooled_loss:.2f} by dev loss.", "",
              "![transfer gain against similarity](plots/transfer-gain-vs-similarity.png)", ""]
    record["summary"] = {"best_in_top3": top3_hits, "retrieved_beats_vocab_by_0.10": em_wins,
                         "best_of_k_beats_vocab_by_0.10": best_of_k_wins,
                         "retrieved_lower_loss": lower_loss, "spearman_pooled_auc": pooled_auc,
                         "spearman_pooled_loss": pooled_loss,
                         "recovered": {f.target: f.recovered() for f in figures},
                         "self_first": {m: f"{v['self_first']}/{v['queries']}" for m, v in record["similarity"].items()}}
    _learning_curves(plt, plots, record, figures)
    lines += ["![learning curves](plots/learning-curves.png)", ""]
    lines += _factorized_section(plt, plots, record)
    (out / "study.json").write_text(json.dumps(record))
    notes = out / "notes.md"  # the reading of these figures, written by whoever ran the study
    if notes.exists():
        lines += ["", notes.read_text().strip()]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def _learning_curves(plt, plots: Path, record: dict, figures: list[TargetFigures]) -> None:
    """Dev loss and exact match against steps: vocab init, retrieved init, best source."""
    figure, axes = plt.subplots(2, len(figures), figsize=(3.2 * len(figures), 5.6), dpi=110, sharex=True)
    for column, f in enumerate(figures):
        entry = record["transfer"][f.target]
        for row, (index, label) in enumerate(((2, "dev loss"), (1, "dev exact match"))):
            axis = axes[row][column]
            lines = [("vocab init", entry["vocab"], "tab:grey"), ("retrieved top-3", entry["retrieved"], "tab:green"),
                     (f"best source ({f.best})", entry["from_source"][f.best], "tab:blue")]
            if entry.get("best_of_k"):
                lines.append(("best-of-k", entry["best_of_k"], "tab:orange"))
            for name, curves, color in lines:
                steps = [p[0] for p in curves[0]]
                values = [[c[i][index] for c in curves] for i in range(len(steps))]
                means = [statistics.fmean(v) for v in values]
                spreads = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
                axis.plot(steps, means, "o-", color=color, label=name, markersize=3)
                axis.fill_between(steps, [m - s for m, s in zip(means, spreads)],
                                  [m + s for m, s in zip(means, spreads)], color=color, alpha=0.2)
            if row == 0:
                axis.set_title(f.target, fontsize=9)
                axis.legend(fontsize=6)
            else:
                axis.set_xlabel("step")
            if column == 0:
                axis.set_ylabel(f"{label} (mean ± sd)")
    figure.tight_layout()
    figure.savefig(plots / "learning-curves.png")
    plt.close(figure)


def _factorized_section(plt, plots: Path, record: dict) -> list[str]:
    grid = record["factorized_grid"]
    languages, arrangements = grid["languages"], grid["arrangements"]
    held_out = [tuple(pair) for pair in grid["held_out"]]
    runs, vocab_runs = record["factorized"], record.get("factorized_vocab", [])
    ceilings = record.get("prefix_ceilings", {})
    grids = [("text init, mean of seeds", runs)] + ([("vocabulary init (ablation, seed 0)", vocab_runs)]
                                                  if vocab_runs else [])
    figure, axes = plt.subplots(1, len(grids), figsize=(6 * len(grids), 3.6), dpi=110, squeeze=False)
    for axis, (title, grid_runs) in zip(axes[0], grids):
        means = [[statistics.fmean(r[f"{lang}+{arr}"] for r in grid_runs) for arr in arrangements]
                 for lang in languages]
        image = axis.imshow(means, cmap="viridis", vmin=0, vmax=1)
        axis.set_xticks(range(len(arrangements)), arrangements)
        axis.set_yticks(range(len(languages)), languages)
        for i, lang in enumerate(languages):
            for j, arr in enumerate(arrangements):
                unseen = (lang, arr) in held_out
                axis.text(j, i, f"{means[i][j]:.2f}" + ("\nunseen" if unseen else ""), ha="center", va="center",
                          color="white" if means[i][j] < 0.6 else "black", fontsize=8)
        axis.set_xlabel("task prompt (arrangement)")
        axis.set_ylabel("language prompt (map)")
        axis.set_title(f"[language; task] dev EM: {title}", fontsize=9)
        figure.colorbar(image, ax=axis)
    figure.tight_layout()
    figure.savefig(plots / "factorized-grid.png")
    plt.close(figure)

    sizes = record["sizes"]
    pairs = [(lang, arr) for lang in languages for arr in arrangements]
    trained = [p for p in pairs if p not in held_out]
    mean_of = {f"{l}+{a}": statistics.fmean(r[f"{l}+{a}"] for r in runs) for l, a in pairs}
    capable = [f"{l}+{a}" for l, a in trained if ceilings.get(f"plain+{a}", 1.0) >= ARRANGEMENT_CEILING]
    texts = record.get("factorized_init_texts", {})
    lines = ["## Factorized prompts", "",
             f"{len(trained)} pairs trained jointly for {sizes['factorized_steps']} Adam steps of batch "
             f"{sizes['factorized_batch']} (lr {sizes['factorized_lr']}, {sizes['factorized_warmup']} warmup, cosine "
             f"decay), {sizes['factorized_rows']} + {sizes['factorized_rows']} rows, "
             f"{sizes['factorized_examples']} examples per pair; {len(held_out)} pairs never trained together, "
             "composed at test time. Each prompt starts from the text of the pretraining prefix that names its part ("
             + ", ".join(f"{name} ← {text!r}" for name, text in texts.items()) + "); the ablation starts every "
             "prompt from sampled vocabulary rows.", "",
             "The last column is the frozen model itself, given its own pretraining prefix, where it was pretrained "
             "on the pair (`sort: abc`, `rotate upper: abc`): what the model can do, whatever the prompt.", "",
             "| pair | kind | dev EM per seed (text init) | mean ± sd | vocabulary init (seed 0) | model with its own "
             "prefix |", "|---|---|---|---:|---:|---:|"]
    for lang, arr in pairs:
        key = f"{lang}+{arr}"
        values = [r[key] for r in runs]
        kind = "unseen" if (lang, arr) in held_out else "trained"
        vocab = f"{vocab_runs[0][key]:.2f}" if vocab_runs else "—"
        ceiling = f"{ceilings[key]:.2f}" if key in ceilings else "—"
        lines.append(f"| {lang} + {arr} | {kind} | {', '.join(f'{v:.2f}' for v in values)} | {mean_sd(values)} | "
                     f"{vocab} | {ceiling} |")
    trained_means = [mean_of[f"{l}+{a}"] for l, a in trained]
    unseen_best = max(held_out, key=lambda p: mean_of[f"{p[0]}+{p[1]}"])
    unseen_value = mean_of[f"{unseen_best[0]}+{unseen_best[1]}"]
    capable_mean = statistics.fmean(mean_of[k] for k in capable) if capable else float("nan")
    lines += ["", f"Trained pairs: mean **{statistics.fmean(trained_means):.2f}** over all {len(trained)}, lowest "
              f"{min(trained_means):.2f}; mean **{capable_mean:.2f}** over the {len(capable)} whose arrangement the "
              f"frozen model does with its own prefix at >= {ARRANGEMENT_CEILING} (target >= 0.8). Best unseen pair: "
              f"**{unseen_best[0]} + {unseen_best[1]} at {unseen_value:.2f}** (target >= 0.5).", "",
              "![factorized grid](plots/factorized-grid.png)", ""]
    record["summary"].update({"trained_pairs_mean": statistics.fmean(trained_means),
                              "trained_pairs_min": min(trained_means), "trained_capable_pairs_mean": capable_mean,
                              "best_unseen_pair": f"{unseen_best[0]}+{unseen_best[1]}", "best_unseen": unseen_value})
    return lines
