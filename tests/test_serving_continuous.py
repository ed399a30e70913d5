"""Continuous batching through Ray Serve's gRPC proxy (the shared `serving` fixture runs the
step scheduler, the default): streams get their tokens step by step, and a client that goes
away frees its slot, visibly in the metrics."""
from __future__ import annotations

import contextlib
import threading
import time

import grpc
import pytest

from conftest import metric

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def pb():
    from promptmux.serving.rpc.proto_gen import promptmux_pb2

    return promptmux_pb2


def test_the_shared_fixture_runs_continuous_batching(serving, pb):
    health = serving.stub().Health(pb.HealthRequest(), metadata=serving.metadata(None), timeout=30)
    assert health.batching == "continuous"


def test_a_stream_gets_its_tokens_step_by_step(serving, pb):
    stub = serving.stub()
    text = "abcdefghijklmnopqrstuvwx"
    request = pb.GenerateRequest(task="reverse", text=text, params=pb.GenerationParams(max_new_tokens=40))
    arrivals, messages = [], []
    for message in stub.GenerateStream(request, metadata=serving.metadata("acme"), timeout=60):
        arrivals.append(time.monotonic())
        messages.append(message)
    final = messages[-1]
    assert final.done and final.result.text == text[::-1]  # the trained demo task, exactly
    deltas = [m for m in messages[:-1] if m.delta]
    # One message per decoder step (a slow reader may get two steps' tokens in one): the text
    # arrives in pieces while the request decodes, not all at the end.
    assert len(deltas) >= len(text) // 2
    # The first piece comes long before the end (a reader the proxy kept waiting at the start
    # may get a few steps' tokens in it, so not exactly one).
    assert deltas[0].output_tokens <= len(text) // 4
    counts = [m.output_tokens for m in deltas]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)
    assert "".join(m.delta for m in messages) == final.result.text


def slot_metrics(text: str) -> tuple[float, float]:
    return (metric(text, "ray_promptmux_slots_freed_total", reason="cancelled"),
            metric(text, "ray_promptmux_active_slots"))


@contextlib.contextmanager
def busy_engine(serving, pb, streams: int = 10):
    """Another tenant keeps `streams` long generations decoding, so every step takes longer and
    a cancel reaches the replica while the cancelled request still decodes (on a quiet
    machine a lone 64-token request can finish before its cancel arrives)."""
    stop = threading.Event()
    request = pb.GenerateRequest(task="reverse", text="keep the engine busy " * 3,
                                 params=pb.GenerationParams(max_new_tokens=64))

    def load() -> None:
        stub = serving.stub()
        end = time.monotonic() + 60  # bounded even if the test never stops it
        while not stop.is_set() and time.monotonic() < end:
            try:
                for _ in stub.GenerateStream(request, metadata=serving.metadata("acme"), timeout=30):
                    pass
            except grpc.RpcError:
                pass

    threads = [threading.Thread(target=load, daemon=True) for _ in range(streams)]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)


def test_a_cancelled_stream_frees_its_slot_and_the_metrics_show_it(serving, pb):
    stub = serving.stub()
    request = pb.GenerateRequest(task="reverse", text="cancel me before the end " * 2,
                                 params=pb.GenerationParams(max_new_tokens=64))
    freed_before, _ = slot_metrics(serving.scrape())
    with busy_engine(serving, pb):
        cancels = cancel_one_stream(serving, stub, request, freed_before)
    # The slot is free again: nothing decodes once the stream and the load are gone.
    text = serving.wait_for_metrics(lambda t: slot_metrics(t)[1] == 0)
    # A retried cancel may count late too (metrics export lags under load), never more than were sent.
    assert freed_before + 1 <= slot_metrics(text)[0] <= freed_before + cancels
    for name in ("ray_promptmux_step_seconds_count", "ray_promptmux_time_to_first_token_seconds_count",
                 "ray_promptmux_admission_wait_seconds_count", "ray_promptmux_generated_tokens_total"):
        assert metric(text, name) > 0, f"{name} is missing or zero"


def cancel_one_stream(serving, stub, request, freed_before: float) -> int:
    """Cancel one decoding stream until the replica counts a cancelled slot; returns the cancels sent."""
    for attempt in range(1, 4):  # a request that finishes before the cancel reaches the replica proves nothing: retry
        call = stub.GenerateStream(request, metadata=serving.metadata("globex"), timeout=60)
        first = next(call)
        assert not first.done and first.output_tokens >= 1  # decoding in a slot now
        call.cancel()
        with pytest.raises(grpc.RpcError) as gone:
            for _ in call:
                pass
        assert gone.value.code() == grpc.StatusCode.CANCELLED
        try:
            serving.wait_for_metrics(lambda t: slot_metrics(t)[0] > freed_before, limit_s=10)
            return attempt
        except AssertionError:
            continue
    pytest.fail("three cancelled streams never showed in promptmux_slots_freed_total{reason='cancelled'}")
