"""The standard gRPC health protocol on the gRPC port, as Kubernetes' native probe calls it:
no metadata at all, answered by Serve's proxy itself."""
from __future__ import annotations

import grpc
import pytest

pytestmark = pytest.mark.ray


def test_grpc_health_check_answers_serving_without_metadata(serving):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(serving.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "promptmux.v1.Promptmux"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=30)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as unknown:
            health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=30)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    # The promptmux service itself still routes to the replicas.
    from promptmux.serving.rpc.proto_gen import promptmux_pb2 as pb

    reply = serving.stub().Generate(pb.GenerateRequest(task="reverse", text="hello"),
                                    metadata=serving.metadata("acme"), timeout=60)
    assert reply.text == "olleh"
