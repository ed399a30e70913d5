"""Factorized prompts: trained jointly as [language; task], registered apart, composed per request."""
from __future__ import annotations

import json

import pytest
import torch

from promptmux.prompts import make_task_data
from promptmux.prompts.factorized import FactorizedConfig, read_pairs_jsonl, train_factorized
from promptmux.prompts.store import PromptStore
from promptmux.serving.cli import main as cli
from promptmux.serving.config import ModelConfig, PromptmuxConfig
from promptmux.serving.engine.core import Engine
from promptmux.prompts.errors import PromptmuxError
from promptmux.serving.rpc.convert import pb, request_from_pb
from promptmux.serving.model.loading import load_model
from promptmux.serving.engine.types import GenerationParams, GenerationRequest

TINY = ["--model", "random:tiny"]


@pytest.fixture(scope="module")
def factorized_store(tmp_path_factory):
    """A store holding factorized prompts trained (briefly) by the CLI on two pairs."""
    root = tmp_path_factory.mktemp("factorized")
    data, dev = root / "pairs.jsonl", root / "pairs-dev.jsonl"
    assert make_task_data.main(["--pairs", "upper:reverse,plain:rotate", "--count", "24", str(data)]) == 0
    assert make_task_data.main(["--pairs", "upper:reverse,upper:rotate", "--count", "4", "--seed", "9",
                                "--exclude", str(data), str(dev)]) == 0
    store_dir = root / "store"
    assert cli.main(["prompts", "train-factorized", *TINY, "--store", str(store_dir), "--tenant", "acme",
                     "--data", str(data), "--dev", str(dev), "--length", "3", "--steps", "2", "--batch-size", "8",
                     "--eval-every", "2", "--no-progress"]) == 0
    return store_dir


def test_pairs_data_has_language_and_task_fields(tmp_path):
    path = tmp_path / "p.jsonl"
    make_task_data.main(["--pairs", "caesar:sort", "--count", "3", str(path)])
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 3 and all(r["language"] == "caesar" and r["task"] == "sort" for r in rows)
    assert all(r["target"] == "".join(chr((ord(c) - 97 + 3) % 26 + 97) if c.islower() else c
                                      for c in sorted(r["input"])) for r in rows)
    assert list(read_pairs_jsonl(path)) == [("caesar", "sort")]


def test_each_prompt_is_registered_as_its_own_task(factorized_store):
    store = PromptStore(factorized_store, d_model=64, max_length=64)
    tasks = {m.task: m for m in store.list("acme")}
    assert set(tasks) == {"lang-plain", "lang-upper", "task-reverse", "task-rotate"}
    assert tasks["lang-upper"].extra["role"] == "language" and tasks["task-rotate"].extra["role"] == "task"
    assert tasks["lang-upper"].extra["order"] == "language;task" and tasks["lang-upper"].length == 3
    assert tasks["lang-upper"].extra["init_texts"] == {} and tasks["lang-upper"].extra["schedule"] == "constant"
    assert sorted(map(tuple, tasks["task-reverse"].extra["trained_pairs"])) == [("plain", "rotate"), ("upper", "reverse")]
    assert set(tasks["task-reverse"].extra["dev_exact_match"]) == {"upper+reverse", "upper+rotate"}  # unseen pair too


def test_composed_requests_equal_the_prompt_concatenated_by_hand_in_a_mixed_batch(factorized_store):
    engine = Engine.from_config(PromptmuxConfig.from_dict(
        {"model": {"source": "random:tiny"}, "store": {"root": str(factorized_store), "max_prompt_length": 64}}))
    store = engine.store
    by_hand = torch.cat([store.get("acme", "lang-upper").tensor, store.get("acme", "task-rotate").tensor])
    store.register("acme", "upper-rotate-by-hand", by_hand)
    engine.refresh_prompts()
    params = pb.GenerationParams(max_new_tokens=12)
    texts = ["hello", "abc123", "a much longer input string"]
    composed = [request_from_pb(pb.GenerateRequest(language="lang-upper", task="task-rotate", text=t, params=params,
                                                   request_id=f"c{i}"), "acme") for i, t in enumerate(texts)]
    assert composed[0].prompt_segments == ("lang-upper", "task-rotate")
    manual = [GenerationRequest(tenant="acme", text=t, task="upper-rotate-by-hand",
                                params=GenerationParams(max_new_tokens=12)) for t in texts]
    others = [GenerationRequest(tenant="acme", text=t, task="task-reverse", params=GenerationParams(max_new_tokens=12))
              for t in texts]
    batch = [row for trio in zip(composed, others, manual) for row in trio]  # one batch, interleaved
    output = engine.run_batch(batch)
    assert output.stats.batch_size == 9 and output.stats.distinct_tasks >= 3
    results = output.results
    assert not [r for r in results if isinstance(r, PromptmuxError)]
    for i in range(len(texts)):
        together, by_hand_row = results[3 * i], results[3 * i + 2]
        assert together.token_ids == by_hand_row.token_ids and together.prompt_tokens == by_hand_row.prompt_tokens == 6
        assert [v.task for v in together.prompt_versions] == ["lang-upper", "task-rotate"]
        alone = engine.run_batch([composed[i]]).results[0]
        assert alone.token_ids == together.token_ids


def test_only_the_prompts_learn_and_every_pair_mixes_in_a_batch():
    loaded = load_model(ModelConfig(source="random:tiny"))
    before = {name: p.detach().clone() for name, p in loaded.model.named_parameters()}
    from promptmux.prompts.synthetic_tasks import pair_examples

    train = {("upper", "reverse"): pair_examples("upper", "reverse", 16, seed=1),
             ("plain", "sort"): pair_examples("plain", "sort", 16, seed=2)}
    config = FactorizedConfig(tenant="acme", language_length=2, task_length=3, steps=3, batch_size=8, eval_every=3,
                              max_dev_examples=4, seed=0, progress=False)
    result = train_factorized(loaded.model, loaded.tokenizer, train, train, config)
    assert all(torch.equal(p, before[name]) for name, p in loaded.model.named_parameters())
    assert set(result.languages) == {"plain", "upper"} and set(result.tasks) == {"reverse", "sort"}
    assert result.compose("upper", "sort").shape == (5, 64)  # an unseen pair composes
    assert set(result.pair_scores) == set(train) and len(result.train_losses) == 3


def test_a_prompt_named_in_init_texts_starts_from_that_text_and_the_rest_from_vocabulary_rows():
    from promptmux.prompts.synthetic_tasks import pair_examples
    from promptmux.prompts.tuning import text_prompt

    loaded = load_model(ModelConfig(source="random:tiny"))
    train = {("upper", "reverse"): pair_examples("upper", "reverse", 8, seed=1)}
    # warmup makes the first step's rate lr / warmup_steps, tiny here: the prompts stay at their init
    config = FactorizedConfig(tenant="acme", language_length=7, task_length=7, steps=2, warmup_steps=1, lr=1e-12,
                              batch_size=4, eval_every=2, schedule="cosine", seed=0, progress=False,
                              init_texts={"upper": "upper: "})
    result = train_factorized(loaded.model, loaded.tokenizer, train, {}, config)
    embeddings = loaded.model.get_input_embeddings().weight.detach().float()
    expected = text_prompt(embeddings, loaded.tokenizer, "upper: ", 7)  # [7, D]
    assert torch.allclose(result.languages["upper"], expected, atol=1e-6)
    assert not torch.allclose(result.tasks["reverse"], expected, atol=1e-3)


def test_train_factorized_rejects_an_init_text_for_a_name_the_data_lacks(tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    assert make_task_data.main(["--pairs", "upper:reverse", "--count", "8", str(data)]) == 0
    code = cli.main(["prompts", "train-factorized", *TINY, "--store", str(tmp_path / "store"), "--data", str(data),
                     "--init-text", "caesar=caesar: ", "--steps", "1", "--no-progress", "--no-register"])
    assert code == 1
    error = capsys.readouterr().err
    assert "'caesar', which is no language or task in the data" in error and "reverse, upper" in error
