"""The replica class on its own, without Ray: shutdown answers UNAVAILABLE, and a replica
refuses to start without API keys."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from promptmux.serving.replica.auth import write_key_file
from promptmux.serving.config import AppConfig


class FakeContext:
    """What Serve's gRPC context offers a replica method."""

    def __init__(self, metadata=()):
        self._metadata = list(metadata)
        self.code = None
        self.details = ""

    def invocation_metadata(self):
        return self._metadata

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details

    def set_trailing_metadata(self, metadata):
        self.trailing_metadata = list(metadata)


def app_config(tmp_path, **serving) -> AppConfig:
    return AppConfig.from_args({
        "model": {"source": "embedded"},
        "store": {"root": str(tmp_path / "prompts")},
        "serving": serving,
    })


def test_shutdown_answers_unavailable_and_health_says_not_serving(tmp_path):
    from promptmux.serving.replica.server import PromptmuxServer
    from promptmux.serving.rpc.proto_gen import promptmux_pb2 as pb
    from promptmux.serving.replica.server import ReplicaParts

    keys = write_key_file(tmp_path / "keys.yaml", [("acme", "secret-key", False)])
    config = app_config(tmp_path, api_keys_file=str(keys), shutdown_grace_s=0)
    server = PromptmuxServer(config, ReplicaParts.from_config(config))  # the parts come from outside
    auth = [("authorization", "Bearer secret-key")]

    async def main():
        health = await server.Health(pb.HealthRequest(), FakeContext())
        assert health.status == "SERVING" and health.d_model == 256
        await server.shutdown()
        context = FakeContext(auth)
        reply = await server.Generate(pb.GenerateRequest(text="hello"), context)
        assert reply == pb.GenerateReply()
        assert context.code == grpc.StatusCode.UNAVAILABLE and "shutting down" in context.details
        assert (await server.Health(pb.HealthRequest(), FakeContext())).status == "NOT_SERVING"

    asyncio.run(main())


def test_a_replica_never_starts_without_api_keys(tmp_path, monkeypatch):
    from promptmux.serving.replica.server import PromptmuxServer

    monkeypatch.delenv("PROMPTMUX_API_KEYS_FILE", raising=False)
    with pytest.raises(ValueError, match="no API key file"):
        PromptmuxServer(app_config(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PromptmuxServer(app_config(tmp_path, api_keys_file=str(tmp_path / "missing.yaml")))
