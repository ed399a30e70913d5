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
    from promptmux.serving.rpc.proto_gen import promptmux_pb2

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
    from promptmux.serving.rpc.convert import tensor_to_pb
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
    from promptmux.serving.rpc.convert import tensor_to_pb
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


GATED_APP = "promptmux-gated"


def gated_server_class():
    """A replica whose T5 encoder waits at a gate the test holds: files in a folder both see.

    While `<gate>/armed` exists, the first encoder forward writes `<gate>/entered` and waits
    until `armed` is removed. The hook is process-wide (the replica's process only) and keyed
    on the encoder module, so it holds whatever engine loop runs the model. Built inside a
    function so Ray pickles the class by value: the replica cannot import test modules.
    """
    from promptmux.serving.replica.server import PromptmuxServer

    class GatedPromptmuxServer(PromptmuxServer):
        def __init__(self, config, gate: str) -> None:
            from pathlib import Path

            import torch
            from transformers.models.t5.modeling_t5 import T5Stack

            armed, entered = Path(gate) / "armed", Path(gate) / "entered"

            def hold(module, args):
                if isinstance(module, T5Stack) and not module.is_decoder and armed.exists():
                    entered.touch()
                    end = time.monotonic() + 60  # bounded: a test that dies cannot hang the replica
                    while armed.exists() and time.monotonic() < end:
                        time.sleep(0.01)

            torch.nn.modules.module.register_module_forward_pre_hook(hold)
            super().__init__(config)

    return GatedPromptmuxServer


@pytest.fixture(scope="module")
def gated(serving, tmp_path_factory):
    """The same application as `serving`, deployed once more as GATED_APP with the gate above."""
    from ray import serve

    from promptmux.serving.replica.app import deployment_defaults
    from promptmux.serving.config import AppConfig

    gate = tmp_path_factory.mktemp("gate")
    args = {**serving.args, "store": {**serving.args["store"], "root": str(tmp_path_factory.mktemp("gated-store"))}}
    config = AppConfig.from_args(args)
    deployment = serve.deployment(gated_server_class(), name="GatedPromptmuxServer")
    app = deployment.options(**deployment_defaults(config), ray_actor_options={"num_cpus": 0.25}).bind(config, str(gate))
    serve.run(app, name=GATED_APP, route_prefix="/gated", blocking=False)
    stub = serving.stub()
    metadata = lambda tenant: [("application", GATED_APP), ("authorization", f"Bearer {serving.keys[tenant]}")]  # noqa: E731
    from promptmux.serving.rpc.proto_gen import promptmux_pb2 as pb

    end = time.monotonic() + 120
    while True:  # ready once the demo task answers
        try:
            stub.Generate(pb.GenerateRequest(task="reverse", text="ab"), metadata=metadata("acme"), timeout=10)
            break
        except grpc.RpcError:
            assert time.monotonic() < end, "the gated application did not start in time"
            time.sleep(0.5)
    try:
        yield stub, metadata, gate
    finally:
        (gate / "armed").unlink(missing_ok=True)
        serve.delete(GATED_APP)


def wait_for(condition, what: str, limit_s: float = 60.0) -> None:
    end = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_overload_answers_resource_exhausted_and_late_requests_are_dropped_before_compute(serving, gated, pb):
    """The engine is held at the gate, not raced: what is refused and what is dropped is exact."""
    stub, metadata, gate = gated
    armed, entered = gate / "armed", gate / "entered"
    entered.unlink(missing_ok=True)
    armed.touch()
    before = dropped_cancelled(serving.scrape())
    flood = []
    try:
        flood.append(stub.Generate.future(pb.GenerateRequest(task="reverse", text="first flood"),
                                          metadata=metadata("flood"), timeout=120))
        wait_for(entered.exists, "the first batch to reach the encoder")  # the engine is busy from here on
        flood += [
            stub.Generate.future(pb.GenerateRequest(task="reverse", text=f"flood {i}"), metadata=metadata("flood"), timeout=120)
            for i in range(29)
        ]
        # 12 in flight (serving.max_in_flight_per_tenant), the other 18 refused at once.
        wait_for(lambda: sum(f.done() for f in flood) >= 18, "the over-limit requests to be refused")
        refused = [f.exception() for f in flood if f.done()]
        assert len(refused) == 18 and {e.code() for e in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert "max_in_flight_per_tenant=12" in refused[0].details()

        # Another tenant's request queues behind the held batch; its caller gives up at 0.2 s.
        late = rpc_error(stub.Generate, pb.GenerateRequest(task="reverse", text="too late"),
                         metadata=metadata("acme"), timeout=0.2)
        assert late.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # It left the queue when its caller went away, while the engine was still held: never computed.
        serving.wait_for_metrics(lambda text: dropped_cancelled(text) >= before + 1)
        admitted = [f for f in flood if not f.done()]
        assert len(admitted) == 12  # still waiting at the gate
    finally:
        armed.unlink(missing_ok=True)
    replies = [f.result(timeout=120) for f in admitted]
    assert all(r.text for r in replies)
