"""The engine: a mixed-task batch gives every request exactly what it gets alone."""
from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from promptmux.kernels.t5_attention_bias import T5_BIAS_ATTENTION, assert_t5_attention
from promptmux.prompts.store import PromptStore
from promptmux.serving.config import EngineConfig, ModelConfig
from promptmux.serving.engine.core import Engine
from promptmux.prompts.errors import InvalidRequestError, PromptmuxError, TaskNotFoundError
from promptmux.serving.model.loading import load_model
from promptmux.serving.engine.types import GenerationParams, GenerationRequest

PROMPT_LENGTHS = {"t1": 1, "t3": 3, "t9": 9, "t17": 17, "t32": 32, "t50": 50, "t77": 77, "t100": 100}
ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 "


@pytest.fixture(scope="module")
def loaded():
    return load_model(ModelConfig(source="random:embedded", dtype="float32"))


@pytest.fixture(scope="module")
def eager_loaded():
    """The same weights with transformers' own attention: the unmodified model."""
    return load_model(ModelConfig(source="random:embedded", dtype="float32"))


@pytest.fixture(scope="module")
def engine(loaded, tmp_path_factory):
    store = PromptStore(tmp_path_factory.mktemp("store"), d_model=loaded.d_model, max_length=128)
    generator = torch.Generator().manual_seed(1)
    for task, length in PROMPT_LENGTHS.items():
        store.register("acme", task, 0.05 * torch.randn(length, loaded.d_model, generator=generator))
    store.register("globex", "shared-task", 0.05 * torch.randn(5, loaded.d_model, generator=generator), shared=True)
    engine = Engine(loaded, store, EngineConfig(max_input_tokens=160, max_new_tokens_limit=64,
                                                 prompt_cache_rows=1024, prompt_cache_page_rows=16))
    assert_t5_attention(loaded.model, T5_BIAS_ATTENTION)  # every attention module takes the engine's path
    return engine


def text_of_tokens(rng: random.Random, tokens: int) -> str:
    # Byte-level vocabulary: n characters are n tokens, plus EOS.
    return "".join(rng.choice(ALPHABET.strip()) for _ in range(tokens - 1))


def mixed_requests(n: int, seed: int, params: GenerationParams) -> list[GenerationRequest]:
    rng = random.Random(seed)
    tasks = list(PROMPT_LENGTHS) + [None]  # None: an empty prompt in the same batch
    lengths = [2, 128] + [rng.randint(2, 128) for _ in range(n - 2)]
    return [
        GenerationRequest(
            tenant="acme",
            text=text_of_tokens(rng, lengths[i]),
            task=tasks[i % len(tasks)],
            params=dataclasses.replace(params, max_new_tokens=rng.randint(1, params.max_new_tokens)),
            request_id=f"r{i}",
        )
        for i in range(n)
    ]


def ok(results):
    for r in results:
        assert not isinstance(r, PromptmuxError), r
    return results


def test_mixed_greedy_batch_equals_each_request_alone(engine):
    requests = mixed_requests(18, seed=0, params=GenerationParams(max_new_tokens=12))
    output = engine.run_batch(requests)
    batched = ok(output.results)
    assert output.stats.distinct_tasks == len(PROMPT_LENGTHS)
    for request, result in zip(requests, batched):
        alone = ok(engine.generate([request]))[0]
        assert result.token_ids == alone.token_ids, request.request_id
        assert len(result.token_ids) <= request.params.max_new_tokens
        assert result.request_id == request.request_id
        assert result.prompt_tokens == PROMPT_LENGTHS.get(request.task, 0)
        assert result.input_tokens == len(request.text) + 1
    assert any(len(r.token_ids) > 1 for r in batched)
    assert len({tuple(r.token_ids) for r in batched}) > len(batched) // 2  # outputs really differ


def test_mixed_beam_batch_equals_each_request_alone(engine):
    params = GenerationParams(max_new_tokens=6, strategy="beam", num_beams=3)
    requests = [dataclasses.replace(r, params=params) for r in mixed_requests(9, seed=1, params=params)]
    batched = ok(engine.generate(requests))
    for request, result in zip(requests, batched):
        assert ok(engine.generate([request]))[0].token_ids == result.token_ids


def test_rows_with_different_strategies_share_one_batch(engine):
    greedy = mixed_requests(4, seed=2, params=GenerationParams(max_new_tokens=8))
    beam = [dataclasses.replace(r, params=GenerationParams(max_new_tokens=5, strategy="beam", num_beams=2))
            for r in mixed_requests(3, seed=3, params=GenerationParams())]
    sample = [dataclasses.replace(r, params=GenerationParams(max_new_tokens=7, strategy="sample", temperature=0.8, top_p=0.9))
              for r in mixed_requests(3, seed=4, params=GenerationParams())]
    requests = greedy[:2] + beam + sample + greedy[2:]
    results = ok(engine.generate(requests))
    for request, result in zip(requests, results):
        if request.params.strategy != "sample":
            assert ok(engine.generate([request]))[0].token_ids == result.token_ids
        assert 1 <= len(result.token_ids) <= request.params.max_new_tokens


def test_sampling_is_reproducible_with_a_seed_and_top_p_tiny_is_greedy(engine):
    base = mixed_requests(1, seed=5, params=GenerationParams(max_new_tokens=10))[0]
    sampled = dataclasses.replace(base, params=GenerationParams(max_new_tokens=10, strategy="sample", temperature=1.5, seed=7))
    assert ok(engine.generate([sampled]))[0].token_ids == ok(engine.generate([sampled]))[0].token_ids
    # Same budget as `base` (mixed_requests draws its own max_new_tokens), so only the strategy differs.
    nucleus_of_one = dataclasses.replace(base, params=dataclasses.replace(base.params, strategy="sample", top_p=1e-6))
    assert ok(engine.generate([nucleus_of_one]))[0].token_ids == ok(engine.generate([base]))[0].token_ids


def test_rows_stop_at_their_own_eos(loaded, engine):
    """Make a token the model often emits the EOS id, so some rows end early and others don't."""
    requests = mixed_requests(10, seed=6, params=GenerationParams(max_new_tokens=12))
    plain = ok(engine.generate(requests))
    counts: dict[int, int] = {}
    for r in plain:
        for t in r.token_ids[1:]:
            counts[t] = counts.get(t, 0) + 1
    stop_token = max(counts, key=counts.get)
    original = (loaded.model.config.eos_token_id, loaded.model.generation_config.eos_token_id, engine.context.eos_token_id)
    loaded.model.config.eos_token_id = loaded.model.generation_config.eos_token_id = engine.context.eos_token_id = stop_token
    try:
        batched = ok(engine.generate(requests))
        reasons = {r.finish_reason for r in batched}
        assert reasons == {"eos", "length"}
        for request, result in zip(requests, batched):
            assert ok(engine.generate([request]))[0].token_ids == result.token_ids
            if result.finish_reason == "eos":
                assert result.token_ids[-1] == stop_token and result.token_ids.count(stop_token) == 1
            else:
                assert len(result.token_ids) == request.params.max_new_tokens
    finally:
        loaded.model.config.eos_token_id, loaded.model.generation_config.eos_token_id, engine.context.eos_token_id = original


def test_empty_prompt_equals_plain_generate_on_the_unmodified_model(eager_loaded, engine):
    loaded = eager_loaded
    request = GenerationRequest(tenant="acme", text="the frozen model, untouched", params=GenerationParams(max_new_tokens=10))
    ours = ok(engine.generate([request]))[0]
    ids = torch.tensor([loaded.tokenizer(request.text)["input_ids"]])
    with torch.no_grad():
        plain = loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False, num_beams=1)
    expected = plain[0, 1:].tolist()
    if loaded.model.config.eos_token_id in expected:
        expected = expected[: expected.index(loaded.model.config.eos_token_id) + 1]
    assert ours.token_ids == expected


def test_same_prompt_equals_peft_prompt_tuning(eager_loaded, engine):
    loaded = eager_loaded
    from peft import PromptTuningConfig, TaskType, get_peft_model

    prompt = engine.store.get("acme", "t17").tensor
    # The shared fixture's model must leave this test exactly as it came in: same weights, no hooks.
    weights_before = {name: tensor.clone() for name, tensor in loaded.model.state_dict().items()}
    probe = torch.tensor([loaded.tokenizer("probe the plain model")["input_ids"]])
    with torch.no_grad():
        plain_before = loaded.model.generate(input_ids=probe, max_new_tokens=8, do_sample=False, num_beams=1)
    config = PromptTuningConfig(task_type=TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=prompt.shape[0],
                                num_transformer_submodules=1, token_dim=loaded.d_model,
                                num_attention_heads=loaded.model.config.num_heads,
                                num_layers=loaded.model.config.num_layers)
    peft_model = get_peft_model(loaded.model, config)
    try:
        with torch.no_grad():
            peft_model.prompt_encoder["default"].embedding.weight.copy_(prompt)
        texts = ["short", "a somewhat longer input text for the prompt", "mid length x"]
        requests = [GenerationRequest(tenant="acme", text=t, task="t17", params=GenerationParams(max_new_tokens=10)) for t in texts]
        ours = ok(engine.generate(requests))
        for text, result in zip(texts, ours):
            ids = torch.tensor([loaded.tokenizer(text)["input_ids"]])
            with torch.no_grad():
                theirs = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False, num_beams=1)
            expected = theirs[0, 1:].tolist()
            if 1 in expected:
                expected = expected[: expected.index(1) + 1]
            assert result.token_ids == expected
    finally:
        del peft_model  # prompt tuning wraps the model; the wrapper holds the only extra state
    assert type(loaded.model).__name__ == "T5ForConditionalGeneration"  # not swapped for a wrapper
    weights_after = loaded.model.state_dict()
    assert weights_after.keys() == weights_before.keys()
    assert all(torch.equal(weights_after[name], tensor) for name, tensor in weights_before.items())
    hooked = [name for name, module in loaded.model.named_modules() if module._forward_hooks or module._forward_pre_hooks]
    assert hooked == []
    with torch.no_grad():
        plain_after = loaded.model.generate(input_ids=probe, max_new_tokens=8, do_sample=False, num_beams=1)
    assert torch.equal(plain_after, plain_before)


def test_composed_segments_equal_their_concatenation(engine):
    language = engine.store.get("acme", "t9").tensor
    task = engine.store.get("acme", "t32").tensor
    engine.store.register("acme", "t9-then-t32", torch.cat([language, task]))
    engine.refresh_prompts()
    text = "compose me"
    composed = GenerationRequest(tenant="acme", text=text, prompt_segments=("t9", "t32"), params=GenerationParams(max_new_tokens=10))
    single = GenerationRequest(tenant="acme", text=text, task="t9-then-t32", params=GenerationParams(max_new_tokens=10))
    a, b = ok(engine.generate([composed, single]))
    assert a.token_ids == b.token_ids and a.prompt_tokens == 41
    assert [v.task for v in a.prompt_versions] == ["t9", "t32"]


def test_bad_requests_fail_alone_with_clear_errors(engine):
    good = GenerationRequest(tenant="acme", text="fine", task="t1")
    bad = {
        "unknown task": (GenerationRequest(tenant="acme", text="x", task="nope"), TaskNotFoundError, "unknown task 'nope'"),
        "other tenant's private task": (GenerationRequest(tenant="globex", text="x", task="t1"), TaskNotFoundError, "unknown task 't1'"),
        "empty text": (GenerationRequest(tenant="acme", text="", task="t1"), InvalidRequestError, "text is empty"),
        "blank text": (GenerationRequest(tenant="acme", text="   ", task="t1"), InvalidRequestError, "text is empty"),
        "too long": (GenerationRequest(tenant="acme", text="y" * 200, task="t1"), InvalidRequestError, "201 tokens long, over the limit of 160"),
        "zero tokens": (GenerationRequest(tenant="acme", text="x", params=GenerationParams(max_new_tokens=0)), InvalidRequestError, "max_new_tokens=0 is out of range; expected 1..64"),
        "negative tokens": (GenerationRequest(tenant="acme", text="x", params=GenerationParams(max_new_tokens=-3)), InvalidRequestError, "max_new_tokens=-3"),
        "too many tokens": (GenerationRequest(tenant="acme", text="x", params=GenerationParams(max_new_tokens=65)), InvalidRequestError, "max_new_tokens=65"),
        "bad temperature": (GenerationRequest(tenant="acme", text="x", params=GenerationParams(strategy="sample", temperature=0)), InvalidRequestError, "temperature=0"),
        "bad top_p": (GenerationRequest(tenant="acme", text="x", params=GenerationParams(strategy="sample", top_p=1.5)), InvalidRequestError, "top_p=1.5"),
    }
    requests = [good] + [case[0] for case in bad.values()] + [good]
    results = engine.generate(requests)
    assert not isinstance(results[0], PromptmuxError) and results[0].token_ids == results[-1].token_ids
    for (name, (_, kind, message)), result in zip(bad.items(), results[1:-1]):
        assert isinstance(result, kind), name
        assert message in str(result), (name, str(result))


def test_truncate_only_when_asked(engine):
    long = GenerationRequest(tenant="acme", text="z" * 300, task="t3", truncate=True, params=GenerationParams(max_new_tokens=4))
    result = ok(engine.generate([long]))[0]
    assert result.input_tokens == 160


def test_shared_task_is_usable_by_other_tenants_by_its_owners_name(engine):
    result = ok(engine.generate([GenerationRequest(tenant="acme", text="hi", task="globex/shared-task")]))[0]
    assert [(v.tenant, v.task) for v in result.prompt_versions] == [("globex", "shared-task")]
    bare = engine.generate([GenerationRequest(tenant="acme", text="hi", task="shared-task")])[0]
    assert isinstance(bare, TaskNotFoundError)  # a share never takes a bare id


def test_new_versions_apply_after_refresh_and_pin_per_batch(engine):
    engine.store.register("acme", "evolving", 0.05 * torch.randn(6, engine.loaded.d_model))
    engine.refresh_prompts()
    request = GenerationRequest(tenant="acme", text="same input", task="evolving", params=GenerationParams(max_new_tokens=8))
    first = ok(engine.generate([request]))[0]
    engine.store.register("acme", "evolving", 0.05 * torch.randn(6, engine.loaded.d_model))
    assert ok(engine.generate([request]))[0].prompt_versions[0].version == 1  # not refreshed yet
    engine.refresh_prompts()
    second = ok(engine.generate([request]))[0]
    assert (first.prompt_versions[0].version, second.prompt_versions[0].version) == (1, 2)
    engine.store.delete("acme", "evolving")
    engine.refresh_prompts()
    assert isinstance(engine.generate([request])[0], TaskNotFoundError)


def test_streaming_callback_yields_the_final_tokens(engine):
    requests = mixed_requests(5, seed=9, params=GenerationParams(max_new_tokens=9))
    requests[2] = dataclasses.replace(requests[2], params=GenerationParams(max_new_tokens=4, strategy="beam", num_beams=2))
    streamed: dict[int, list[int]] = {}
    output = engine.run_batch(requests, on_token=lambda i, t: streamed.setdefault(i, []).append(t))
    for i, result in enumerate(ok(output.results)):
        assert streamed[i] == result.token_ids


def test_batch_larger_than_the_limit_is_refused(engine):
    limited = Engine(engine.loaded, engine.store, dataclasses.replace(engine.config, max_batch_size=2))
    with pytest.raises(InvalidRequestError, match="batch of 3 requests exceeds engine.max_batch_size=2"):
        limited.run_batch([GenerationRequest(tenant="acme", text="x")] * 3)


def test_a_cold_task_does_not_change_or_fail_its_hot_batch_mates(engine):
    """Cold prompts are read at admission (into the host tier); an unreadable one fails its own
    request, and the hot rows' outputs equal what they get without it."""
    params = GenerationParams(max_new_tokens=6)
    hot = [GenerationRequest(tenant="acme", text=f"hot row {i}", task=task, params=params)
           for i, task in enumerate(["t3", "t9", "t17"])]
    alone = [ok(engine.generate([r]))[0].token_ids for r in hot]
    d_model = engine.loaded.d_model
    engine.store.register("acme", "cold", 0.05 * torch.randn(7, d_model, generator=torch.Generator().manual_seed(5)))
    broken = engine.store.register("acme", "cold-broken", torch.zeros(4, d_model))
    engine.refresh_prompts()
    (engine.store.root / "acme" / "cold-broken" / f"v{broken.version:08d}.safetensors").write_bytes(b"\x00" * 64)
    cold = GenerationRequest(tenant="acme", text="cold row", task="cold", params=params)
    unreadable = GenerationRequest(tenant="acme", text="cold row", task="cold-broken", params=params)

    with pytest.raises(PromptmuxError, match="unreadable"):
        engine.prepare(unreadable)  # fails at admission, before it joins any batch
    prepared = [engine.prepare(r) for r in [hot[0], cold, hot[1], hot[2]]]
    reads = []
    real_get = engine.store.get
    engine.store.get = lambda *args: reads.append(args) or real_get(*args)
    try:
        results = ok(engine.run_batch(prepared).results)
    finally:
        del engine.store.get
    assert reads == []  # the batch read nothing from disk: the cold prompt came from host memory
    assert [results[i].token_ids for i in (0, 2, 3)] == alone

    mixed = engine.generate([hot[0], unreadable, hot[1], hot[2]])  # unprepared: it still fails alone
    assert isinstance(mixed[1], PromptmuxError) and "unreadable" in str(mixed[1])
    assert [ok([mixed[i]])[0].token_ids for i in (0, 2, 3)] == alone


def test_the_byte_tokenizer_fast_path_gives_the_tokenizers_ids():
    """ByT5's ids computed directly (UTF-8 bytes + 3, then EOS) equal the tokenizer's for every
    text, special-token spellings included (those take the tokenizer's path)."""
    import random

    from transformers import ByT5Tokenizer

    from promptmux.serving.engine.core import token_ids_function

    tokenizer = ByT5Tokenizer()
    fast = token_ids_function(tokenizer)
    rng = random.Random(0)
    alphabet = "abc xyz\t\n012éü漢字🙂<>/s"
    texts = ["a</s>b", "<extra_id_0>x", "</s>", "<", "", " lead"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24))) for _ in range(500)]
    for text in texts:
        assert fast(text) == tokenizer(text)["input_ids"], repr(text)
