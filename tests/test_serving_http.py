"""The OpenAI-compatible API through Ray Serve's HTTP proxy, with the official `openai` client,
next to gRPC on the same replicas, batches and tenant rules."""
from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import pytest

from conftest import metric

pytestmark = pytest.mark.ray
openai = pytest.importorskip("openai")


def client(serving, tenant="acme"):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{serving.http_port}/v1", api_key=serving.keys[tenant],
                         max_retries=0, timeout=60)


def test_the_official_client_completes_streams_and_lists(serving):
    api = client(serving)
    completion = api.completions.create(model="reverse", prompt="hello")
    assert completion.choices[0].text == "olleh" and completion.choices[0].finish_reason == "stop"
    assert completion.usage.completion_tokens == 6
    streamed = "".join(chunk.choices[0].text for chunk in api.completions.create(model="reverse", prompt="hello",
                                                                                   stream=True) if chunk.choices)
    assert streamed == "olleh"
    names = {model.id for model in api.models.list()}
    assert {"reverse", "upper", "copy", "caesar", "rotate", "reverse-upper"} <= names
    assert "summarize" in names and "globex/summarize" not in names  # acme's own, never globex's private one
    scored = api.completions.create(model="reverse", prompt="hello", extra_body={"choices": ["hello", "olleh", "HELLO"]})
    assert scored.choices[0].text == "olleh"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"http://127.0.0.1:{serving.http_port}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        api.completions.create(model="globex/summarize", prompt="hello")  # private to globex: unknown to acme


def test_http_and_grpc_requests_mixed_at_once_equal_each_alone(serving):
    from promptmux.serving.rpc.proto_gen import promptmux_pb2 as pb

    cases = [("reverse", "hello"), ("upper", "abc42"), ("caesar", "hello"), ("rotate", "world"), ("copy", "abc"),
             ("reverse-upper", "hello42")]
    stub, api = serving.stub(), client(serving)

    def over_grpc(task, text):
        request = pb.GenerateRequest(task=task, text=text, params=pb.GenerationParams(max_new_tokens=24))
        return stub.Generate(request, metadata=serving.metadata("acme"), timeout=60).text

    def over_http(task, text):
        return api.completions.create(model=task, prompt=text, max_tokens=24).choices[0].text

    alone = {(via.__name__, task, text): via(task, text) for task, text in cases for via in (over_grpc, over_http)}
    assert all(alone[("over_grpc", t, x)] == alone[("over_http", t, x)] for t, x in cases)
    together: dict = {}

    def run(key):
        together[key] = {"over_grpc": over_grpc, "over_http": over_http}[key[0]](*key[1:])

    threads = [threading.Thread(target=run, args=(key,)) for key in alone for _ in range(1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert together == alone


def test_unknown_paths_answer_json_404_and_http_calls_are_counted(serving):
    for path in ("/promptmux", "/v1/chat/completions"):
        with pytest.raises(urllib.error.HTTPError) as raised:
            urllib.request.urlopen(f"http://127.0.0.1:{serving.http_port}{path}", timeout=30)
        assert raised.value.code == 404
        assert json.loads(raised.value.read())["error"]["type"] == "not_found_error"
    before = metric(serving.scrape(), "ray_promptmux_requests_total", method="Completions", protocol="http", status="OK")
    client(serving, "globex").completions.create(model="reverse", prompt="abc")
    serving.wait_for_metrics(lambda text: metric(text, "ray_promptmux_requests_total", method="Completions",
                                                 protocol="http", status="OK") > before)
