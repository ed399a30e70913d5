"""Tenants see and use their own tasks, published ones by bare id and shared ones as
`owner/task`, and nothing else of each other's; no registration hijacks another's task."""
from __future__ import annotations

import grpc
import pytest
import torch

from conftest import PRIVATE_TASKS, SHARED_TASKS

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def pb():
    from promptmux.serving.rpc.proto_gen import promptmux_pb2

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
        # Each task is listed with the name that calls it: bare for own and published tasks.
        for info in tasks:
            bare = info.owner == tenant or (info.published and info.owner == "demo")
            assert info.name == (info.task if bare else f"{info.owner}/{info.task}")


def test_list_prompts_shows_only_the_callers_prompts(serving, pb):
    stub = serving.stub()
    prompts = stub.ListPrompts(pb.ListPromptsRequest(), metadata=serving.metadata("acme"), timeout=30).prompts
    assert {p.tenant for p in prompts} == {"acme"}
    assert set(PRIVATE_TASKS["acme"]) <= {p.task for p in prompts}
    assert not stub.ListPrompts(pb.ListPromptsRequest(), metadata=serving.metadata("flood"), timeout=30).prompts


def test_admin_key_administers_any_tenant(serving, pb):
    from promptmux.serving.rpc.convert import tensor_to_pb

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
    from promptmux.serving.rpc.convert import tensor_to_pb

    stub = serving.stub()
    globex, acme = serving.metadata("globex"), serving.metadata("acme")
    tensor = tensor_to_pb(torch.randn(4, 256, generator=torch.Generator().manual_seed(5)))
    stub.RegisterPrompt(pb.RegisterPromptRequest(task="globex-open", tensor=tensor, shared=True), metadata=globex, timeout=30)
    stub.RegisterPrompt(pb.RegisterPromptRequest(task="globex-closed", tensor=tensor), metadata=globex, timeout=30)
    used = stub.Generate(pb.GenerateRequest(task="globex/globex-open", text="hi"), metadata=acme, timeout=30)
    assert [(v.tenant, v.task) for v in used.prompt_versions] == [("globex", "globex-open")]
    for name in ("globex/globex-closed", "globex-open", "globex-closed"):  # private, or a share by bare id
        with pytest.raises(grpc.RpcError) as closed:
            stub.Generate(pb.GenerateRequest(task=name, text="hi"), metadata=acme, timeout=30)
        assert closed.value.code() == grpc.StatusCode.NOT_FOUND
    visible = {t.name for t in stub.ListTasks(pb.ListTasksRequest(), metadata=acme, timeout=30).tasks}
    assert "globex/globex-open" in visible and not {"globex-open", "globex/globex-closed"} & visible
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


def test_registering_a_shared_or_published_task_never_hijacks_another_tenants_task(serving, pb):
    """An ordinary tenant shares a prompt under `reverse`, then tries to publish it; an admin
    tries to publish another `reverse`. Meanwhile, and afterwards, every other tenant's
    `reverse` still runs demo's prompt."""
    from concurrent.futures import ThreadPoolExecutor

    from promptmux.serving.rpc.convert import tensor_to_pb

    stub = serving.stub()
    hijack = tensor_to_pb(torch.randn(6, 256, generator=torch.Generator().manual_seed(66)))
    victims = ["globex", "flood"]  # the hijacker, acme, sorts before demo: a first-by-name rule would pick it

    def victim_calls(tenant):
        reply = stub.Generate(pb.GenerateRequest(task="reverse", text="hello"), metadata=serving.metadata(tenant),
                              timeout=60)
        return reply.text, [(v.tenant, v.task) for v in reply.prompt_versions]

    with ThreadPoolExecutor(max_workers=4) as pool:
        during = [pool.submit(victim_calls, victims[i % 2]) for i in range(12)]
        try:
            info = stub.RegisterPrompt(pb.RegisterPromptRequest(task="reverse", tensor=hijack, shared=True),
                                       metadata=serving.metadata("acme"), timeout=30)
            assert (info.tenant, info.shared, info.published) == ("acme", True, False)
            with pytest.raises(grpc.RpcError) as publish:
                stub.RegisterPrompt(pb.RegisterPromptRequest(task="reverse", tensor=hijack, publish=True),
                                    metadata=serving.metadata("acme"), timeout=30)
            assert publish.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "admin key" in publish.value.details() and "'acme/reverse'" in publish.value.details()
            with pytest.raises(grpc.RpcError) as taken:
                stub.RegisterPrompt(pb.RegisterPromptRequest(tenant="ops", task="reverse", tensor=hijack, publish=True),
                                    metadata=serving.metadata("ops"), timeout=30)
            assert taken.value.code() == grpc.StatusCode.ALREADY_EXISTS
            assert "already published" in taken.value.details() and "'demo'" in taken.value.details()
            after = [victim_calls(tenant) for tenant in victims]
            assert {text for text, _ in after + [f.result() for f in during]} == {"olleh"}
            assert {tuple(owners) for _, owners in after + [f.result() for f in during]} == {(("demo", "reverse"),)}
            # The sharer's own bare id is its own task; others reach its share only by name.
            mine = stub.Generate(pb.GenerateRequest(task="reverse", text="hello"), metadata=serving.metadata("acme"),
                                 timeout=60)
            assert [(v.tenant, v.task) for v in mine.prompt_versions] == [("acme", "reverse")]
            named = stub.Generate(pb.GenerateRequest(task="acme/reverse", text="hello"),
                                  metadata=serving.metadata("globex"), timeout=60)
            assert [(v.tenant, v.task) for v in named.prompt_versions] == [("acme", "reverse")]
            listed = {t.name: t.owner for t in stub.ListTasks(pb.ListTasksRequest(), metadata=serving.metadata("globex"),
                                                               timeout=30).tasks}
            assert listed["reverse"] == "demo" and listed["acme/reverse"] == "acme"
            acme_sees = {t.name: t.owner for t in stub.ListTasks(pb.ListTasksRequest(),
                                                                  metadata=serving.metadata("acme"), timeout=30).tasks}
            assert acme_sees["reverse"] == "acme" and acme_sees["demo/reverse"] == "demo"
        finally:
            stub.DeletePrompt(pb.DeletePromptRequest(task="reverse"), metadata=serving.metadata("acme"), timeout=30)


@pytest.mark.parametrize("bad", ["copy\n", "c\u00f6py", "acme/copy\n"])
def test_an_id_with_a_trailing_newline_or_non_ascii_is_invalid_everywhere(serving, pb, bad):
    from promptmux.serving.rpc.convert import tensor_to_pb

    stub, acme = serving.stub(), serving.metadata("acme")
    tensor = tensor_to_pb(torch.zeros(2, 256))
    calls = [
        lambda: stub.Generate(pb.GenerateRequest(task=bad, text="hello"), metadata=acme, timeout=30),
        lambda: stub.Generate(pb.GenerateRequest(task="reverse", language=bad, text="hello"), metadata=acme, timeout=30),
        lambda: list(stub.GenerateStream(pb.GenerateRequest(task=bad, text="hello"), metadata=acme, timeout=30)),
        lambda: stub.RegisterPrompt(pb.RegisterPromptRequest(task=bad, tensor=tensor), metadata=acme, timeout=30),
        lambda: stub.RegisterPrompt(pb.RegisterPromptRequest(tenant=bad, task="x", tensor=tensor),
                                    metadata=serving.metadata("ops"), timeout=30),
        lambda: stub.GetPrompt(pb.GetPromptRequest(task=bad), metadata=acme, timeout=30),
        lambda: stub.DeletePrompt(pb.DeletePromptRequest(task=bad), metadata=acme, timeout=30),
        lambda: stub.ListPrompts(pb.ListPromptsRequest(tenant=bad), metadata=serving.metadata("ops"), timeout=30),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
        assert "invalid" in caught.value.details()
    batch = stub.GenerateBatch(pb.GenerateBatchRequest(requests=[pb.GenerateRequest(task=bad, text="x")]),
                               metadata=acme, timeout=30)
    assert batch.items[0].error.code == "INVALID_ARGUMENT"
    assert not [p for p in serving.store_root.rglob("*") if not p.name.isascii() or "\n" in p.name]
