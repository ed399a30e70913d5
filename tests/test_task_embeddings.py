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
from promptmux.serving.cli import main as cli
from promptmux.serving.config import ModelConfig, PromptmuxConfig
from promptmux.prompts.errors import InvalidRequestError
from promptmux.serving.model.loading import load_model

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


# ---------------------------------------------------------------- on the embedded model
RECIPE = {"steps": 8, "batch_size": 16}  # the default recipe, shortened: these tasks separate early


@pytest.fixture(scope="module")
def embedded_library(tmp_path_factory):
    """Tasks of the embedded model with task embeddings of one data seed, and a second seed's data."""
    from promptmux.prompts.synthetic_tasks import task_examples, write_jsonl

    root = tmp_path_factory.mktemp("embedded-library")
    config = root / "promptmux.yaml"
    config.write_text(json.dumps({"model": {"source": "embedded"}, "store": {"root": str(root / "store")},
                                  "task_embedding": RECIPE}))
    loaded = load_model(ModelConfig(source="embedded"))
    recipe = EmbeddingRecipe(**RECIPE)
    init = shared_init(loaded.model, loaded.tokenizer, recipe)
    store = PromptStore(root / "store", d_model=256, max_length=64)
    for i, task in enumerate(("upper", "duplicate", "rotate", "caesar")):
        write_jsonl(task_examples(task, 96, seed=50 + i), root / f"{task}-2.jsonl")
        store.register("acme", task, rand(4, i).repeat(1, 16))  # the prompt itself plays no part in retrieval
        if task == "caesar":
            write_jsonl(task_examples(task, 96, seed=10 + i), root / f"{task}-1.jsonl")
            continue  # embedded through the CLI below
        embedding = compute_task_embedding(loaded.model, loaded.tokenizer, task_examples(task, 96, seed=10 + i),
                                           recipe, model_name=loaded.name, init=init)
        meta = store.meta("acme", task)
        store.register("acme", task, store.get("acme", task).tensor, extra={TASK_EMBEDDING_EXTRA_KEY: embedding.info},
                       task_embedding=embedding.tensor)
    assert cli.main(["prompts", "embed", "--config", str(config), "--tenant", "acme", "caesar",
                     "--data", str(root / "caesar-1.jsonl")]) == 0
    return root, config, loaded, recipe, init, store


@pytest.mark.parametrize("task", ["upper", "duplicate"])
def test_a_tasks_second_seed_retrieves_it_first(embedded_library, task):
    from promptmux.prompts.synthetic_tasks import task_examples

    root, _, loaded, recipe, init, store = embedded_library
    query = compute_task_embedding(loaded.model, loaded.tokenizer, task_examples(task, 96, seed=70), recipe,
                                   model_name=loaded.name, init=init).tensor
    ranking = rank_tasks(query, store.list("acme"), EmbeddingCache(store), init=init, recipe=recipe,
                         model_name=loaded.name)
    ranked = [m.meta.task for m in ranking.matches]
    assert ranked[0] == task, [(m.meta.task, round(m.score, 3)) for m in ranking.matches]
    assert sorted(ranked) == ["caesar", "duplicate", "rotate", "upper"]
    assert ranking.matches[0].score > ranking.matches[1].score


def test_similar_command_ranks_by_the_stored_embeddings(embedded_library, capsys):
    root, config, *_ = embedded_library
    capsys.readouterr()
    assert cli.main(["prompts", "similar", "--config", str(config), "--tenant", "acme", "--data",
                     str(root / "caesar-2.jsonl"), "--top-k", "2", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert [t["task"] for t in answer["tasks"]][:1] == ["caesar"] and answer["compared"] == 4
    assert len(answer["tasks"]) == 2 and answer["similarity"] == "mean-token"
    capsys.readouterr()
    assert cli.main(["prompts", "similar", "--config", str(config), "--tenant", "globex", "--data",
                     str(root / "caesar-2.jsonl"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tasks"] == []  # acme's private tasks are not globex's


def test_embed_keeps_the_prompt_and_adds_a_new_version(embedded_library):
    store = embedded_library[-1]
    first, second = store.versions("acme", "caesar")
    assert first.content_hash == second.content_hash and second.version == first.version + 1
    assert store.get("acme", "caesar", first.version).task_embedding is None
    info = second.extra[TASK_EMBEDDING_EXTRA_KEY]
    assert info["model"] == "embedded" and info["steps"] == 8 and info["examples"] == 96
    assert store.get("acme", "caesar").task_embedding.shape == (12, 256)
