"""The OpenAI-compatible HTTP API on one replica, in-process (no Ray): the routes of
serving/replica/http_api.py on a real PromptmuxServer, driven through ASGI in one event loop."""
from __future__ import annotations

import asyncio
import json

import pytest

httpx = pytest.importorskip("httpx")

from promptmux.serving.config import AppConfig  # noqa: E402
from promptmux.serving.replica.auth import write_key_file  # noqa: E402

KEY = {"Authorization": "Bearer key-acme"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from promptmux.serving.replica.server import PromptmuxServer

    root = tmp_path_factory.mktemp("http")
    keys = write_key_file(root / "keys.yaml", [("acme", "key-acme", False)])
    config = AppConfig.from_args({
        "model": {"source": "embedded"},
        "store": {"root": str(root / "prompts")},
        "engine": {"max_new_tokens_limit": 48},
        "serving": {"api_keys_file": str(keys), "max_in_flight_per_tenant": 8},
    })
    replica = PromptmuxServer(config)
    replica.test_loop = asyncio.new_event_loop()  # a replica's scheduler serves one event loop, as in Serve
    yield replica
    replica.test_loop.run_until_complete(replica.shutdown())
    replica.test_loop.close()


def call(server, *requests):
    """Send (method, path, kwargs) requests in order through the replica's app; the responses."""
    from promptmux.serving.replica.http_api import build_http_app

    async def main():
        transport = httpx.ASGITransport(app=build_http_app(server))
        async with httpx.AsyncClient(transport=transport, base_url="http://replica") as client:
            return [await client.request(method, path, **kwargs) for method, path, kwargs in requests]

    return server.test_loop.run_until_complete(main())


def complete(server, body, headers=KEY):
    return call(server, ("POST", "/v1/completions", {"json": body, "headers": headers}))[0]


def test_completion_of_the_demo_task(server):
    reply = complete(server, {"model": "reverse", "prompt": "hello"})
    assert reply.status_code == 200
    body = reply.json()
    assert body["object"] == "text_completion" and body["model"] == "reverse"
    assert body["choices"] == [{"text": "olleh", "index": 0, "logprobs": None, "finish_reason": "stop"}]
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 6, "total_tokens": 12}  # 5 bytes + EOS each


def test_a_prompt_list_is_one_batch_and_n_copies_each(server):
    body = complete(server, {"model": "upper", "prompt": ["abc", "hello42"], "n": 2, "max_tokens": 12}).json()
    assert [(c["index"], c["text"]) for c in body["choices"]] == [(0, "ABC"), (1, "ABC"), (2, "HELLO42"), (3, "HELLO42")]
    composed = complete(server, {"model": "reverse+upper", "prompt": "abc"})
    assert composed.status_code == 200  # a language prompt, then a task prompt


def test_sampling_controls_and_logprobs(server):
    body = complete(server, {"model": "reverse", "prompt": "hello", "logprobs": 2, "stop": ["le"],
                             "extra": None} | {"max_tokens": 10}).json()
    assert body["error"]["param"] == "extra"  # an unknown field is named, never ignored
    body = complete(server, {"model": "reverse", "prompt": "hello", "logprobs": 2, "stop": ["le"],
                             "min_tokens": 2}).json()
    choice = body["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == ("ol", "stop")
    assert choice["logprobs"]["tokens"] == ["o", "l", "l", "e"]  # the stop sequence's tokens are counted
    assert choice["logprobs"]["text_offset"] == [0, 1, 2, 3]
    assert all(len(top) == 2 for top in choice["logprobs"]["top_logprobs"])
    forced = complete(server, {"model": "reverse", "prompt": "hello", "max_tokens": 9, "ignore_eos": True}).json()
    assert forced["usage"]["completion_tokens"] == 9 and forced["choices"][0]["finish_reason"] == "length"


def test_choices_score_the_candidates(server):
    body = complete(server, {"model": "reverse", "prompt": "hello", "choices": ["hello", "olleh", "HELLO"]}).json()
    choice = body["choices"][0]
    assert choice["text"] == "olleh"
    scores = choice["choice_logprobs"]
    assert len(scores) == 3 and max(scores) == scores[1] and all(s < 0 for s in scores)


def test_stream_sends_the_same_text_then_done(server):
    reply = complete(server, {"model": "reverse", "prompt": ["hello", "abc42"], "stream": True,
                              "stream_options": {"include_usage": True}})
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
    events = [line[len("data: "):] for line in reply.text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    texts, finished = {0: "", 1: ""}, {}
    for chunk in chunks[:-1]:
        for c in chunk["choices"]:
            texts[c["index"]] += c["text"]
            if c["finish_reason"]:
                finished[c["index"]] = c["finish_reason"]
    assert texts == {0: "olleh", 1: "24cba"} and finished == {0: "stop", 1: "stop"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12


@pytest.mark.parametrize("body, status, param, says", [
    ({"model": "reverse", "prompt": "hello", "echo": True}, 400, "echo", "`echo` is not supported"),
    ({"model": "reverse", "prompt": "hello", "best_of": 2}, 400, "best_of", "not supported"),
    ({"prompt": "hello"}, 400, "model", "`model` is missing"),
    ({"model": "reverse", "prompt": [1, 2]}, 400, "prompt", "token id lists are not supported"),
    ({"model": "reverse", "prompt": ["a"] * 5, "n": 2}, 400, "prompt", "10 completions"),
    ({"model": "reverse", "prompt": "hello", "temperature": "hot"}, 400, "temperature", "must be a number"),
    ({"model": "reverse", "prompt": "hello", "max_tokens": 4096}, 400, None, "max_new_tokens=4096 is out of range"),
    ({"model": "a+b+c", "prompt": "hello"}, 400, "model", "is not a task name"),
    ({"model": "nosuch", "prompt": "hello"}, 404, None, "unknown task 'nosuch'"),
    ({"model": "reverse", "prompt": "x" * 100_000}, 400, None, "over the limit"),
])
def test_refusals_use_openai_error_bodies_with_the_right_status(server, body, status, param, says):
    reply = complete(server, body)
    assert reply.status_code == status
    error = reply.json()["error"]
    assert says in error["message"] and error["type"].endswith("_error")
    if param is not None:
        assert error["param"] == param


def test_keys_are_the_grpc_keys(server):
    for headers, says in (({}, "missing API key"), ({"Authorization": "Bearer wrong"}, "unknown API key"),
                          ({"Authorization": "Basic abc"}, "malformed")):
        reply = complete(server, {"model": "reverse", "prompt": "hello"}, headers)
        assert reply.status_code == 401 and says in reply.json()["error"]["message"]
        assert reply.json()["error"]["type"] == "authentication_error"


def test_a_body_over_the_limit_is_413_before_it_is_parsed(server):
    from promptmux.serving.rpc.message_limits import http_max_body_bytes

    limit = http_max_body_bytes(server._config)
    oversized = b"{" + b" " * limit + b"}"  # valid JSON, one byte too many

    async def chunks():
        for start in range(0, len(oversized), 1 << 20):
            yield oversized[start:start + (1 << 20)]

    declared, streamed = call(server, ("POST", "/v1/completions", {"content": oversized, "headers": KEY}),
                              ("POST", "/v1/completions", {"content": chunks(), "headers": KEY}))
    for reply in (declared, streamed):
        assert reply.status_code == 413 and "over the limit" in reply.json()["error"]["message"]


def test_models_lists_what_the_caller_can_call_paged(server):
    everything, first = call(server, ("GET", "/v1/models", {"headers": KEY}),
                             ("GET", "/v1/models", {"headers": KEY, "params": {"page_size": 4}}))
    names = [m["id"] for m in everything.json()["data"]]
    assert names == ["caesar", "copy", "reverse", "reverse-upper", "rotate", "upper"]
    assert everything.json()["data"][0]["owned_by"] == "demo"
    page = first.json()
    assert [m["id"] for m in page["data"]] == names[:4] and page["has_more"]
    rest = call(server, ("GET", "/v1/models", {"headers": KEY, "params": {"page_token": page["next_page_token"]}}))[0]
    assert [m["id"] for m in rest.json()["data"]] == names[4:] and not rest.json()["has_more"]
    assert call(server, ("GET", "/v1/models", {}))[0].status_code == 401


def test_unknown_paths_and_chat_are_short_json_404s(server):
    for method, path in (("GET", "/promptmux"), ("GET", "/"), ("POST", "/v1/embeddings"), ("POST", "/v1/chat/completions")):
        reply = call(server, (method, path, {"headers": KEY}))[0]
        assert reply.status_code == 404 and len(reply.content) < 400, (path, reply.content)
        assert reply.json()["error"]["type"] == "not_found_error"
    chat = call(server, ("POST", "/v1/chat/completions", {"json": {}}))[0]
    assert "not a chat model" in chat.json()["error"]["message"]
    wrong = call(server, ("GET", "/v1/completions", {"headers": KEY}))[0]
    assert wrong.status_code == 405 and "POST /v1/completions" in wrong.json()["error"]["message"]


@pytest.mark.parametrize("error, status", [
    ("InvalidRequestError", 400), ("UnauthenticatedError", 401), ("PermissionDeniedError", 403),
    ("TaskNotFoundError", 404), ("ResourceExhaustedError", 429), ("UnavailableError", 503),
    ("DeadlineExceededError", 504), ("PromptmuxError", 500),
])
def test_every_error_status_has_its_http_status(error, status):
    from promptmux.prompts import errors
    from promptmux.serving.rpc.openai_schema import error_body

    code, body = error_body(getattr(errors, error)("what went wrong, and how to fix it"))
    assert code == status and body["error"]["message"] == "what went wrong, and how to fix it"


def test_a_replica_shutting_down_answers_503(tmp_path):
    from promptmux.serving.replica.server import PromptmuxServer

    keys = write_key_file(tmp_path / "keys.yaml", [("acme", "key-acme", False)])
    config = AppConfig.from_args({"model": {"source": "embedded"}, "store": {"root": str(tmp_path / "prompts")},
                                  "serving": {"api_keys_file": str(keys), "shutdown_grace_s": 0}})
    replica = PromptmuxServer(config)
    replica.test_loop = asyncio.new_event_loop()
    try:
        replica.test_loop.run_until_complete(replica.shutdown())
        reply = complete(replica, {"model": "reverse", "prompt": "hello"})
        assert reply.status_code == 503 and "shutting down" in reply.json()["error"]["message"]
    finally:
        replica.test_loop.close()
