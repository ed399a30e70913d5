"""The step executor: every row of a busy, ever-changing batch gives what it gets alone.

The tests build StepPlans by hand (`drive`: admissions, cancellations, partial steps) and run
them against the real executor, as the step scheduler would. References are Hugging Face
`generate` for the request alone (`Engine.run_batch` with one prepared request: the static
path, encoder + generate, in fp32)."""
from __future__ import annotations

import dataclasses
import pickle
import random

import pytest
import torch

from promptmux.prompts.errors import StoredPromptUnreadableError
from promptmux.prompts.store import PromptStore
from promptmux.serving.config import EngineConfig, ModelConfig
from promptmux.serving.engine.step.decode_graphs import resolve_decode_graphs
from promptmux.serving.demo.prompts import seed_demo_prompts
from promptmux.serving.engine.core import Engine
from promptmux.prompts.errors import InvalidRequestError, PromptmuxError, ResourceExhaustedError, TaskNotFoundError
from promptmux.serving.model.loading import load_model
from promptmux.serving.engine.types import GenerationParams, GenerationRequest, GenerationResult, PreparedRequest
from promptmux.serving.engine.plan import StepPlan
from promptmux.serving.engine.step.executor import StepExecutor

PROMPT_LENGTHS = {"p1": 1, "p23": 23, "p64": 64, "p100": 100}  # plus None: no prompt at all
GREEDY = GenerationParams(max_new_tokens=64)


def make_engine(source: str, tmp_path_factory, device: str = "cpu", **config) -> Engine:
    loaded = load_model(ModelConfig(source=source, dtype="float32", device=device))
    store = PromptStore(tmp_path_factory.mktemp("store"), d_model=loaded.d_model, max_length=128)
    generator = torch.Generator().manual_seed(3)
    for task, length in PROMPT_LENGTHS.items():
        store.register("acme", task, 0.05 * torch.randn(length, loaded.d_model, generator=generator))
    if source == "embedded":
        seed_demo_prompts(store)
    settings = dict(max_batch_size=4, max_input_tokens=128, max_new_tokens_limit=64, prompt_cache_rows=1024)
    settings.update(config)
    return Engine(loaded, store, EngineConfig(**settings))


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> Engine:
    return make_engine("embedded", tmp_path_factory)


@pytest.fixture(scope="module")
def t5_small(tmp_path_factory) -> Engine:
    return make_engine("random:t5-small", tmp_path_factory)


def prepared_request(engine: Engine, rng: random.Random, *, task: str | None, input_tokens: int,
                     params: GenerationParams, tenant: str = "acme", name: str = "") -> PreparedRequest:
    """A request of exactly `input_tokens` encoder tokens (byte ids, then EOS)."""
    text = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(input_tokens - 1))
    prepared = engine.prepare(GenerationRequest(tenant=tenant, text=text or "x", task=task, params=params,
                                                request_id=name))
    return dataclasses.replace(prepared, token_ids=prepared.token_ids[-input_tokens:])  # 1 token: EOS alone


def alone(engine: Engine, prepared: PreparedRequest) -> GenerationResult:
    result = engine.run_batch([prepared]).results[0]
    assert isinstance(result, GenerationResult), result
    return result


def drive(executor: StepExecutor, arrivals: dict[int, list[tuple[object, PreparedRequest]]],
          cancel_at: dict[int, list[object]] | None = None,
          partial=None) -> dict[object, GenerationResult | PromptmuxError]:
    """Run the executor with hand-built plans until all work is done. `arrivals[k]` join the
    queue before step k and are admitted as slots free up; `cancel_at[k]` are cancelled before
    step k; `partial(k, active handles in admission order)` may return (limit, handles): step k
    then runs those handles first and `limit` rows only. Checks that every plan and its outputs
    pickle, that every request's streamed tokens add up to its result, that it ends exactly
    once, and that a partial step advances exactly `limit` rows, the named ones among them."""
    queue: list[tuple[object, PreparedRequest]] = []
    done: dict[object, GenerationResult | PromptmuxError] = {}
    streamed: dict[object, list[int]] = {}
    active: list[object] = []
    step = 0
    while step <= max(arrivals, default=0) or queue or executor.active_slots:
        queue.extend(arrivals.get(step, []))
        cancel = [handle for handle in (cancel_at or {}).get(step, []) if handle in active]
        for handle in cancel:
            done[handle] = None  # type: ignore[assignment]
        active = [handle for handle in active if handle not in done]
        take = min(len(queue), executor.slots - len(active))
        batch, queue = queue[:take], queue[take:]
        active.extend(handle for handle, _ in batch)
        chosen = partial(step, list(active)) if partial is not None else None
        limit, first = chosen if chosen is not None else (None, [])
        plan = StepPlan(cancel=tuple(cancel), admit=tuple(batch), run_first=tuple(first), row_limit=limit)
        outputs = executor.execute(pickle.loads(pickle.dumps(plan)))
        outputs = pickle.loads(pickle.dumps(outputs))
        for handle, error in outputs.errors.items():  # failed alone at admission
            assert handle in dict(batch) and handle not in done and handle not in outputs.stepped
            done[handle] = error
        running = [handle for handle in active if handle not in done]
        if chosen is not None:
            assert len(outputs.stepped) == min(limit, len(running)) and set(first) <= set(outputs.stepped)
        else:
            assert sorted(outputs.stepped, key=str) == sorted(running, key=str)
        for handle, token in zip(outputs.stepped, outputs.tokens):
            assert handle not in done, f"{handle} produced after it ended"
            streamed.setdefault(handle, []).append(token)
        for handle, result in outputs.finished.items():
            done[handle] = result
            assert result.token_ids == streamed[handle]
        assert outputs.active_slots == executor.active_slots == len([h for h in running if h not in done])
        step += 1
        assert step < 1000
    assert executor.active_slots == 0
    return done


def mixed_arrivals(engine: Engine, seed: int, count: int, sampling_every: int = 3, longest: int = 64):
    """`count` requests over prompt lengths 0..100, inputs 1..128 and max_new_tokens 1..64
    (one of 64, one of 1, the rest up to `longest`), arriving over several steps; every
    `sampling_every`-th one samples."""
    rng = random.Random(seed)
    tasks = [None, *PROMPT_LENGTHS]
    inputs = [1, 128] + [rng.randint(1, 128) for _ in range(count - 2)]
    budgets = [64, 1] + [rng.randint(1, longest) for _ in range(count - 2)]
    arrivals: dict[int, list] = {}
    requests = {}
    for i in range(count):
        params = dataclasses.replace(GREEDY, max_new_tokens=budgets[i])
        if i % sampling_every == sampling_every - 1:
            params = dataclasses.replace(params, strategy="sample", temperature=1.3, top_p=0.9, seed=i)
        prepared = prepared_request(engine, rng, task=tasks[i % len(tasks)], input_tokens=inputs[i], params=params,
                                    name=f"r{i}")
        requests[f"r{i}"] = prepared
        arrivals.setdefault(rng.choice([0, 0, 1, 3, 7, 12]), []).append((f"r{i}", prepared))
    return requests, arrivals


@pytest.mark.parametrize("model", ["embedded", "t5_small"])
def test_greedy_rows_equal_generate_alone_with_staggered_admission(model, request):
    engine = request.getfixturevalue(model)
    count = 12 if model == "embedded" else 6
    requests, arrivals = mixed_arrivals(engine, seed=11, count=count, longest=64 if model == "embedded" else 24)
    executor = StepExecutor(engine.context)
    results = drive(executor, arrivals)
    greedy = 0
    for name, prepared in requests.items():
        result = results[name]
        assert isinstance(result, GenerationResult), result
        assert 1 <= len(result.token_ids) <= prepared.params.max_new_tokens
        assert result.request_id == name and result.input_tokens == len(prepared.token_ids)
        if prepared.params.strategy == "greedy":
            assert result.token_ids == alone(engine, prepared).token_ids, name
            greedy += 1
    assert greedy >= count * 2 // 3
    assert len({tuple(r.token_ids) for r in results.values()}) > count // 2  # outputs really differ


def test_rows_that_wait_a_step_resume_exactly_where_they_were(embedded):
    """Partial steps (put_first + step(limit)) as the scheduler runs them next to a light
    tenant: rows are swapped across slots and wait for steps, and every request still ends
    with the same tokens, greedy (equal to generate alone) and seeded sampling alike."""
    requests, arrivals = mixed_arrivals(embedded, seed=5, count=12, longest=40)
    reference = drive(StepExecutor(embedded.context), arrivals)

    def partial(step, active):
        if step % 3 == 0 or len(active) < 4:
            return None
        return 3, active[-2:]  # the two newest rows to the front, and one more: the rest wait

    results = drive(StepExecutor(embedded.context), arrivals, partial=partial)
    for name, prepared in requests.items():
        assert results[name].token_ids == reference[name].token_ids, name
        if prepared.params.strategy == "greedy":
            assert results[name].token_ids == alone(embedded, prepared).token_ids, name


def test_ids_past_the_tokenizers_vocabulary_stream_and_decode_to_nothing(t5_small):
    """t5-small's embedding has 28 rows past its tokenizer's vocabulary, which random weights
    emit: the unary text and the stream's deltas both skip them (GenerateStream failed with
    INTERNAL on them)."""
    from promptmux.serving.rpc.streaming import TextDeltas

    beyond = t5_small.context.decodable_ids
    assert beyond < t5_small.model.config.vocab_size
    hello = t5_small.tokenizer("hello", add_special_tokens=False)["input_ids"]
    ids = [*hello, beyond, t5_small.model.config.vocab_size - 1]
    assert t5_small.detokenize(ids) == t5_small.detokenize(hello) == "hello"
    deltas = TextDeltas(t5_small.detokenize)
    streamed = "".join(deltas.push([i]) for i in ids)
    assert streamed + deltas.finish(t5_small.detokenize(ids)) == "hello"


def test_demo_tasks_stop_at_eos_and_match_generate(embedded):
    """The trained embedded model ends its answers with EOS: rows leave at their own EOS."""
    texts = {"reverse": "hello42", "upper": "promptmux", "copy": "step by step", "rotate": "abcdefgh",
             "caesar": "xyz", "reverse-upper": "slots"}
    executor = StepExecutor(embedded.context)
    arrivals = {}
    prepared = {}
    for i, (task, text) in enumerate(texts.items()):
        prepared[task] = embedded.prepare(GenerationRequest(tenant="acme", text=text, task=task, params=GREEDY))
        arrivals.setdefault(i, []).append((task, prepared[task]))
    results = drive(executor, arrivals)
    assert results["reverse"].text == "24olleh" and results["upper"].text == "PROMPTMUX"
    for task, result in results.items():
        assert result.finish_reason == "eos" and result.token_ids[-1] == embedded.context.eos_token_id
        assert result.token_ids == alone(embedded, prepared[task]).token_ids


def sampled_request(engine: Engine, seed: int | None, rng_seed: int, task: str | None = "p23") -> PreparedRequest:
    params = GenerationParams(max_new_tokens=24, strategy="sample", temperature=1.5, top_p=0.95, seed=seed)
    return prepared_request(engine, random.Random(rng_seed), task=task, input_tokens=40, params=params)


def test_seeded_sampling_is_the_same_alone_and_in_a_full_busy_engine(embedded):
    target = sampled_request(embedded, seed=1234, rng_seed=0)
    lone = drive(StepExecutor(embedded.context), {0: [("target", target)]})["target"]
    greedy = drive(StepExecutor(embedded.context), {0: [("greedy", dataclasses.replace(
        target, request=dataclasses.replace(target.request, params=GREEDY)))]})["greedy"]
    assert lone.token_ids != greedy.token_ids[: len(lone.token_ids)]  # it really samples

    # Full and busy: every slot taken by greedy, seeded and unseeded sampling rows that come and
    # go; the target arrives late (so it sits in a different slot) and rows around it move.
    rng = random.Random(5)
    crowd = []
    for i in range(9):
        params = [GREEDY, dataclasses.replace(target.params, seed=i), dataclasses.replace(target.params, seed=None)][i % 3]
        params = dataclasses.replace(params, max_new_tokens=rng.randint(1, 30))
        crowd.append((f"c{i}", prepared_request(embedded, rng, task=rng.choice([None, "p1", "p64"]),
                                                input_tokens=rng.randint(1, 60), params=params)))
    executor = StepExecutor(embedded.context)
    results = drive(executor, {0: crowd[:4], 2: [("target", target)] + crowd[4:]})
    assert results["target"].token_ids == lone.token_ids
    # The static path draws each row from the same per-row stream.
    assert alone(embedded, target).token_ids == lone.token_ids


def test_static_path_seeded_sampling_no_longer_depends_on_batch_mates(embedded):
    target = sampled_request(embedded, seed=77, rng_seed=1)
    lone = alone(embedded, target)
    mates = [sampled_request(embedded, seed=s, rng_seed=10 + i, task=t)
             for i, (s, t) in enumerate([(None, "p1"), (5, None), (77, "p100"), (None, "p64")])]
    for batch in ([mates[0], target], [target, *mates[:3]], [*mates[1:], target]):
        results = embedded.run_batch(batch).results
        assert results[batch.index(target)].token_ids == lone.token_ids


def test_cancelled_slot_is_freed_and_neighbours_are_unchanged(embedded):
    rng = random.Random(8)
    requests = [(f"r{i}", prepared_request(embedded, rng, task=["p1", None, "p100", "p23"][i],
                                           input_tokens=rng.randint(1, 90),
                                           params=dataclasses.replace(GREEDY, max_new_tokens=40)))
                for i in range(4)]
    late = ("late", prepared_request(embedded, rng, task="p64", input_tokens=33, params=GREEDY))
    reference = drive(StepExecutor(embedded.context), {0: requests, 20: [late]})
    executor = StepExecutor(embedded.context)
    # r0 sits in row 0: freeing it moves the last active row into its place.
    cancelled = drive(executor, {0: requests, 20: [late]}, cancel_at={5: ["r0"]})
    assert cancelled["r0"] is None
    for name in ("r1", "r2", "r3", "late"):
        assert cancelled[name].token_ids == reference[name].token_ids, name
    assert executor.execute(StepPlan(cancel=("never-admitted",))).active_slots == 0  # an unknown handle is a no-op


def test_poisoned_requests_fail_alone_in_admit(embedded):
    store = embedded.store
    generator = torch.Generator().manual_seed(9)
    for task in ("doomed", "corrupt"):
        store.register("acme", task, 0.05 * torch.randn(9, embedded.loaded.d_model, generator=generator))
    embedded.refresh_prompts()
    rng = random.Random(4)
    good = [prepared_request(embedded, rng, task=t, input_tokens=n, params=p) for t, n, p in [
        ("p23", 30, GREEDY), (None, 5, dataclasses.replace(GREEDY, max_new_tokens=9)),
        ("p100", 77, dataclasses.replace(GREEDY, strategy="sample", seed=3, temperature=0.7))]]
    deleted = prepared_request(embedded, rng, task="doomed", input_tokens=12, params=GREEDY)
    corrupt = prepared_request(embedded, rng, task="corrupt", input_tokens=12, params=GREEDY)
    cold = dataclasses.replace(good[0].request, params=GenerationParams(strategy="sample", temperature=1e-300))
    with pytest.raises(InvalidRequestError, match="float32"):  # 0 in float32: refused once, at prepare
        embedded.prepare(cold)
    beam = dataclasses.replace(good[1], request=dataclasses.replace(
        good[1].request, params=GenerationParams(strategy="beam", num_beams=3)))
    # After the requests resolved their versions, before admission: one prompt is deleted, one
    # unreadable. A fresh engine's bank has neither cached.
    store.delete("acme", "doomed")
    meta = corrupt.prompts[0]
    store._version_file(meta.tenant, meta.task, meta.version).write_bytes(b"not a safetensors file")
    try:
        fresh = Engine(embedded.loaded, store, dataclasses.replace(embedded.config, max_batch_size=8))
        executor = StepExecutor(fresh.context)
        outputs = executor.execute(StepPlan(admit=(("g0", good[0]), ("deleted", deleted), ("g1", good[1]),
                                                   ("corrupt", corrupt), ("beam", beam), ("g2", good[2]))))
    finally:
        store.delete("acme", "corrupt")
    failed = outputs.errors
    assert set(failed) == {"deleted", "corrupt", "beam"}
    assert isinstance(failed["deleted"], TaskNotFoundError)
    assert isinstance(failed["corrupt"], StoredPromptUnreadableError) and "unreadable" in str(failed["corrupt"])
    assert isinstance(failed["beam"], InvalidRequestError) and "StepPlan.static" in str(failed["beam"])
    assert executor.active_slots == 3 and outputs.admission.admitted == 3
    assert outputs.admission.encoder_tokens == (23 + 30) + 5 + (100 + 77)
    assert sorted(outputs.stepped) == ["g0", "g1", "g2"]  # admitted and stepped in the same call
    results = dict(outputs.finished)
    while executor.active_slots:
        results.update(executor.execute(StepPlan()).finished)
    for name, prepared in zip(("g0", "g1", "g2"), good):
        lone = drive(StepExecutor(embedded.context), {0: [(name, prepared)]})[name]
        assert results[name].token_ids == lone.token_ids, name
    assert results["g0"].token_ids == alone(embedded, good[0]).token_ids


def test_a_prompt_too_big_for_the_bank_fails_alone(embedded):
    small_bank = Engine(embedded.loaded, embedded.store, dataclasses.replace(embedded.config, prompt_cache_rows=64))
    rng = random.Random(6)
    oversized = prepared_request(small_bank, rng, task="p100", input_tokens=10, params=GREEDY)
    goods = [prepared_request(small_bank, rng, task=t, input_tokens=20, params=GREEDY) for t in ("p23", None)]
    executor = StepExecutor(small_bank.context)
    results = drive(executor, {0: [("g0", goods[0]), ("big", oversized), ("g1", goods[1])]})
    assert isinstance(results["big"], ResourceExhaustedError) and "engine.prompt_cache_rows" in str(results["big"])
    for name, prepared in zip(("g0", "g1"), goods):
        assert results[name].token_ids == alone(embedded, prepared).token_ids


def test_admission_past_the_free_slots_fails_only_the_overflow(embedded):
    executor = StepExecutor(embedded.context)
    rng = random.Random(2)
    items = [(i, prepared_request(embedded, rng, task=None, input_tokens=3, params=GREEDY)) for i in range(5)]
    outputs = executor.execute(StepPlan(admit=tuple(items)))
    assert list(outputs.errors) == [4] and "no free slot" in str(outputs.errors[4])
    assert isinstance(outputs.errors[4], InvalidRequestError)
    assert outputs.stepped == [0, 1, 2, 3] and outputs.decode.rows == 4 and outputs.active_slots == 4 - len(outputs.finished)


def test_decode_graph_modes_are_refused_off_cuda():
    cpu = torch.device("cpu")
    assert resolve_decode_graphs("auto", cpu) == "none"
    assert resolve_decode_graphs("none", cpu) == "none"
    for mode in ("cuda-graphs", "compile"):
        with pytest.raises(ValueError, match="needs the model on a CUDA device"):
            resolve_decode_graphs(mode, cpu)
    with pytest.raises(ValueError, match="expected one of"):
        resolve_decode_graphs("graphs", cpu)
    assert resolve_decode_graphs("auto", torch.device("cuda", 0)) == "cuda-graphs"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["cuda-graphs", "compile"])
def test_cuda_decode_modes_equal_eager(mode, tmp_path_factory):
    """On CUDA: the captured (or compiled) step gives the eager step's tokens, and greedy rows
    still equal generate alone."""
    results = {}
    for m in ("none", mode):
        engine = make_engine("random:t5-small", tmp_path_factory, device="cuda", decode_graphs=m, max_batch_size=8)
        requests, arrivals = mixed_arrivals(engine, seed=3, count=12)
        executor = StepExecutor(engine.context)
        assert executor.decode_graphs == m
        results[m] = drive(executor, arrivals)
    for name, result in results["none"].items():
        assert results[mode][name].token_ids == result.token_ids, name
        if requests[name].params.strategy == "greedy":
            assert result.token_ids == alone(engine, requests[name]).token_ids, name
