"""Generation through Ray Serve's gRPC proxy: mixed-task batches give exactly what the engine
gives each request alone; streaming and GenerateBatch agree with unary."""
from __future__ import annotations

import pytest

from conftest import PRIVATE_TASKS, SHARED_TASKS, metric, multi_task_batches

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def pb():
    from promptmux.serving.rpc.proto_gen import promptmux_pb2

    return promptmux_pb2


@pytest.fixture(scope="module")
def engine(serving):
    """The same model and store, in this process, to compute what each request gives alone."""
    from promptmux.serving.engine.core import Engine
    from promptmux.serving.config import AppConfig

    engine = Engine.from_config(AppConfig.from_args(serving.args).promptmux)
    engine.refresh_prompts()
    return engine


def workload() -> list[tuple[str, str, str]]:
    """(tenant, task, text): 8 private tasks of two tenants plus shared ones, 12 requests."""
    items = []
    for tenant, tasks in PRIVATE_TASKS.items():
        for i, task in enumerate(tasks):
            items.append((tenant, task, f"{tenant} asks {task} #{i}"))
    for tenant in PRIVATE_TASKS:
        for task in SHARED_TASKS["demo"]:
            items.append((tenant, task, f"shared {task} for {tenant}"))
    return items


def alone(engine, tenant: str, task: str, text: str, max_new_tokens: int):
    from promptmux.serving.engine.types import GenerationParams, GenerationRequest

    request = GenerationRequest(tenant=tenant, text=text, task=task, params=GenerationParams(max_new_tokens=max_new_tokens))
    (result,) = engine.run_batch([request]).results
    assert not isinstance(result, Exception), result
    return result


def test_concurrent_mixed_tasks_match_the_engine_run_alone(serving, engine, pb):
    stub = serving.stub()
    items = workload()
    assert len({(t, task) for t, task, _ in items}) >= 8 and len({t for t, _, _ in items}) == 2
    before = serving.scrape()
    futures = [
        stub.Generate.future(
            pb.GenerateRequest(task=task, text=text, request_id=str(i), params=pb.GenerationParams(max_new_tokens=12)),
            metadata=serving.metadata(tenant),
            timeout=120,
        )
        for i, (tenant, task, text) in enumerate(items)
    ]
    replies = [f.result() for f in futures]
    for i, ((tenant, task, text), reply) in enumerate(zip(items, replies)):
        expected = alone(engine, tenant, task, text, 12)
        assert reply.request_id == str(i)
        assert reply.text == expected.text
        assert reply.output_tokens == expected.output_tokens
        assert reply.input_tokens == expected.input_tokens
        assert [(v.tenant, v.task, v.version) for v in reply.prompt_versions] == [
            (v.tenant, v.task, v.version) for v in expected.prompt_versions
        ]
    # Each tenant's own "summarize" is used, not the other's.
    owners = {(t, task): reply.prompt_versions[0].tenant for (t, task, _), reply in zip(items, replies)}
    assert owners[("acme", "summarize")] == "acme" and owners[("globex", "summarize")] == "globex"
    assert owners[("acme", "reverse")] == "demo"
    # The replica batched them together: batches of several requests, holding several prompts.
    serving.wait_for_metrics(
        lambda text: multi_task_batches(text) > multi_task_batches(before)
        and metric(text, "ray_promptmux_batch_size_count") - metric(text, "ray_promptmux_batch_size_bucket", le="1.0")
        > metric(before, "ray_promptmux_batch_size_count") - metric(before, "ray_promptmux_batch_size_bucket", le="1.0")
    )


def test_stream_joins_to_the_unary_text(serving, pb):
    stub = serving.stub()
    request = pb.GenerateRequest(task="classify", text="stream me, é and ü", params=pb.GenerationParams(max_new_tokens=24))
    unary = stub.Generate(request, metadata=serving.metadata("acme"), timeout=60)
    messages = list(stub.GenerateStream(request, metadata=serving.metadata("acme"), timeout=60))
    assert messages[-1].done and not any(m.done for m in messages[:-1])
    assert "".join(m.delta for m in messages) == unary.text
    assert messages[-1].result.text == unary.text
    assert messages[-1].result.output_tokens == unary.output_tokens == messages[-1].output_tokens
    counts = [m.output_tokens for m in messages]
    assert counts == sorted(counts)


def test_beam_and_sampling_stream_like_unary(serving, pb):
    stub = serving.stub()
    for params in (
        pb.GenerationParams(max_new_tokens=8, strategy=pb.BEAM, num_beams=2),
        pb.GenerationParams(max_new_tokens=8, strategy=pb.SAMPLE, temperature=0.8, top_p=0.9, seed=7),
    ):
        request = pb.GenerateRequest(task="reverse", text="abc", params=params)
        unary = stub.Generate(request, metadata=serving.metadata("globex"), timeout=60)
        streamed = list(stub.GenerateStream(request, metadata=serving.metadata("globex"), timeout=60))
        assert "".join(m.delta for m in streamed) == unary.text


def test_generate_batch_matches_unary_and_fails_items_alone(serving, pb):
    stub = serving.stub()
    good = pb.GenerateRequest(task="tag", text="batch item", params=pb.GenerationParams(max_new_tokens=10))
    unknown = pb.GenerateRequest(task="no-such-task", text="x")
    empty = pb.GenerateRequest(task="tag", text="")
    reply = stub.GenerateBatch(
        pb.GenerateBatchRequest(requests=[good, unknown, empty, good]), metadata=serving.metadata("globex"), timeout=60
    )
    unary = stub.Generate(good, metadata=serving.metadata("globex"), timeout=60)
    outcomes = [item.WhichOneof("outcome") for item in reply.items]
    assert outcomes == ["reply", "error", "error", "reply"]
    assert reply.items[0].reply.text == reply.items[3].reply.text == unary.text
    assert reply.items[1].error.code == "NOT_FOUND" and "no-such-task" in reply.items[1].error.message
    assert reply.items[2].error.code == "INVALID_ARGUMENT"
