"""SimilarTasks over real gRPC: ranks only what the caller can call, never another tenant's private task."""
from __future__ import annotations

import time

import grpc
import pytest
import torch

from promptmux.prompts.synthetic_tasks import task_examples
from promptmux.prompts.task_embedding import TASK_EMBEDDING_EXTRA_KEY, EmbeddingRecipe

pytestmark = pytest.mark.ray

D_MODEL = 256


@pytest.fixture(scope="module")
def pb():
    from promptmux.serving.rpc.proto_gen import promptmux_pb2

    return promptmux_pb2


@pytest.fixture(scope="module")
def with_embeddings(serving):
    """Tasks with comparable embeddings: each tenant's private ones, and one shared by a third tenant."""
    recipe = EmbeddingRecipe(**serving.args.get("task_embedding", {}))
    info = {**recipe.comparable_key("embedded"), "similarity": recipe.similarity, "examples": 10}
    store = serving.open_store()
    generator = torch.Generator().manual_seed(7)
    owned = {"acme": ["sim-acme-secret", "sim-acme-notes"], "globex": ["sim-globex-own"], "demo": ["sim-shared"]}
    for owner, tasks in owned.items():
        for task in tasks:
            embedding = torch.randn(recipe.prompt_length, D_MODEL, generator=generator)
            store.register(owner, task, torch.randn(4, D_MODEL, generator=generator), shared=owner == "demo",
                           extra={TASK_EMBEDDING_EXTRA_KEY: info}, task_embedding=embedding)
    time.sleep(4 * serving.args["store"]["refresh_interval_s"])  # every replica's index refreshes
    return owned


def request(pb, count=16, top_k=100):
    examples = [pb.TaskExample(input=e.input, target=e.target) for e in task_examples("upper", count, seed=3)]
    return pb.SimilarTasksRequest(examples=examples, top_k=top_k)


def test_similar_tasks_ranks_own_and_shared_tasks_never_another_tenants(serving, pb, with_embeddings):
    stub = serving.stub()
    for tenant, others in (("globex", "acme"), ("acme", "globex")):
        reply = stub.SimilarTasks(request(pb), metadata=serving.metadata(tenant), timeout=120)
        returned = [(t.task, t.owner) for t in reply.tasks]
        # another tenant's share is called owner/task; the caller's own tasks by their bare ids
        expected = {(task, tenant) for task in with_embeddings[tenant]} | {("demo/sim-shared", "demo")}
        assert set(returned) == expected, returned  # every visible embedded task is ranked, nothing else
        assert not {task.split("/")[-1] for task, _ in returned} & set(with_embeddings[others])
        assert all(owner in (tenant, "demo") for _, owner in returned)
        scores = [t.score for t in reply.tasks]
        assert scores == sorted(scores, reverse=True) and all(-1 <= s <= 1 for s in scores)
        assert reply.compared == len(expected) and reply.without_embedding > 0  # the fixture's prompts have none
        assert reply.similarity == "mean-token" and reply.examples_used == 16 and reply.embedding_steps >= 1
    top = stub.SimilarTasks(request(pb, top_k=1), metadata=serving.metadata("acme"), timeout=120).tasks
    assert len(top) == 1 and top[0].owner in ("acme", "demo")


def test_similar_tasks_rejects_bad_calls_before_any_compute(serving, pb):
    stub = serving.stub()
    with pytest.raises(grpc.RpcError) as error:
        stub.SimilarTasks(pb.SimilarTasksRequest(), metadata=serving.metadata("acme"), timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no examples" in error.value.details()
    with pytest.raises(grpc.RpcError) as error:
        stub.SimilarTasks(request(pb, count=4), metadata=serving.metadata(None), timeout=30)
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as error:
        stub.SimilarTasks(request(pb, count=4, top_k=1000), metadata=serving.metadata("acme"), timeout=120)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_k" in error.value.details()
