"""The shipped embedded model and demo prompts really do their tasks, served mixed."""
from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from promptmux.serving.demo.build import BUILD_RECORD
from promptmux.serving.demo.scoring import DEMO_EVAL_EXAMPLES, score_mixed_batch
from promptmux.prompts.store import PromptStore
from promptmux.serving.config import EngineConfig, ModelConfig
from promptmux.serving.demo.prompts import load_demo_prompts, seed_demo_prompts
from promptmux.serving.model.embedded import (
    ASSETS_DIR,
    EMBEDDED_CHECKSUM,
    EMBEDDED_WEIGHTS,
    embedded_state_dict,
    load_embedded_model,
)
from promptmux.serving.engine.core import Engine
from promptmux.prompts.errors import ModelLoadError
from promptmux.serving.model.loading import load_model
from promptmux.serving.model.shapes import build_random_model
from promptmux.serving.engine.types import GenerationRequest

REQUIRED_TASKS = {"reverse", "upper", "copy", "reverse-upper"}
ALONE_SAMPLE_PER_TASK = 6  # a request alone costs a full decode: a sample keeps the file fast


@pytest.fixture(scope="module")
def loaded():
    return load_model(ModelConfig(source="embedded"))


@pytest.fixture(scope="module")
def store(loaded, tmp_path_factory):
    store = PromptStore(tmp_path_factory.mktemp("store"), d_model=loaded.d_model, max_length=64)
    seed_demo_prompts(store)
    return store


@pytest.fixture(scope="module")
def tasks(store):
    return sorted(m.task for m in store.list("demo"))


@pytest.fixture(scope="module")
def engine(loaded, store, tasks):
    return Engine(loaded, store, EngineConfig(max_batch_size=len(tasks) * DEMO_EVAL_EXAMPLES))


@pytest.fixture(scope="module")
def mixed(engine, tasks):
    """Every demo task's 200 scoring strings, shuffled together into ONE engine batch."""
    return score_mixed_batch(engine, "demo", tasks)


def test_demo_tasks_cover_the_promised_set(tasks):
    assert REQUIRED_TASKS <= set(tasks)
    assert len(tasks) >= len(REQUIRED_TASKS) + 2


def test_every_demo_task_scores_95_percent_in_one_mixed_batch(mixed, tasks):
    assert mixed.output.stats.batch_size == len(mixed.rows) == len(tasks) * DEMO_EVAL_EXAMPLES
    assert mixed.output.stats.distinct_tasks == len(tasks)
    print("demo exact match:", {task: f"{100 * s:.1f}%" for task, s in mixed.scores.items()})
    assert all(score >= 0.95 for score in mixed.scores.values()), mixed.scores


def test_published_scores_are_what_the_shipped_files_give(mixed):
    """DEMO.md and the README quote build.json; the build scored exactly this batch."""
    record = json.loads((ASSETS_DIR / BUILD_RECORD).read_text())
    assert record["sha256"] == EMBEDDED_CHECKSUM.read_text().split()[0]
    published = record["mixed_batch_exact_match"]
    assert set(published) == set(mixed.scores)
    # Another CPU may round a float differently and flip a row or two; more is a real change.
    assert all(abs(published[task] - mixed.scores[task]) <= 0.01 for task in published), (published, mixed.scores)
    table = (ASSETS_DIR / "DEMO.md").read_text()
    assert all(f"| `{task}` |" in table and f"| {100 * score:.1f}% |" in table for task, score in published.items())


def test_mixed_rows_equal_the_same_requests_run_alone(mixed, engine, tasks):
    rows, requests, output = mixed.rows, mixed.requests, mixed.output
    checked = {task: 0 for task in tasks}
    # The longest inputs first: they are the rows other rows' padding would disturb.
    order = sorted(range(len(rows)), key=lambda i: -len(requests[i].text))
    for i in order:
        task = rows[i][0]
        if checked[task] == ALONE_SAMPLE_PER_TASK:
            continue
        alone = engine.generate([requests[i]])[0]
        assert alone.token_ids == output.results[i].token_ids, (task, requests[i].text)
        checked[task] += 1
    assert all(count == ALONE_SAMPLE_PER_TASK for count in checked.values())


def test_a_new_user_gets_real_answers(engine):
    asks = [("reverse", "hello", "olleh"), ("upper", "hello", "HELLO"), ("copy", "hello", "hello"),
            ("reverse-upper", "hello", "OLLEH")]
    results = engine.generate([GenerationRequest(tenant="someone-new", task=task, text=text)
                               for task, text, _ in asks])
    assert [r.text for r in results] == [want for _, _, want in asks]


def test_seeding_is_idempotent_and_repairs_changed_prompts(loaded, tmp_path):
    store = PromptStore(tmp_path / "store", d_model=loaded.d_model, max_length=64)
    first = seed_demo_prompts(store)
    assert all(meta.version == 1 and meta.shared for meta in first.values())
    again = seed_demo_prompts(store)
    assert again == first
    assert all(len(store.versions("demo", task)) == 1 for task in first)

    store.register("demo", "reverse", torch.zeros(4, loaded.d_model), shared=True)  # someone overwrote it
    repaired = seed_demo_prompts(store)
    assert repaired["reverse"].version == 3
    assert repaired["reverse"].content_hash == first["reverse"].content_hash
    assert all(repaired[task] == first[task] for task in first if task != "reverse")
    assert repaired["reverse"].extra["method"] == "prompt-tuning"


def test_demo_prompts_carry_their_training_metadata():
    prompts = {p.task: p for p in load_demo_prompts()}
    held_out = prompts["reverse-upper"].training
    assert held_out["method"] == "prompt-tuning"
    assert held_out["dev_exact_match"] >= 0.90
    assert held_out["model"] == "embedded"
    assert all(p.tensor.dtype == torch.float32 and p.tensor.shape[1] == 256 for p in prompts.values())


def test_shipped_weights_are_bf16_and_match_their_checksum():
    digest = hashlib.sha256(EMBEDDED_WEIGHTS.read_bytes()).hexdigest()
    assert EMBEDDED_CHECKSUM.read_text().split()[0] == digest
    with safe_open(str(EMBEDDED_WEIGHTS), framework="pt") as handle:
        assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {"BF16"}
        assert handle.metadata()["shape"] == "embedded"


def test_bf16_load_computes_in_bf16(loaded):
    model = load_embedded_model(dtype=torch.bfloat16)
    reference = loaded.model.state_dict()
    state = model.state_dict()
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    # float32 serving holds exactly the shipped bf16 values.
    assert all(torch.equal(state[k].float(), reference[k]) for k in state)


def test_corrupted_weights_fail_with_a_clear_error(tmp_path):
    corrupted = tmp_path / "embedded-t5.safetensors"
    shutil.copy(EMBEDDED_WEIGHTS, corrupted)
    data = bytearray(corrupted.read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupted.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match=r"corrupted or do not match their checksum.*demo\.build"):
        load_embedded_model(weights=corrupted, checksum=EMBEDDED_CHECKSUM)


def test_mismatched_weights_fail_with_a_clear_error(tmp_path):
    # A well-formed file with a matching checksum, but the weights of another shape.
    weights, checksum = tmp_path / "other.safetensors", tmp_path / "other.sha256"
    save_file(embedded_state_dict(build_random_model("tiny"), torch.bfloat16), str(weights))
    checksum.write_text(hashlib.sha256(weights.read_bytes()).hexdigest() + "  other.safetensors\n")
    with pytest.raises(ModelLoadError, match=r"does not hold the weights of the `embedded` T5 shape.*wrong shape"):
        load_embedded_model(weights=weights, checksum=checksum)


def test_missing_checksum_fails_instead_of_trusting_the_file(tmp_path):
    with pytest.raises(ModelLoadError, match="checksum file .* is missing"):
        load_embedded_model(checksum=tmp_path / "absent.sha256")


def test_demo_prompts_ship_task_embeddings_that_a_served_query_compares_with(loaded, store):
    from promptmux.prompts.synthetic_tasks import task_examples
    from promptmux.prompts.task_embedding import (
        TASK_EMBEDDING_EXTRA_KEY, EmbeddingRecipe, compute_task_embedding, shared_init, similarity,
    )

    recipe = EmbeddingRecipe()  # the server's default `task_embedding` config
    metas = {meta.task: meta for meta in store.list("demo")}
    assert all(meta.extra[TASK_EMBEDDING_EXTRA_KEY]["model"] == "embedded" for meta in metas.values())
    assert all({k: meta.extra[TASK_EMBEDDING_EXTRA_KEY][k] for k in recipe.comparable_key("embedded")}
               == recipe.comparable_key("embedded") for meta in metas.values())
    init = shared_init(loaded.model, loaded.tokenizer, recipe)
    # new strings of a demo task, embedded as SimilarTasks embeds a query, find that task first
    query = compute_task_embedding(loaded.model, loaded.tokenizer, task_examples("upper", 200, seed=12345),
                                   recipe, model_name=loaded.name, init=init).tensor
    scores = {task: similarity(query, store.get("demo", task).task_embedding, init) for task in metas}
    assert max(scores, key=scores.get) == "upper"


def test_seeding_adds_task_embeddings_to_a_store_seeded_without_them(loaded, tmp_path):
    from promptmux.prompts.task_embedding import TASK_EMBEDDING_EXTRA_KEY
    from promptmux.serving.demo.task_embeddings import EMBEDDING_TENSOR

    directory = tmp_path / "demo_prompts"
    shutil.copytree(ASSETS_DIR / "demo_prompts", directory)
    without = tmp_path / "without"
    without.mkdir()
    for path in directory.glob("*.safetensors"):  # the files as shipped before they carried embeddings
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata()
            tensors = {k: handle.get_tensor(k) for k in handle.keys() if k != EMBEDDING_TENSOR}
        save_file(tensors, str(without / path.name), metadata={k: v for k, v in header.items() if k != "task_embedding"})
    store = PromptStore(tmp_path / "store", d_model=loaded.d_model, max_length=64)
    old = seed_demo_prompts(store, directory=without)
    assert all(TASK_EMBEDDING_EXTRA_KEY not in meta.extra for meta in old.values())
    upgraded = seed_demo_prompts(store, directory=directory)
    assert all(meta.version == 2 and meta.published and TASK_EMBEDDING_EXTRA_KEY in meta.extra
               for meta in upgraded.values())
    assert all(upgraded[t].content_hash == old[t].content_hash for t in old)  # the same prompts
    assert seed_demo_prompts(store, directory=directory) == upgraded  # and then nothing more
