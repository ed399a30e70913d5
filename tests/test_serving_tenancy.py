"""Tenants see and use their own tasks plus shared ones, and nothing of each other's."""
from __future__ import annotations

import grpc
import pytest
import torch

from conftest import PRIVATE_TASKS, SHARED_TASKS

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def pb():
    from promptmux.serving.proto_gen import promptmux_pb2

    return promptmux_pb2


def test_list_tasks_shows_own_and_shared_only(serving, pb):
    stub = serving.stub()
    for tenant in PRIVATE_TASKS:
        tasks = stub.ListTasks(pb.ListTasksRequest(), metadata=serving.metadata(tenant), timeout=30).tasks
        listed = {t.task: (t.owner, t.shared) for t in tasks}
        expected = {task: (tenant, False) for task in PRIVATE_TASKS[tenant]}
        expected.update({task: ("demo", True) for task in SHARED_TASKS["demo"]})
        assert {k: v for k, v in listed.items() if k in expected} == expected
        others = {task for other, ts in PRIVATE_TASKS.items() if other != tenant for task in ts}
        assert not (set(listed) & (others - set(PRIVATE_TASKS[tenant])))
        assert all(owner in (tenant, "demo") or shared for owner, shared in listed.values())


def test_list_prompts_shows_only_the_callers_prompts(serving, pb):
    stub = serving.stub()
    prompts = stub.ListPrompts(pb.ListPromptsRequest(), metadata=serving.metadata("acme"), timeout=30).prompts
    assert {p.tenant for p in prompts} == {"acme"}
    assert set(PRIVATE_TASKS["acme"]) <= {p.task for p in prompts}
    assert not stub.ListPrompts(pb.ListPromptsRequest(), metadata=serving.metadata("flood"), timeout=30).prompts


def test_admin_key_administers_any_tenant(serving, pb):
    from promptmux.serving.grpc_convert import tensor_to_pb

    stub = serving.stub()
    ops = serving.metadata("ops")
    listed = stub.ListPrompts(pb.ListPromptsRequest(tenant="globex"), metadata=ops, timeout=30).prompts
    assert {p.task for p in listed} >= set(PRIVATE_TASKS["globex"]) and {p.tenant for p in listed} == {"globex"}
    info = stub.RegisterPrompt(
        pb.RegisterPromptRequest(tenant="globex", task="by-admin", tensor=tensor_to_pb(torch.ones(3, 256))),
        metadata=ops, timeout=30,
    )
    assert (info.tenant, info.task, info.length) == ("globex", "by-admin", 3)
    assert stub.GetPrompt(pb.GetPromptRequest(tenant="globex", task="by-admin"), metadata=ops, timeout=30).version == 1
    gone = stub.DeletePrompt(pb.DeletePromptRequest(tenant="globex", task="by-admin"), metadata=ops, timeout=30)
    assert gone.versions_removed == 1


def test_shared_flag_decides_who_may_use_a_task(serving, pb):
    from promptmux.serving.grpc_convert import tensor_to_pb

    stub = serving.stub()
    globex, acme = serving.metadata("globex"), serving.metadata("acme")
    tensor = tensor_to_pb(torch.randn(4, 256, generator=torch.Generator().manual_seed(5)))
    stub.RegisterPrompt(pb.RegisterPromptRequest(task="globex-open", tensor=tensor, shared=True), metadata=globex, timeout=30)
    stub.RegisterPrompt(pb.RegisterPromptRequest(task="globex-closed", tensor=tensor), metadata=globex, timeout=30)
    used = stub.Generate(pb.GenerateRequest(task="globex-open", text="hi"), metadata=acme, timeout=30)
    assert [(v.tenant, v.task) for v in used.prompt_versions] == [("globex", "globex-open")]
    with pytest.raises(grpc.RpcError) as closed:
        stub.Generate(pb.GenerateRequest(task="globex-closed", text="hi"), metadata=acme, timeout=30)
    assert closed.value.code() == grpc.StatusCode.NOT_FOUND
    visible = {t.task for t in stub.ListTasks(pb.ListTasksRequest(), metadata=acme, timeout=30).tasks}
    assert "globex-open" in visible and "globex-closed" not in visible
    # A tenant cannot delete what another tenant shared with it.
    with pytest.raises(grpc.RpcError) as denied:
        stub.DeletePrompt(pb.DeletePromptRequest(tenant="globex", task="globex-open"), metadata=acme, timeout=30)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_composed_language_and_task_prompts(serving, pb):
    stub = serving.stub()
    reply = stub.Generate(
        pb.GenerateRequest(task="summarize", language="english", text="bonjour", params=pb.GenerationParams(max_new_tokens=6)),
        metadata=serving.metadata("acme"), timeout=30,
    )
    assert [(v.tenant, v.task) for v in reply.prompt_versions] == [("demo", "english"), ("acme", "summarize")]
    assert reply.prompt_tokens == 12  # two 6-row prompts
