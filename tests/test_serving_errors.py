"""Every error through Ray Serve's gRPC proxy arrives with its exact status code and a
message that names the problem."""
from __future__ import annotations

import re
import time
import grpc
import pytest

from conftest import metric

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def pb():
    from promptmux.serving.proto_gen import promptmux_pb2

    return promptmux_pb2


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, **kwargs)
    return caught.value


def test_unauthenticated(serving, pb):
    stub = serving.stub()
    request = pb.GenerateRequest(task="reverse", text="hi")
    missing = rpc_error(stub.Generate, request, metadata=serving.metadata(None), timeout=30)
    assert missing.code() == grpc.StatusCode.UNAUTHENTICATED and "authorization: Bearer" in missing.details()
    wrong = [("application", "promptmux"), ("authorization", "Bearer not-a-key")]
    unknown = rpc_error(stub.ListTasks, pb.ListTasksRequest(), metadata=wrong, timeout=30)
    assert unknown.code() == grpc.StatusCode.UNAUTHENTICATED and "unknown API key" in unknown.details()
    assert "not-a-key" not in unknown.details()  # keys are never echoed
    malformed = [("application", "promptmux"), ("authorization", "Basic abc")]
    assert rpc_error(stub.ListPrompts, pb.ListPromptsRequest(), metadata=malformed, timeout=30).code() == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    streamed = rpc_error(lambda: list(stub.GenerateStream(request, metadata=serving.metadata(None), timeout=30)))
    assert streamed.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    "request_fields, message",
    [
        (dict(task="reverse", text=""), "text is empty"),
        (dict(task="reverse", text="x", params=dict(max_new_tokens=0)), "max_new_tokens=0 is out of range"),
        (dict(task="reverse", text="x", params=dict(max_new_tokens=65)), "max_new_tokens_limit"),
        (dict(task="reverse", text="x", params=dict(strategy=3, temperature=0.0)), "temperature=0.0 is invalid"),
        (dict(task="reverse", text="x" * 600), "engine.max_input_tokens"),
        (dict(language="english", text="x"), "without a task"),
    ],
)
def test_invalid_argument(serving, pb, request_fields, message):
    fields = dict(request_fields)
    params = pb.GenerationParams(**fields.pop("params", {}))
    error = rpc_error(
        serving.stub().Generate, pb.GenerateRequest(params=params, **fields), metadata=serving.metadata("acme"), timeout=30
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.details()


def test_invalid_prompt_uploads(serving, pb):
    from promptmux.serving.grpc_convert import tensor_to_pb
    import torch

    stub = serving.stub()
    short = pb.PromptTensor(dtype="float32", shape=[4, 256], data=b"\0" * 10)
    wrong_width = tensor_to_pb(torch.zeros(4, 128))
    not_finite = tensor_to_pb(torch.full((4, 256), float("nan")))
    for tensor, message in [(short, "needs 4096"), (wrong_width, "d_model is 128"), (not_finite, "non-finite")]:
        error = rpc_error(
            stub.RegisterPrompt, pb.RegisterPromptRequest(task="broken", tensor=tensor),
            metadata=serving.metadata("acme"), timeout=30,
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and message in error.details()


def test_not_found_looks_the_same_for_unknown_and_for_another_tenants_private_task(serving, pb):
    stub = serving.stub()
    unknown = rpc_error(stub.Generate, pb.GenerateRequest(task="nonexistent", text="x"),
                        metadata=serving.metadata("acme"), timeout=30)
    private = rpc_error(stub.Generate, pb.GenerateRequest(task="rewrite", text="x"),  # globex's private task
                        metadata=serving.metadata("acme"), timeout=30)
    assert unknown.code() == private.code() == grpc.StatusCode.NOT_FOUND
    assert private.details() == unknown.details().replace("nonexistent", "rewrite")
    missing_meta = rpc_error(stub.GetPrompt, pb.GetPromptRequest(task="nonexistent"),
                             metadata=serving.metadata("acme"), timeout=30)
    assert missing_meta.code() == grpc.StatusCode.NOT_FOUND


def test_permission_denied_for_another_tenants_prompts(serving, pb):
    from promptmux.serving.grpc_convert import tensor_to_pb
    import torch

    stub = serving.stub()
    acme = serving.metadata("acme")
    calls = [
        (stub.RegisterPrompt, pb.RegisterPromptRequest(tenant="globex", task="x", tensor=tensor_to_pb(torch.zeros(2, 256)))),
        (stub.ListPrompts, pb.ListPromptsRequest(tenant="globex")),
        (stub.GetPrompt, pb.GetPromptRequest(tenant="globex", task="rewrite")),
        (stub.DeletePrompt, pb.DeletePromptRequest(tenant="globex", task="rewrite")),
    ]
    for call, request in calls:
        error = rpc_error(call, request, metadata=acme, timeout=30)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert re.search(r"tenant 'acme' may not \w+ prompts of tenant 'globex'", error.details())
    assert serving.open_store().meta("globex", "rewrite").version == 1  # nothing changed


def dropped_cancelled(text: str) -> float:
    return metric(text, "ray_promptmux_requests_dropped_total", status="CANCELLED")


def test_overload_answers_resource_exhausted_and_late_requests_are_dropped_before_compute(serving, pb):
    stub = serving.stub()
    before = dropped_cancelled(serving.scrape())
    flood = [
        stub.Generate.future(
            pb.GenerateRequest(task="reverse", text=f"flood {i} " * 50, params=pb.GenerationParams(max_new_tokens=64)),
            metadata=serving.metadata("flood"), timeout=120,
        )
        for i in range(30)
    ]
    time.sleep(0.15)  # the admitted flood (about a second of compute here) is running now
    late = rpc_error(stub.Generate, pb.GenerateRequest(task="reverse", text="too late"),
                     metadata=serving.metadata("acme"), timeout=0.2)
    assert late.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    errors = [f.exception(timeout=120) for f in flood]
    codes = [e.code() if e else grpc.StatusCode.OK for e in errors]
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes and grpc.StatusCode.OK in codes
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert codes.count(grpc.StatusCode.OK) <= 12  # serving.max_in_flight_per_tenant
    refused = next(e for e in errors if e)
    assert "max_in_flight_per_tenant=12" in refused.details()
    # The late request left the queue when its caller gave up: counted, never computed.
    serving.wait_for_metrics(lambda text: dropped_cancelled(text) > before)
