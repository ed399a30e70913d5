"""A picture of one prompt-tuning run: training loss, dev loss and dev exact match by step.

Written beside the checkpoints as `curve.png`, because whether a run has converged, is still
rising or overfits is read at a glance from the curves and slowly from `history.json`.
matplotlib is an optional extra (`pip install .[bench]`); without it no picture is drawn.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence


def plot_training_curve(
    train_losses: Sequence[float],
    history: Sequence[tuple[int, float, float]],
    path: Path,
    *,
    title: str,
    early_step: int | None = None,
    best_step: int | None = None,
) -> Path | None:
    """Draw the curves to `path`; `history` holds (step, dev exact match 0..1, dev loss).

    Returns `path`, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on servers and CI
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, loss_axis = plt.subplots(figsize=(7, 4), dpi=110)
    steps = range(1, len(train_losses) + 1)
    loss_axis.plot(steps, train_losses, color="tab:blue", alpha=0.35, linewidth=1, label="train loss")
    loss_axis.plot(steps, _running_mean(train_losses, 20), color="tab:blue", linewidth=1.5,
                   label="train loss (mean of 20)")
    if history:
        loss_axis.plot([h[0] for h in history], [h[2] for h in history], "o-", color="tab:orange",
                       markersize=3, label="dev loss")
    loss_axis.set_yscale("log")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("cross-entropy per target token")
    match_axis = loss_axis.twinx()
    if history:
        match_axis.plot([h[0] for h in history], [100 * h[1] for h in history], "s-", color="tab:green",
                        markersize=3, label="dev exact match")
    match_axis.set_ylim(0, 100)
    match_axis.set_ylabel("dev exact match (%)")
    for step, label, style in ((early_step, "early checkpoint", ":"), (best_step, "best", "--")):
        if step:
            loss_axis.axvline(step, color="grey", linestyle=style, linewidth=1, label=label)
    handles = loss_axis.get_legend_handles_labels()
    extra = match_axis.get_legend_handles_labels()
    loss_axis.legend(handles[0] + extra[0], handles[1] + extra[1], loc="center right", fontsize=8)
    loss_axis.set_title(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


def _running_mean(values: Sequence[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out
