"""Protobuf conversion at the edge, and token-to-text deltas for streaming."""
from __future__ import annotations

import pytest
import torch
from conftest import require_module
from transformers import ByT5Tokenizer

# grpc_convert compiles the .proto with grpc_tools, absent on the GPU device image: skip there, fail in CI.
require_module("grpc_tools")

from promptmux.prompts.errors import InvalidPromptError, InvalidRequestError
from promptmux.serving.rpc.convert import (
    batch_item_to_pb,
    pb,
    reply_to_pb,
    request_from_pb,
    tensor_from_pb,
    tensor_to_pb,
)
from promptmux.prompts.errors import TaskNotFoundError
from promptmux.serving.engine.types import GenerationParams, GenerationResult, PromptVersionRef
from promptmux.serving.rpc.streaming import TextDeltas


def test_unset_params_take_the_engine_defaults():
    request = request_from_pb(pb.GenerateRequest(task="t", text="x"), tenant="acme")
    assert request.params == GenerationParams()
    assert (request.tenant, request.task, request.prompt_segments) == ("acme", "t", ())


def test_set_params_and_language_composition_carry_over():
    msg = pb.GenerateRequest(
        task="summarize", language="french", text="x", truncate=True, request_id="r1",
        params=pb.GenerationParams(max_new_tokens=5, strategy=pb.SAMPLE, temperature=0.5, top_p=0.9, seed=3),
    )
    request = request_from_pb(msg, tenant="acme")
    assert request.prompt_segments == ("french", "summarize") and request.prompt_task_ids == ("french", "summarize")
    assert request.params == GenerationParams(max_new_tokens=5, strategy="sample", temperature=0.5, top_p=0.9, seed=3)
    assert request.truncate and request.request_id == "r1"
    beam = request_from_pb(pb.GenerateRequest(task="t", text="x", params=pb.GenerationParams(strategy=pb.BEAM, num_beams=2)), "a")
    assert (beam.params.strategy, beam.params.num_beams) == ("beam", 2)


def test_malformed_generation_requests_are_invalid_arguments():
    with pytest.raises(InvalidRequestError, match="without a task"):
        request_from_pb(pb.GenerateRequest(language="fr", text="x"), tenant="a")
    unknown = request_from_pb(pb.GenerateRequest(task="t", text="x", params=pb.GenerationParams(strategy=9)), tenant="a")
    with pytest.raises(InvalidRequestError, match="unknown decoding strategy 9"):
        unknown.params.validate(max_new_tokens_limit=256)  # the one strategy check, which Engine.prepare runs
    with pytest.raises(InvalidRequestError, match="finite"):
        request_from_pb(pb.GenerateRequest(task="t", text="x", params=pb.GenerationParams(top_p=float("nan"))), tenant="a")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tensor_round_trip_is_bit_exact(dtype):
    tensor = torch.randn(3, 8).to(dtype)
    back = tensor_from_pb(tensor_to_pb(tensor))
    assert back.dtype == dtype and torch.equal(back.view(torch.uint8), tensor.view(torch.uint8))


@pytest.mark.parametrize(
    "msg, message",
    [
        (pb.PromptTensor(dtype="int8", shape=[1, 1], data=b"\0"), "not supported"),
        (pb.PromptTensor(dtype="float32", shape=[4], data=b"\0" * 16), "expected \\[length, d_model\\]"),
        (pb.PromptTensor(dtype="float32", shape=[2, 0], data=b""), "both > 0"),
        (pb.PromptTensor(dtype="float32", shape=[2, 2], data=b"\0" * 15), "has 15 bytes.*needs 16"),
    ],
)
def test_malformed_uploads_say_what_is_wrong(msg, message):
    with pytest.raises(InvalidPromptError, match=message):
        tensor_from_pb(msg)


def test_results_and_batch_errors_convert():
    result = GenerationResult("r", "out", [1, 2], "length", 6, 4, 2, (PromptVersionRef("demo", "reverse", 3),))
    reply = reply_to_pb(result)
    assert (reply.text, reply.finish_reason, reply.prompt_tokens, reply.input_tokens, reply.output_tokens) == (
        "out", pb.LENGTH, 6, 4, 2
    )
    assert [(v.tenant, v.task, v.version) for v in reply.prompt_versions] == [("demo", "reverse", 3)]
    item = batch_item_to_pb(TaskNotFoundError("unknown task 'x'"))
    assert item.WhichOneof("outcome") == "error" and item.error.code == "NOT_FOUND"


def test_stream_deltas_hold_back_incomplete_characters():
    tokenizer = ByT5Tokenizer()
    text = "aé€😀 b"
    ids = tokenizer(text)["input_ids"]  # bytes + 3, then EOS
    deltas = TextDeltas(lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
    pieces = [deltas.push([i]) for i in ids]
    assert "".join(pieces) == text
    assert pieces[:3] == ["a", "", "é"]  # é is two bytes: nothing until both arrived
    assert deltas.finish(text) == "" and deltas.token_count == len(ids)


def test_the_generated_grpc_code_is_checked_on_import_never_built(tmp_path):
    """Importing the gRPC edge builds nothing: code generated from another .proto (or none) is
    an error that says how to build it, and the folder stays as it was."""
    from promptmux.serving.rpc.proto_build import PROTO_PATH, build, require_built

    out = tmp_path / "proto_gen"
    with pytest.raises(RuntimeError, match=r"missing or older than the \.proto.*python -m promptmux\.serving\.rpc\.proto_build"):
        require_built(out)
    assert not out.exists()
    build(out)
    require_built(out)  # current: no error
    changed = tmp_path / "promptmux.proto"
    changed.write_text(PROTO_PATH.read_text() + "\n// a new comment changes the hash\n")
    with pytest.raises(RuntimeError, match="missing or older"):
        require_built(out, changed)
