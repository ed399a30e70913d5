"""Prompt tuning: only the prompt learns, it learns a task, and it serves as it was trained."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from promptmux.prompts.store import PromptStore
from promptmux.prompts.synthetic_tasks import task_examples, write_jsonl
from promptmux.prompts.tuning import (
    TrainConfig,
    encode_batch,
    evaluate,
    initial_prompt,
    prompt_loss,
    read_jsonl,
    register_prompt,
    tune_prompt,
)
from promptmux.serving.cli import main as cli
from promptmux.serving.config import EngineConfig, ModelConfig
from promptmux.serving.engine.core import Engine
from promptmux.prompts.errors import InvalidRequestError
from promptmux.serving.model.loading import load_model
from promptmux.serving.engine.types import GenerationParams, GenerationRequest

SPACE_ID = 35  # ByT5: byte 0x20 + 3 special ids


@pytest.fixture(scope="module")
def tiny():
    return load_model(ModelConfig(source="random:tiny"))


@pytest.fixture(scope="module")
def embedded():
    return load_model(ModelConfig(source="embedded"))


def tiny_store(tmp_path, loaded) -> PromptStore:
    return PromptStore(tmp_path / "store", d_model=loaded.d_model, max_length=64)


def quick_config(**overrides) -> TrainConfig:
    base = TrainConfig(tenant="acme", task="reverse", prompt_length=4, steps=3, batch_size=8,
                       eval_every=100, early_checkpoint_step=2, max_new_tokens=20, progress=False)
    return dataclasses.replace(base, **overrides)


# ---------------------------------------------------------------- initialisation
def test_random_uniform_init_is_lester_scale(tiny):
    prompt, source = initial_prompt(tiny.model, tiny.tokenizer, quick_config(init="random-uniform", prompt_length=50))
    assert prompt.shape == (50, tiny.d_model)
    assert prompt.abs().max() <= 0.5 and prompt.abs().max() > 0.45
    assert source == "random-uniform:0.5"


def test_vocab_init_takes_distinct_embedding_rows(tiny):
    prompt, _ = initial_prompt(tiny.model, tiny.tokenizer, quick_config(init="vocab", prompt_length=20))
    table = tiny.model.get_input_embeddings().weight.detach()  # [V, D]
    matches = [(table == row).all(dim=1).nonzero().flatten().tolist() for row in prompt]
    assert all(len(m) == 1 for m in matches)  # each row is exactly one token's embedding
    assert len({m[0] for m in matches}) == 20  # sampled without replacement


def test_text_init_places_the_text_right_before_the_input(tiny):
    config = quick_config(init="text", init_text="rev: ", prompt_length=8)
    prompt, source = initial_prompt(tiny.model, tiny.tokenizer, config)
    table = tiny.model.get_input_embeddings().weight.detach()
    expected_ids = [SPACE_ID] * 3 + [ord(c) + 3 for c in "rev: "]
    assert torch.equal(prompt, table[torch.tensor(expected_ids)])
    assert source == "text:'rev: '"


def test_text_longer_than_the_prompt_is_rejected_with_a_fix(tiny):
    with pytest.raises(InvalidRequestError, match=r"has 9 tokens but the prompt length is 4.*--length"):
        initial_prompt(tiny.model, tiny.tokenizer, quick_config(init="text", init_text="reverse: "))


def test_config_errors_say_what_is_missing():
    with pytest.raises(InvalidRequestError, match="needs init_text"):
        quick_config(init="text").validate()
    with pytest.raises(InvalidRequestError, match="--init-from"):
        quick_config(init="prompt").validate()
    with pytest.raises(InvalidRequestError, match="optimizer 'lbfgs' is unknown"):
        quick_config(optimizer="lbfgs").validate()
    with pytest.raises(InvalidRequestError, match="resolve them with prompts/transfer.py"):
        initial_prompt(None, None, quick_config(init="retrieved"))


def test_spot_init_starts_from_the_stored_prompt_exactly(tiny, tmp_path):
    store = tiny_store(tmp_path, tiny)
    source = torch.randn(6, tiny.d_model, generator=torch.Generator().manual_seed(3))
    meta = store.register("globex", "source-task", source, shared=True)
    train = task_examples("reverse", 8, seed=1)
    # Found through the shared lookup: another tenant's shared prompt, named `owner/task`.
    config = quick_config(init="prompt", init_from_task="globex/source-task", prompt_length=None, batch_size=8, steps=1)
    start, description = initial_prompt(tiny.model, tiny.tokenizer, config, store)
    assert torch.equal(start, source)
    assert description == f"prompt:globex/source-task@v{meta.version}"

    result = tune_prompt(tiny.model, tiny.tokenizer, train, [], config, store=store)
    # The first step's loss is the stored prompt's loss on the (whole, one-batch) training set.
    batch = encode_batch(tiny.tokenizer, train, torch.device("cpu"))
    with torch.no_grad():
        expected = prompt_loss(tiny.model, source, batch).item()
    assert result.train_losses[0] == pytest.approx(expected, rel=1e-5)
    assert result.init_source == description
    assert not torch.equal(result.prompt, source)  # and then it trained


def test_spot_init_with_a_different_length_is_rejected(tiny, tmp_path):
    store = tiny_store(tmp_path, tiny)
    store.register("acme", "source-task", torch.zeros(6, tiny.d_model))
    config = quick_config(init="prompt", init_from_task="source-task", prompt_length=4)
    with pytest.raises(InvalidRequestError, match="has 6 rows but prompt_length is 4"):
        initial_prompt(tiny.model, tiny.tokenizer, config, store)


# ---------------------------------------------------------------- training mechanics
def test_only_the_prompt_changes(tiny):
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    train = task_examples("upper", 16, seed=2)
    result = tune_prompt(tiny.model, tiny.tokenizer, train, [], quick_config(init="random-uniform", steps=2))
    after = tiny.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in tiny.model.parameters())
    assert len(result.train_losses) == 2


def test_early_checkpoint_is_the_prompt_after_early_steps(tiny, tmp_path):
    train = task_examples("copy", 32, seed=4)
    long_run = tune_prompt(tiny.model, tiny.tokenizer, train, [],
                           quick_config(steps=5, early_checkpoint_step=2, output_dir=tmp_path / "run"))
    short_run = tune_prompt(tiny.model, tiny.tokenizer, train, [], quick_config(steps=2))
    assert torch.equal(long_run.early_prompt, short_run.prompt)
    assert not torch.equal(long_run.early_prompt, long_run.prompt)
    saved = {name: load_file(str(tmp_path / "run" / f"{name}.safetensors"))["prompt"] for name in ("best", "early")}
    assert torch.equal(saved["best"], long_run.prompt)
    assert torch.equal(saved["early"], long_run.early_prompt)
    assert len(json.loads((tmp_path / "run" / "history.json").read_text())["train_losses"]) == 5
    assert (tmp_path / "run" / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_best_checkpoint_scores_what_its_history_says(tiny):
    train = task_examples("first", 64, seed=5)
    dev = task_examples("first", 24, seed=6)
    config = quick_config(task="first", init="random-uniform", steps=6, eval_every=2, optimizer="adam", lr=0.3)
    result = tune_prompt(tiny.model, tiny.tokenizer, train, dev, config)
    assert [p.step for p in result.history] == [2, 4, 6]
    assert result.best == max(result.history, key=lambda p: (p.exact_match, -p.loss))
    exact, loss, _ = evaluate(tiny.model, tiny.tokenizer, result.prompt, dev)
    assert exact == result.best.exact_match
    assert loss == pytest.approx(result.best.loss, rel=1e-5)


def test_read_jsonl_reports_the_bad_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"input": "ab", "target": "ba"}\n{"input": "cd"}\n')
    with pytest.raises(InvalidRequestError, match=r"data.jsonl:2 must be an object with string fields"):
        read_jsonl(path)


# ---------------------------------------------------------------- learning, storing, serving
@pytest.fixture(scope="module")
def learnt(embedded):
    """A task learnt by prompt tuning alone from a random-uniform prompt (about 30 s here).

    On the shipped weights caesar, 16 rows at Adam 0.3, went from 0.00 to 0.96 dev exact
    match by step 25 and 0.98 by step 75 (on the previous weights reverse reached 0.84 and
    upper 0.87 by step 60 of 90): a random prompt starts far from any token embedding, so the
    budget is larger than a text-initialised prompt needs."""
    train = task_examples("caesar", 2000, seed=11)
    dev = task_examples("caesar", 100, seed=12, exclude=(e.input for e in train))
    config = TrainConfig(tenant="acme", task="caesar", prompt_length=16, init="random-uniform",
                         optimizer="adam", lr=0.3, schedule="cosine", steps=75, batch_size=32, eval_every=25,
                         early_checkpoint_step=10, max_new_tokens=24, progress=False)
    start, _ = initial_prompt(embedded.model, embedded.tokenizer, config)
    before, _, _ = evaluate(embedded.model, embedded.tokenizer, start, dev)
    return before, tune_prompt(embedded.model, embedded.tokenizer, train, dev, config), config, train, dev


def test_prompt_tuning_teaches_a_task_from_a_random_prompt(learnt):
    before, result, _, _, _ = learnt
    assert before <= 0.05
    assert result.best.exact_match >= 0.80


def test_trained_prompt_round_trips_through_the_store_and_serves_identically(learnt, embedded, tmp_path):
    _, result, config, train, dev = learnt
    store = PromptStore(tmp_path / "store", d_model=embedded.d_model, max_length=64)
    meta = register_prompt(store, result, config, model_name=embedded.name, train_examples=len(train),
                           dev_examples=len(dev))
    stored = store.get("acme", "caesar")
    assert torch.equal(stored.tensor, result.prompt)
    assert stored.meta == meta
    assert meta.extra["method"] == "prompt-tuning"
    assert meta.extra["dev_exact_match"] == result.best.exact_match
    assert meta.extra["best_step"] == result.best.step
    assert meta.extra["settings"]["init"] == "random-uniform"
    assert meta.extra["init_source"] == "random-uniform:0.5"

    _, _, trained_predictions = evaluate(embedded.model, embedded.tokenizer, result.prompt, dev)
    # evaluate() stops one token past the longest target (EOS included): serve with that budget.
    budget = max(len(embedded.tokenizer(e.target)["input_ids"]) for e in dev) + 1
    engine = Engine(embedded, store, EngineConfig(max_batch_size=len(dev)))
    served = engine.generate([
        GenerationRequest(tenant="acme", task="caesar", text=e.input, params=GenerationParams(max_new_tokens=budget))
        for e in dev
    ])
    assert [r.text for r in served] == trained_predictions


def test_cli_trains_and_registers(tiny, tmp_path):
    write_jsonl(task_examples("copy", 24, seed=7), tmp_path / "train.jsonl")
    write_jsonl(task_examples("copy", 8, seed=8), tmp_path / "dev.jsonl")
    status = cli.main([
        "prompts", "train", "--model", "random:tiny", "--store", str(tmp_path / "store"),
        "--data", str(tmp_path / "train.jsonl"), "--dev", str(tmp_path / "dev.jsonl"),
        "--tenant", "acme", "--task", "copy-tiny", "--length", "5", "--init", "vocab", "--optimizer", "adam",
        "--steps", "4", "--batch-size", "8", "--eval-every", "2", "--early-step", "1",
        "--output", str(tmp_path / "run"), "--no-progress",
    ])
    assert status == 0
    store = PromptStore(tmp_path / "store", d_model=tiny.d_model, max_length=64)
    stored = store.get("acme", "copy-tiny")
    assert stored.tensor.shape == (5, tiny.d_model)
    assert stored.meta.extra["settings"]["optimizer"] == "adam"
    assert stored.meta.extra["settings"]["lr"] == 0.1
    assert stored.meta.extra["train_examples"] == 24
    assert [p["step"] for p in stored.meta.extra["history"]] == [2, 4]
    assert torch.equal(load_file(str(tmp_path / "run" / "best.safetensors"))["prompt"], stored.tensor)
