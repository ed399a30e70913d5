"""Prompt updates at runtime: registered through the API, written by another replica, deleted,
all without a restart; and a restart keeps them."""
from __future__ import annotations

import time

import grpc
import pytest
import torch

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def pb():
    from promptmux.serving.rpc.proto_gen import promptmux_pb2

    return promptmux_pb2


def prompt(seed: int, rows: int = 5) -> torch.Tensor:
    return torch.randn(rows, 256, generator=torch.Generator().manual_seed(seed))


def generate(serving, pb, tenant: str, task: str, text: str = "update me"):
    request = pb.GenerateRequest(task=task, text=text, params=pb.GenerationParams(max_new_tokens=8))
    return serving.stub().Generate(request, metadata=serving.metadata(tenant), timeout=30)


def wait_until(predicate, what: str, limit_s: float = 5.0):
    """Poll a condition that must come true without a restart (the refresh interval is 0.25 s)."""
    end = time.monotonic() + limit_s
    while not predicate():
        assert time.monotonic() < end, f"{what} did not happen within {limit_s}s"
        time.sleep(0.05)


def test_registered_prompt_is_usable_at_once_and_new_versions_replace_it(serving, pb):
    from promptmux.prompts.records import content_hash
    from promptmux.serving.rpc.convert import tensor_to_pb

    stub, acme = serving.stub(), serving.metadata("acme")
    tensor = prompt(1)
    info = stub.RegisterPrompt(
        pb.RegisterPromptRequest(task="hot", tensor=tensor_to_pb(tensor), description="first"), metadata=acme, timeout=30
    )
    assert (info.tenant, info.task, info.version, info.length, info.d_model) == ("acme", "hot", 1, 5, 256)
    assert info.content_hash == content_hash(tensor) and info.description == "first"
    assert generate(serving, pb, "acme", "hot").prompt_versions[0].version == 1
    second = stub.RegisterPrompt(pb.RegisterPromptRequest(task="hot", tensor=tensor_to_pb(prompt(2, rows=7))),
                                 metadata=acme, timeout=30)
    assert second.version == 2
    reply = generate(serving, pb, "acme", "hot")
    assert reply.prompt_versions[0].version == 2 and reply.prompt_tokens == 7
    fetched = stub.GetPrompt(pb.GetPromptRequest(task="hot", version=1), metadata=acme, timeout=30)
    assert fetched.content_hash == info.content_hash  # old versions stay readable
    assert serving.open_store().meta("acme", "hot").version == 2  # durable in the shared store


def test_a_prompt_written_by_another_replica_takes_effect_without_restart(serving, pb):
    store = serving.open_store()  # what another replica's RegisterPrompt does to the shared volume
    store.register("globex", "from-elsewhere", prompt(3))

    def usable() -> bool:
        try:
            return generate(serving, pb, "globex", "from-elsewhere").prompt_versions[0].task == "from-elsewhere"
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND
            return False

    wait_until(usable, "an externally registered prompt becoming usable")
    store.delete("globex", "from-elsewhere")

    def gone() -> bool:
        try:
            generate(serving, pb, "globex", "from-elsewhere")
            return False
        except grpc.RpcError as error:
            return error.code() == grpc.StatusCode.NOT_FOUND

    wait_until(gone, "an externally deleted prompt disappearing")


def test_delete_through_the_api_takes_effect_at_once(serving, pb):
    from promptmux.serving.rpc.convert import tensor_to_pb

    stub, globex = serving.stub(), serving.metadata("globex")
    stub.RegisterPrompt(pb.RegisterPromptRequest(task="short-lived", tensor=tensor_to_pb(prompt(4))), metadata=globex, timeout=30)
    generate(serving, pb, "globex", "short-lived")
    reply = stub.DeletePrompt(pb.DeletePromptRequest(task="short-lived"), metadata=globex, timeout=30)
    assert reply.versions_removed == 1
    with pytest.raises(grpc.RpcError) as caught:
        generate(serving, pb, "globex", "short-lived")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "short-lived" not in {t.task for t in stub.ListTasks(pb.ListTasksRequest(), metadata=globex, timeout=30).tasks}


def test_restart_keeps_registered_prompts(serving, pb):
    from ray import serve

    from promptmux.serving.replica.app import APP_NAME
    from promptmux.serving.rpc.convert import tensor_to_pb

    stub, acme = serving.stub(), serving.metadata("acme")
    stub.RegisterPrompt(pb.RegisterPromptRequest(task="durable", tensor=tensor_to_pb(prompt(6))), metadata=acme, timeout=30)
    before = generate(serving, pb, "acme", "durable", text="same input")
    serve.delete(APP_NAME)
    serving.deploy()  # a fresh replica, a freshly loaded model, the same store
    after = generate(serving, pb, "acme", "durable", text="same input")
    assert after.text == before.text
    assert [(v.tenant, v.task, v.version) for v in after.prompt_versions] == [("acme", "durable", 1)]


def test_register_prompts_stores_a_group_and_each_item_succeeds_or_fails_alone(serving, pb):
    from promptmux.serving.rpc.convert import tensor_to_pb

    stub, acme = serving.stub(), serving.metadata("acme")
    nan = prompt(12)
    nan[0, 0] = float("nan")
    items = [
        pb.RegisterPromptRequest(task="group-a", tensor=tensor_to_pb(prompt(10))),
        pb.RegisterPromptRequest(tenant="globex", task="group-x", tensor=tensor_to_pb(prompt(11))),  # not acme's
        pb.RegisterPromptRequest(task="group-nan", tensor=tensor_to_pb(nan)),
        pb.RegisterPromptRequest(task="group-pub", tensor=tensor_to_pb(prompt(13)), publish=True),  # needs admin
        pb.RegisterPromptRequest(task="group-b", tensor=tensor_to_pb(prompt(14, rows=9)), shared=True),
        pb.RegisterPromptRequest(task="group-b", tensor=tensor_to_pb(prompt(15))),  # the same task twice
        pb.RegisterPromptRequest(task="group-wide", tensor=tensor_to_pb(torch.zeros(3, 128))),  # wrong d_model
    ]
    reply = stub.RegisterPrompts(pb.RegisterPromptsRequest(prompts=items), metadata=acme, timeout=60)
    outcomes = [item.WhichOneof("outcome") for item in reply.items]
    assert outcomes == ["info", "error", "error", "error", "info", "error", "error"]
    assert [item.error.code for item in reply.items if item.HasField("error")] == [
        "PERMISSION_DENIED", "INVALID_ARGUMENT", "PERMISSION_DENIED", "INVALID_ARGUMENT", "INVALID_ARGUMENT"]
    assert "more than once" in reply.items[5].error.message
    a, b = reply.items[0].info, reply.items[4].info
    assert (a.tenant, a.task, a.version, a.length) == ("acme", "group-a", 1, 5)
    assert (b.task, b.length, b.shared) == ("group-b", 9, True)
    # Usable at once on the replica that stored them, and durable in the shared store.
    assert generate(serving, pb, "acme", "group-b").prompt_tokens == 9
    assert generate(serving, pb, "globex", "acme/group-b").prompt_versions[0].version == 1
    assert serving.open_store().meta("acme", "group-a").content_hash == a.content_hash
    small = pb.RegisterPromptRequest(task="group-small", tensor=tensor_to_pb(prompt(16, rows=1)))
    with pytest.raises(grpc.RpcError) as too_many:
        stub.RegisterPrompts(pb.RegisterPromptsRequest(prompts=[small] * 1001), metadata=acme, timeout=60)
    assert too_many.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 1000" in too_many.value.details()
    admin = stub.RegisterPrompts(pb.RegisterPromptsRequest(prompts=[items[1]]), metadata=serving.metadata("ops"),
                                 timeout=60)
    assert admin.items[0].info.tenant == "globex"  # an admin key registers for another tenant
