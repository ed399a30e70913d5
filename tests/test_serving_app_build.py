"""The path KubeRay serves: `import_path: promptmux.serving.replica.app:build_app` with the Serve
config's `args`, deployed as its own application beside the shared one and called through
Serve's gRPC proxy."""
from __future__ import annotations

import time

import grpc
import pytest

pytestmark = pytest.mark.ray

APP, ROUTE = "promptmux-built", "/promptmux-built"


def test_build_app_serves_generate_through_grpc(serving):
    from ray import serve

    from promptmux.serving.replica.app import build_app
    from promptmux.serving.rpc.proto_gen import promptmux_pb2 as pb

    serve.run(build_app(serving.args), name=APP, route_prefix=ROUTE, blocking=False)
    try:
        stub = serving.stub()
        metadata = [("application", APP), ("authorization", f"Bearer {serving.keys['acme']}")]
        end = time.monotonic() + 180
        while True:  # the replica loads the model
            try:
                health = stub.Health(pb.HealthRequest(), metadata=metadata[:1], timeout=10)
                if health.status == "SERVING":
                    break
            except grpc.RpcError:
                pass
            assert time.monotonic() < end, "the build_app application did not start serving"
            time.sleep(0.5)
        assert (health.model, health.d_model) == ("embedded", 256)
        reply = stub.Generate(pb.GenerateRequest(task="reverse", text="hello"), metadata=metadata, timeout=60)
        assert reply.text == "olleh"
        assert [(v.tenant, v.task) for v in reply.prompt_versions] == [("demo", "reverse")]
        with pytest.raises(grpc.RpcError) as caught:
            stub.Generate(pb.GenerateRequest(task="reverse", text="hello"), metadata=metadata[:1], timeout=60)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        serve.delete(APP)
