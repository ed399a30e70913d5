"""The per-row sampler both decode paths use: right distribution, own stream per row."""
from __future__ import annotations

import re

import pytest
import torch

from promptmux.prompts.errors import InvalidRequestError
from promptmux.serving.engine.types import GenerationParams
from promptmux.serving.engine.sampling import row_uniforms, sample_rows, seed_words

DRAWS = 40_000


def draw(logits: torch.Tensor, temperature: float, top_p: float, seed: int = 7) -> torch.Tensor:
    """DRAWS tokens of one row's stream: the same seed, counters 0..DRAWS-1."""
    rows = logits.expand(DRAWS, -1)
    return sample_rows(
        rows, torch.zeros(DRAWS, dtype=torch.bool), torch.full((DRAWS,), temperature), torch.full((DRAWS,), top_p),
        torch.tensor(seed_words(seed)).expand(DRAWS, 2), torch.arange(DRAWS),
    )


def test_tokens_follow_the_tempered_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]])
    for temperature in (1.0, 0.5, 2.0):
        frequencies = torch.bincount(draw(logits, temperature, 1.0), minlength=5) / DRAWS
        expected = (logits[0] / temperature).softmax(-1)
        assert torch.allclose(frequencies, expected, atol=0.01), (temperature, frequencies, expected)


def test_top_p_keeps_exactly_the_nucleus():
    probs = torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]])
    frequencies = torch.bincount(draw(probs.log(), 1.0, 0.75), minlength=5) / DRAWS
    # 0.4 and 0.3 make 0.7 < 0.75, so 0.15 joins; 0.1 and 0.05 never appear.
    expected = torch.tensor([0.0, 0.4, 0.0, 0.3, 0.15]) / 0.85
    assert frequencies[0] == 0 and frequencies[2] == 0
    assert torch.allclose(frequencies, expected, atol=0.01)
    assert set(draw(probs.log(), 1.0, 1e-6).tolist()) == {1}  # a tiny nucleus is greedy


def test_each_row_draws_from_its_own_stream():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=generator)
    seeds = torch.tensor([seed_words(s) for s in (1, 2, 3, 2**40 + 5, 1, 99)])
    counters = torch.tensor([0, 5, 9, 3, 0, 1])
    greedy = torch.tensor([False, False, True, False, False, False])
    temperature, top_p = torch.full((6,), 1.3), torch.tensor([1.0, 0.9, 1.0, 0.5, 1.0, 0.95])
    together = sample_rows(logits, greedy, temperature, top_p, seeds, counters)
    assert together[2] == logits[2].argmax()
    for row in range(6):  # alone, or after its batch-mates are reversed: the same token
        alone = sample_rows(logits[row : row + 1], greedy[row : row + 1], temperature[row : row + 1],
                            top_p[row : row + 1], seeds[row : row + 1], counters[row : row + 1])
        assert alone.item() == together[row].item()
    flipped = sample_rows(logits.flip(0), greedy.flip(0), temperature.flip(0), top_p.flip(0), seeds.flip(0),
                          counters.flip(0))
    assert flipped.flip(0).tolist() == together.tolist()
    uniforms = row_uniforms(seeds, counters)
    assert uniforms[0] == uniforms[4] and len(set(uniforms.tolist())) == 5  # same (seed, counter), same draw


def test_a_tiny_temperature_is_argmax_not_nan():
    logits = torch.tensor([[0.3, 2.5, 2.4999, -4.0]])
    assert set(draw(logits, 1e-30, 1.0)[:100].tolist()) == {1}


@pytest.mark.parametrize("params", [
    GenerationParams(strategy="sample", temperature=1e-300),  # 0.0 in float32
    GenerationParams(strategy="sample", temperature=1e39),  # inf in float32
    GenerationParams(strategy="sample", top_p=1e-50),  # 0.0 in float32
])
def test_parameters_that_break_in_float32_are_refused(params):
    with pytest.raises(InvalidRequestError, match="float32"):
        params.validate(64)  # the one validation a request gets, in the terms the sampler computes in
    GenerationParams(strategy="greedy", temperature=1e-300).validate(64)  # unused by greedy rows
