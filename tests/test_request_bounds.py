"""Bounds before work, without a cluster: the message limit and where it is configured, the
upload checks made from the declared shape before any copy, the request id bound, the
servicer that lets replicas answer malformed messages, and what `promptmux serve --host`
accepts."""
from __future__ import annotations

from pathlib import Path
from unittest.mock import Mock

import grpc
import pytest
import yaml

from promptmux.prompts.errors import InvalidPromptError, InvalidRequestError
from promptmux.serving.rpc.convert import pb, request_from_pb, request_message, tensor_from_pb
from promptmux.serving.rpc.message_limits import (
    GRPC_DEFAULT_MESSAGE_BYTES,
    GRPC_MAX_MESSAGE_ENV,
    generate_request_bytes,
    grpc_max_message_bytes,
    register_request_bytes,
)
from promptmux.serving.config import AppConfig, EngineConfig

SERVE_YAML = Path(__file__).resolve().parents[1] / "serving" / "configs" / "serve.yaml"
MIB = 1024 * 1024


def test_text_limit_defaults_to_32_bytes_per_token_and_is_checked():
    assert EngineConfig().input_bytes_limit == 512 * 32
    assert EngineConfig(max_input_tokens=100, max_input_bytes=5000).input_bytes_limit == 5000
    with pytest.raises(ValueError, match="engine.max_input_bytes=10 is below engine.max_input_tokens=512"):
        EngineConfig(max_input_bytes=10)
    with pytest.raises(ValueError, match="engine.max_input_tokens=0 is invalid"):
        EngineConfig(max_input_tokens=0)


def test_message_limit_is_what_the_largest_legal_message_needs():
    small = AppConfig.from_args({})
    assert grpc_max_message_bytes(small, 256) == 5 * MIB  # a full GenerateBatch: 256 texts of 16 KiB
    assert 256 * generate_request_bytes(small) <= 5 * MIB < 256 * generate_request_bytes(small) + MIB
    xxl = grpc_max_message_bytes(small, 4096)  # a float32 [1024, 4096] upload is 16 MiB
    assert xxl == 18 * MIB and register_request_bytes(small, 4096) > 16 * MIB
    tiny = AppConfig.from_args({"serving": {"max_in_flight_per_tenant": 1}, "store": {"max_prompt_length": 8}})
    assert grpc_max_message_bytes(tiny, 256) == GRPC_DEFAULT_MESSAGE_BYTES  # never below gRPC's default
    # A real largest legal GenerateBatch fits under the limit.
    item = pb.GenerateRequest(task="o" * 128 + "/" + "t" * 128, language="l" * 257, text="é" * (512 * 16), request_id="r" * 256,
                              params=pb.GenerationParams(max_new_tokens=2**32 - 1, strategy=pb.SAMPLE, num_beams=16,
                                                         length_penalty=1.5, temperature=0.5, top_p=0.5, seed=2**64 - 1))
    batch = pb.GenerateBatchRequest(requests=[item] * 256)
    assert batch.ByteSize() <= grpc_max_message_bytes(small, 256)


def _configured_limits() -> list[tuple[str, dict, int]]:
    """(where, application args, configured limit) for serve.yaml and every Kubernetes config."""
    from test_deploy_manifests import KUSTOMIZATIONS, serve_config, the_app

    configs = [("serving/configs/serve.yaml", yaml.safe_load(SERVE_YAML.read_text()))]
    configs += [(name, serve_config(name)) for name in KUSTOMIZATIONS]
    out = []
    for where, config in configs:
        env = config["controller_options"]["runtime_env"]["env_vars"]
        out.append((where, the_app(config)["args"], int(env[GRPC_MAX_MESSAGE_ENV])))
    return out


def test_every_serve_config_sets_the_proxy_limit_its_args_need():
    from promptmux.serving.model.shapes import SHAPES

    widths = {"embedded": SHAPES["embedded"].d_model, "/models/t5-xxl": SHAPES["t5-xxl"].d_model}
    for where, args, configured in _configured_limits():
        needed = grpc_max_message_bytes(AppConfig.from_args(args), widths[args["model"]["source"]])
        assert configured == needed, f"{where}: {GRPC_MAX_MESSAGE_ENV} is {configured}, its args need {needed}"


def test_uploads_are_checked_from_the_declared_shape_before_any_copy():
    huge = pb.PromptTensor(dtype="float32", shape=[2**32 - 1, 2**32 - 1], data=b"")
    with pytest.raises(InvalidPromptError, match="prompt d_model is 4294967295, but the served model's d_model is 256"):
        tensor_from_pb(huge, d_model=256, max_length=64)
    long = pb.PromptTensor(dtype="float32", shape=[65, 256], data=b"\0" * 65 * 256 * 4)
    with pytest.raises(InvalidPromptError, match=r"prompt length 65 is out of range; expected 1..64 \(store.max_prompt_length\)"):
        tensor_from_pb(long, d_model=256, max_length=64)
    ok = tensor_from_pb(pb.PromptTensor(dtype="bfloat16", shape=[2, 256], data=b"\0" * 1024), d_model=256, max_length=64)
    assert tuple(ok.shape) == (2, 256)


def test_request_id_is_bounded():
    with pytest.raises(InvalidRequestError, match="request_id is 257 bytes, over the limit of 256"):
        request_from_pb(pb.GenerateRequest(task="t", text="x", request_id="r" * 257), tenant="a")
    assert request_from_pb(pb.GenerateRequest(task="t", text="x", request_id="r" * 256), tenant="a").request_id == "r" * 256


def test_the_proxy_passes_bytes_and_the_replica_decodes_them():
    from promptmux.serving.rpc.proxy import SERVICE, add_promptmux_servicer

    server = Mock(spec=["add_generic_rpc_handlers", "add_registered_method_handlers"])
    add_promptmux_servicer(Mock(), server)
    service, handlers = server.add_registered_method_handlers.call_args.args
    assert service == SERVICE and set(handlers) == {m.name for m in pb.DESCRIPTOR.services_by_name["Promptmux"].methods}
    assert all(h.request_deserializer is None and h.response_serializer is not None for h in handlers.values())
    (generic,), = server.add_generic_rpc_handlers.call_args.args
    assert isinstance(generic, grpc.GenericRpcHandler)
    assert request_message("Generate", pb.GenerateRequest(task="t").SerializeToString()).task == "t"
    for raw in (b"\xff\xff\xff", pb.GenerateRequest(task="t").SerializeToString()[:-1], b"\x1a\x02\xff\xfe"):
        with pytest.raises(InvalidRequestError, match="the Generate request is not a valid promptmux.v1.GenerateRequest"):
            request_message("Generate", raw)


def test_serve_binds_to_loopback_or_every_interface_only():
    from promptmux.serving.cli.serve import bind_host, ray_environment

    assert bind_host("localhost") == "127.0.0.1" and bind_host("127.0.0.2") == "127.0.0.2"
    assert bind_host("0.0.0.0") == "0.0.0.0"
    with pytest.raises(SystemExit, match="--host 10.1.2.3 is not supported"):
        bind_host("10.1.2.3")
    assert ray_environment("127.0.0.1", terminal=True) == {"PROMPTMUX_GRPC_HOST": "127.0.0.1",
                                                           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    assert ray_environment("0.0.0.0", terminal=True) == {"PROMPTMUX_GRPC_HOST": "0.0.0.0"}
    assert ray_environment("0.0.0.0", terminal=False) == {"PROMPTMUX_GRPC_HOST": "0.0.0.0", "RAY_COLOR_PREFIX": "0"}
