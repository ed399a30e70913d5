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
    from promptmux.serving.proto_gen import promptmux_pb2

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
    from promptmux.serving.grpc_convert import tensor_to_pb

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
    from promptmux.serving.grpc_convert import tensor_to_pb

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

    from promptmux.serving.app import APP_NAME
    from promptmux.serving.grpc_convert import tensor_to_pb

    stub, acme = serving.stub(), serving.metadata("acme")
    stub.RegisterPrompt(pb.RegisterPromptRequest(task="durable", tensor=tensor_to_pb(prompt(6))), metadata=acme, timeout=30)
    before = generate(serving, pb, "acme", "durable", text="same input")
    serve.delete(APP_NAME)
    serving.deploy()  # a fresh replica, a freshly loaded model, the same store
    after = generate(serving, pb, "acme", "durable", text="same input")
    assert after.text == before.text
    assert [(v.tenant, v.task, v.version) for v in after.prompt_versions] == [("acme", "durable", 1)]
