"""Task embeddings: stored with a prompt version, exported with it, and ranked by similarity."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from promptmux.prompts.formats import export_safetensors, load_prompt, load_task_embedding
from promptmux.prompts.retrieval import EmbeddingCache, rank_tasks
from promptmux.prompts.store import PromptStore
from promptmux.prompts.task_embedding import (
    TASK_EMBEDDING_EXTRA_KEY,
    EmbeddingRecipe,
    compute_task_embedding,
    shared_init,
    similarity,
    similarity_matrix,
)
from promptmux.serving import cli
from promptmux.serving.config import ModelConfig, PromptmuxConfig
from promptmux.serving.errors import InvalidRequestError
from promptmux.serving.model_loading import load_model

D = 16


def rand(rows: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, D, generator=torch.Generator().manual_seed(seed))


def test_a_version_keeps_its_task_embedding_and_exports_it(tmp_path):
    store = PromptStore(tmp_path / "store", d_model=D, max_length=64)
    prompt, embedding = rand(5, 1), rand(4, 2)
    meta = store.register("acme", "qa", prompt, extra={TASK_EMBEDDING_EXTRA_KEY: {"steps": 3}}, task_embedding=embedding)
    stored = store.get("acme", "qa")
    assert torch.equal(stored.tensor, prompt) and torch.equal(stored.task_embedding, embedding)
    assert stored.meta == meta and meta.length == 5  # the prompt, not the embedding, defines the version
    assert store.get("acme", "qa").task_embedding is not None
    store.register("acme", "plain", prompt)
    assert store.get("acme", "plain").task_embedding is None
    out = tmp_path / "qa.safetensors"
    export_safetensors(stored.tensor, out, task_embedding=stored.task_embedding)
    assert torch.equal(load_prompt(out), prompt) and torch.equal(load_task_embedding(out), embedding)
    with pytest.raises(Exception, match="non-finite"):
        store.register("acme", "bad", prompt, task_embedding=torch.full((4, D), float("nan")))


def test_similarity_is_the_cosine_of_displacements_from_the_shared_init():
    init = rand(3, 0)
    a = init + torch.tensor([1.0] + [0.0] * (D - 1))
    b = init + 2 * torch.tensor([1.0] + [0.0] * (D - 1))
    c = init - torch.tensor([1.0] + [0.0] * (D - 1))
    assert similarity(a, b, init) == pytest.approx(1.0) and similarity(a, c, init) == pytest.approx(-1.0)
    matrix = similarity_matrix([a, b, c], init, "flattened")
    assert matrix[0, 1] == pytest.approx(1.0) and matrix[0, 2] == pytest.approx(-1.0)
    with pytest.raises(InvalidRequestError, match="cannot be compared"):
        similarity(a, rand(4, 1), init)


def test_ranking_skips_tasks_without_a_comparable_embedding(tmp_path):
    recipe = EmbeddingRecipe(prompt_length=3)
    key = {**recipe.comparable_key("m"), "similarity": "mean-token"}
    store = PromptStore(tmp_path / "store", d_model=D, max_length=64)
    init = rand(3, 0)
    direction = rand(1, 9).expand(3, D)
    store.register("acme", "near", rand(2, 1), extra={TASK_EMBEDDING_EXTRA_KEY: key}, task_embedding=init + direction)
    store.register("acme", "far", rand(2, 2), extra={TASK_EMBEDDING_EXTRA_KEY: key}, task_embedding=init - direction)
    store.register("acme", "other-recipe", rand(2, 3), extra={TASK_EMBEDDING_EXTRA_KEY: {**key, "steps": 99}},
                   task_embedding=init + direction)
    store.register("acme", "none", rand(2, 4))
    ranking = rank_tasks(init + 2 * direction, store.list("acme"), EmbeddingCache(store), init=init, recipe=recipe,
                         model_name="m")
    assert [m.meta.task for m in ranking.matches] == ["near", "far"]
    assert ranking.matches[0].score == pytest.approx(1.0) and ranking.matches[1].score == pytest.approx(-1.0)
    assert sorted(m.task for m in ranking.without_embedding) == ["none", "other-recipe"]
    assert [m.meta.task for m in rank_tasks(init + direction, store.list("acme"), EmbeddingCache(store), init=init,
                                            recipe=recipe, model_name="m", top_k=1).matches] == ["near"]


def test_task_embedding_config_section_has_defaults_and_rejects_unknown_keys():
    assert PromptmuxConfig.from_dict({}).task_embedding == EmbeddingRecipe()
    config = PromptmuxConfig.from_dict({"task_embedding": {"steps": 5, "max_examples": 64}})
    assert config.task_embedding.steps == 5 and PromptmuxConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown EmbeddingRecipe key.*stepz"):
        PromptmuxConfig.from_dict({"task_embedding": {"stepz": 5}})
    with pytest.raises(InvalidRequestError, match="similarity"):
        PromptmuxConfig.from_dict({"task_embedding": {"similarity": "dot"}})
