"""Per-request failure isolation in the engine: whatever belongs to one request (its
parameters, its text, its prompt's loading, d_model or deletion, its room in the prompt
bank) fails that request alone, and its batch-mates return exactly what they return alone."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from promptmux.prompts.store import PromptStore
from promptmux.serving.config import EngineConfig, ModelConfig
from promptmux.serving.engine.core import Engine
from promptmux.prompts.errors import (
    InvalidRequestError,
    PromptmuxError,
    PromptUnusableError,
    ResourceExhaustedError,
    TaskNotFoundError,
)
from promptmux.serving.model.loading import load_model
from promptmux.serving.engine.types import GenerationParams, GenerationRequest, GenerationResult

D_MODEL = 256  # random:embedded


@pytest.fixture(scope="module")
def loaded():
    return load_model(ModelConfig(source="random:embedded", dtype="float32"))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    store = PromptStore(tmp_path_factory.mktemp("isolation-store"), d_model=D_MODEL, max_length=128)
    generator = torch.Generator().manual_seed(7)
    for task, length in {"t4": 4, "t9": 9, "t17": 17, "t50": 50, "t100": 100}.items():
        store.register("acme", task, 0.05 * torch.randn(length, D_MODEL, generator=generator))
    store.register("globex", "g6", 0.05 * torch.randn(6, D_MODEL, generator=generator))
    return store


def make_engine(loaded, store, **config) -> Engine:
    settings = dict(max_input_tokens=64, max_new_tokens_limit=32, prompt_cache_rows=1024, prompt_cache_page_rows=16)
    return Engine(loaded, store, EngineConfig(**{**settings, **config}))


@pytest.fixture(scope="module")
def engine(loaded, store):
    return make_engine(loaded, store)


def good_requests() -> list[GenerationRequest]:
    """Well-formed requests of two tenants and every decoding program. One sampling row only:
    the poison rows around it must not change its draws."""
    return [
        GenerationRequest("acme", "hello world", "t4", params=GenerationParams(max_new_tokens=12)),
        GenerationRequest("globex", "abc", "g6", params=GenerationParams(max_new_tokens=9)),
        GenerationRequest("acme", "beam me", "t9", params=GenerationParams(max_new_tokens=6, strategy="beam", num_beams=3)),
        GenerationRequest("globex", "sampled", "g6", params=GenerationParams(max_new_tokens=10, strategy="sample",
                                                                      temperature=0.8, top_p=0.9, seed=11)),
    ]


_ALONE: dict = {}


def alone(engine: Engine, request) -> GenerationResult:
    """The request's result in a batch of its own (computed once per engine and request)."""
    key = (id(engine), request.request if hasattr(request, "request") else request)
    if key not in _ALONE:
        (result,) = engine.run_batch([request]).results
        assert isinstance(result, GenerationResult), result
        _ALONE[key] = result
    return _ALONE[key]


def assert_equal_to_alone(engine: Engine, requests, results) -> None:
    for request, result in zip(requests, results):
        assert isinstance(result, GenerationResult), result
        expected = alone(engine, request)
        assert (result.token_ids, result.finish_reason) == (expected.token_ids, expected.finish_reason)


def sample(**params) -> GenerationParams:
    return GenerationParams(max_new_tokens=8, strategy="sample", **params)


POISON = {
    "underflowing temperature": (sample(temperature=1e-300), "temperature=1e-300 is invalid"),
    "subnormal temperature": (sample(temperature=1e-40), "temperature=1e-40 is invalid"),
    "overflowing temperature": (sample(temperature=1e39), "temperature=1e+39 is invalid"),
    "NaN temperature": (sample(temperature=float("nan")), "temperature=nan is invalid"),
    "infinite temperature": (sample(temperature=float("inf")), "temperature=inf is invalid"),
    "non-number temperature": (sample(temperature="hot"), "temperature='hot' is not a number"),
    "underflowing top_p": (sample(top_p=1e-300), "top_p=1e-300 is invalid"),
    "zero top_p": (sample(top_p=0.0), "top_p=0.0 is invalid"),
    "NaN top_p": (sample(top_p=float("nan")), "top_p=nan is invalid"),
    "seed past 64 bits": (sample(seed=2**64), "seed=18446744073709551616 is out of range"),
    "huge length penalty": (GenerationParams(strategy="beam", num_beams=2, length_penalty=1e300), "length_penalty=1e+300"),
    "overflowing length penalty": (GenerationParams(strategy="beam", num_beams=2, length_penalty=-60.0),
                                   "length_penalty=-60.0 is out of range"),
    "beams": (GenerationParams(strategy="beam", num_beams=10**9), "num_beams=1000000000 is out of range"),
    "max_new_tokens": (GenerationParams(max_new_tokens=2**40), "max_new_tokens=1099511627776 is out of range"),
    "bool max_new_tokens": (GenerationParams(max_new_tokens=True), "max_new_tokens=True is not an integer"),
}


def test_poison_parameters_fail_alone_and_batch_mates_match_alone(engine):
    good = good_requests()
    poison = [GenerationRequest("mallory", "hello", None, params=params) for params, _ in POISON.values()]
    # Interleaved, so every decoding group would hold a poison row if one got through.
    mates = good[:3] * 4 + good[3:]  # one sampling row: rows of one sampling group share an RNG today
    batch = [r for pair in zip(poison, mates) for r in pair] + poison[len(mates):]
    results = engine.run_batch(batch).results
    by_request = {id(r): result for r, result in zip(batch, results)}
    for (name, (_, message)), request in zip(POISON.items(), poison):
        error = by_request[id(request)]
        assert isinstance(error, InvalidRequestError), (name, error)
        assert message in str(error), (name, str(error))
    goods = [r for r in batch if r.tenant != "mallory"]
    assert len(goods) == len(mates)
    assert_equal_to_alone(engine, goods, [by_request[id(r)] for r in goods])


def test_text_that_is_not_unicode_or_too_large_fails_alone(engine):
    good = good_requests()
    limit = engine.config.input_bytes_limit
    assert limit == 64 * 32  # derived from max_input_tokens
    bad = [
        GenerationRequest("mallory", "a\ud800b", "t4"),  # a lone surrogate: not encodable
        GenerationRequest("mallory", "é" * (limit // 2 + 1), "t4"),  # under the limit in characters, over in bytes
        GenerationRequest("mallory", "x" * 30_000_000, "t4"),
        GenerationRequest("mallory", b"bytes", "t4"),
    ]
    results = engine.run_batch(bad + good).results
    assert "not valid Unicode" in str(results[0])
    assert f"is {limit + 2} bytes (UTF-8), over the limit of {limit} (engine.max_input_bytes)" in str(results[1])
    assert "is 30000000 bytes" in str(results[2])
    assert "expected a string" in str(results[3])
    assert all(isinstance(r, InvalidRequestError) for r in results[:4])
    assert_equal_to_alone(engine, good, results[4:])


def test_a_prompt_deleted_between_prepare_and_batch_fails_alone(loaded, store):
    # Without the host tier: with it, prepare reads the prompt at admission, and the batch serves
    # the version the request was admitted with (tests/test_engine.py, the cold-task test).
    engine = make_engine(loaded, store, prompt_host_cache_rows=0)
    store.register("acme", "doomed", 0.05 * torch.randn(5, D_MODEL))
    engine.refresh_prompts()
    good = good_requests()
    prepared = [engine.prepare(r) for r in good]
    doomed = engine.prepare(GenerationRequest("acme", "hello", "doomed"))  # resolved, never loaded
    store.delete("acme", "doomed")
    results = engine.run_batch([prepared[0], doomed, *prepared[1:]]).results
    assert isinstance(results[1], TaskNotFoundError)
    assert "prompt 'doomed' of tenant 'acme' (version 1) was deleted after this request was accepted" in str(results[1])
    assert_equal_to_alone(engine, good, [results[0], *results[2:]])
    assert engine.bank.cached_versions >= 1 and all(e.pins == 0 for e in engine.bank._entries.values())


def test_a_prompt_of_another_d_model_fails_alone(engine, store):
    narrow = PromptStore(store.root, d_model=128, max_length=128)  # the same directory, another width
    narrow.register("acme", "narrow", 0.05 * torch.randn(5, 128))
    engine.refresh_prompts()
    good = good_requests()
    results = engine.run_batch([GenerationRequest("acme", "hi", "narrow"), *good]).results
    assert isinstance(results[0], PromptUnusableError) and results[0].status == "FAILED_PRECONDITION"
    assert "was made for d_model 128, but the served model's d_model is 256" in str(results[0])
    assert_equal_to_alone(engine, good, results[1:])
    # An index that claims the model's d_model for a file that holds another (stale metadata):
    # the bank's load check catches it, for this request only.
    ready = engine.prepare(GenerationRequest("acme", "hi", "t4"))
    meta = engine.tasks.namespace.resolve("acme", "narrow")
    lying = dataclasses.replace(ready, prompts=(dataclasses.replace(meta, d_model=D_MODEL),))
    results = engine.run_batch([lying, *good]).results
    assert isinstance(results[0], PromptUnusableError)
    assert "has shape [5, 128], but this model needs [5, 256]" in str(results[0])
    assert_equal_to_alone(engine, good, results[1:])


def test_an_unreadable_prompt_file_fails_alone(loaded, store):
    engine = make_engine(loaded, store, prompt_host_cache_rows=0)  # the batch, not prepare, reads it (see above)
    store.register("acme", "corrupt", 0.05 * torch.randn(5, D_MODEL))
    engine.refresh_prompts()
    ready = engine.prepare(GenerationRequest("acme", "hi", "corrupt"))
    (path,) = (store.root / "acme" / "corrupt").glob("v*.safetensors")
    path.write_bytes(path.read_bytes()[:40])  # torn after the index read it
    good = good_requests()
    results = engine.run_batch([*good, ready]).results
    assert isinstance(results[-1], PromptmuxError) and results[-1].status == "FAILED_PRECONDITION", results[-1]
    assert "task 'corrupt' of tenant 'acme' is unreadable in the prompt store" in str(results[-1])
    assert_equal_to_alone(engine, good, results[:-1])
    store.delete("acme", "corrupt")
    engine.refresh_prompts()


def test_bank_capacity_fails_only_the_request_that_does_not_fit(loaded, store):
    small = make_engine(loaded, store, prompt_cache_rows=64, prompt_cache_page_rows=16)  # 4 pages
    fits = GenerationRequest("acme", "first", "t50", params=GenerationParams(max_new_tokens=8))  # 4 pages
    no_room = GenerationRequest("acme", "second", "t17", params=GenerationParams(max_new_tokens=8))  # 2 more pages
    too_big = GenerationRequest("acme", "third", "t100", params=GenerationParams(max_new_tokens=8))  # 7 pages > 4
    empty_prompt = GenerationRequest("globex", "no prompt", None, params=GenerationParams(max_new_tokens=8))
    results = small.run_batch([fits, no_room, too_big, empty_prompt]).results
    assert isinstance(results[1], ResourceExhaustedError) and "pinned by batches in flight" in str(results[1])
    assert isinstance(results[2], ResourceExhaustedError) and "raise engine.prompt_cache_rows" in str(results[2])
    assert_equal_to_alone(small, [fits, empty_prompt], [results[0], results[3]])
    assert isinstance(alone(small, no_room), GenerationResult)  # alone it fits: the failure was capacity


def test_a_decoding_failure_of_one_row_fails_that_row_alone(engine):
    """Defence in depth behind validation: if one row still breaks its decoding group (here a
    prepared request that skipped validation), the group's other rows are decoded alone."""
    good = good_requests()
    prepared = [engine.prepare(r) for r in good]
    sampler = prepared[3]
    # No temperature at all: building the group's per-row tensors fails (the per-row sampler
    # itself takes any float, even one that is 0 in float32, so a value cannot break it).
    bad_params = dataclasses.replace(sampler.request.params, temperature=None)
    poisoned = dataclasses.replace(sampler, request=dataclasses.replace(sampler.request, params=bad_params))
    results = engine.run_batch([*prepared, poisoned]).results
    assert isinstance(results[-1], PromptmuxError) and results[-1].status == "INTERNAL"
    assert "it failed alone" in str(results[-1])
    assert_equal_to_alone(engine, good, results[:-1])
