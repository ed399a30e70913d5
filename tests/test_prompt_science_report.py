"""The prompt-science report's reading of transfer runs: which source is best, and when it counts as retrieved."""
from __future__ import annotations

import pytest

from promptmux.benchmarks.prompt_science_report import TargetFigures, area


def curve(ems, losses):
    """[(step, exact match, dev loss)] with step 0 first, as the study records a run."""
    return [(0, 0.0, 9.0)] + [(15 * (i + 1), em, loss) for i, (em, loss) in enumerate(zip(ems, losses))]


def entry(from_source, tops, vocab=((0, 0), (8, 7)), retrieved=((0, 0.5), (3, 1))):
    seeds = len(tops)
    return {"from_source": {name: [curve(*runs)] * seeds for name, runs in from_source.items()},
            "vocab": [curve(*vocab)] * seeds, "retrieved": [curve(*retrieved)] * seeds,
            "retrieved_sources": [[(name, 0.5) for name in top] for top in tops]}


def sims(target, sources, seeds):
    return {((target, seed), (name, 0)): 0.1 * i for seed in range(seeds) for i, name in enumerate(sources)}


def test_area_skips_step_zero():
    assert area(curve((0.2, 0.4), (1, 1))) == pytest.approx(0.3)


def test_exact_match_within_one_dev_string_is_a_tie_that_the_lower_dev_loss_breaks():
    runs = {"lucky": ((0.025, 0.0), (6.0, 6.0)),  # one dev string once: noise
            "close": ((0.0, 0.0), (2.0, 1.0)),
            "far": ((0.0, 0.0), (8.0, 8.0))}
    figures = TargetFigures("t", entry(runs, [["close", "far", "lucky"]]), sims("t", runs, 1), [0], dev_examples=40)
    assert figures.best == "close"
    runs["lucky"] = ((0.1, 0.2), (6.0, 6.0))  # four strings and more: a real lead
    figures = TargetFigures("t", entry(runs, [["close", "far", "lucky"]]), sims("t", runs, 1), [0], dev_examples=40)
    assert figures.best == "lucky"


def test_the_best_source_counts_as_retrieved_at_half_the_seeds_or_more():
    runs = {"a": ((0.5, 0.9), (1, 1)), "b": ((0, 0), (5, 5)), "c": ((0, 0), (6, 6)), "d": ((0, 0), (7, 7))}
    two_of_three = [["a", "b", "c"], ["b", "c", "d"], ["a", "c", "d"]]
    figures = TargetFigures("t", entry(runs, two_of_three), sims("t", runs, 3), [0, 1, 2], dev_examples=40)
    assert (figures.best, figures.seeds_hit, figures.hit) == ("a", 2, True)
    one_of_three = [["a", "b", "c"], ["b", "c", "d"], ["b", "c", "d"]]
    figures = TargetFigures("t", entry(runs, one_of_three), sims("t", runs, 3), [0, 1, 2], dev_examples=40)
    assert (figures.seeds_hit, figures.hit) == (1, False)


def test_recovered_share_of_the_best_sources_gain():
    runs = {"a": ((0.4, 0.8), (1, 1)), "b": ((0, 0), (5, 5))}
    figures = TargetFigures("t", entry(runs, [["a", "b"]], retrieved=((0.2, 0.4), (2, 2))), sims("t", runs, 1), [0],
                            dev_examples=40)
    by_auc, at_budget = figures.recovered()
    assert by_auc == pytest.approx(0.5) and at_budget == pytest.approx(0.5)
    assert figures.em_margin == pytest.approx(0.4)
    nothing = {"a": ((0, 0), (1, 1)), "b": ((0, 0), (5, 5))}  # no source gains: no share to report
    figures = TargetFigures("t", entry(nothing, [["a", "b"]]), sims("t", nothing, 1), [0], dev_examples=40)
    assert figures.recovered() == (None, None)
