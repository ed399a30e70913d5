"""One tenant's abuse through gRPC never fails, changes or stalls another tenant's requests.

Each test runs the abuse concurrently with a well-behaved tenant's traffic on the shared
`serving` application and checks what both saw: the abuser's exact status, and the other
tenant's requests all succeeding with exactly the text they get alone, and staying fast.
"""
from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

pytestmark = pytest.mark.ray

ABUSER, VICTIM = "flood", "acme"
REPEATS = 4  # each oversize case, concurrently: tokenizing them all took many seconds before the size check


@pytest.fixture(scope="module")
def pb():
    from promptmux.serving.rpc.proto_gen import promptmux_pb2

    return promptmux_pb2


def outcome(call, request, metadata, timeout=60.0):
    """(status code, reply or details) of one call."""
    try:
        return grpc.StatusCode.OK, call(request, metadata=metadata, timeout=timeout)
    except grpc.RpcError as error:
        return error.code(), error.details()


def victim_requests(pb) -> list:
    texts = ["hello", "abc123", "tenant", "zyx", "promptmux", "a1b2c3", "queue", "batch", "mixed", "ok"]
    requests = [pb.GenerateRequest(task="reverse", text=t, params=pb.GenerationParams(max_new_tokens=24))
                for t in texts]
    requests.append(pb.GenerateRequest(task="reverse", text="beams", params=pb.GenerationParams(
        strategy=pb.BEAM, num_beams=3, max_new_tokens=12)))
    return requests  # 11: under the tenant's in-flight limit of 12


def poison_requests(pb) -> dict[str, tuple]:
    def sample(**fields):
        return pb.GenerateRequest(task="reverse", text="hello", params=pb.GenerationParams(
            strategy=pb.SAMPLE, max_new_tokens=8, **fields))

    return {
        "temperature=1e-300": (sample(temperature=1e-300), "temperature=1e-300 is invalid"),
        "temperature=1e39": (sample(temperature=1e39), "temperature=1e+39 is invalid"),
        "top_p=1e-300": (sample(top_p=1e-300), "top_p=1e-300 is invalid"),
        "length_penalty=1e300": (pb.GenerateRequest(task="reverse", text="hello", params=pb.GenerationParams(
            strategy=pb.BEAM, num_beams=2, length_penalty=1e300)), "length_penalty=1e+300 is invalid"),
        "num_beams=2**32-1": (pb.GenerateRequest(task="reverse", text="hello", params=pb.GenerationParams(
            strategy=pb.BEAM, num_beams=2**32 - 1)), "num_beams=4294967295 is out of range"),
    }


def test_poison_parameters_fail_alone_and_another_tenant_sees_nothing(serving, pb):
    stub = serving.stub()
    good = victim_requests(pb)
    alone = [stub.Generate(r, metadata=serving.metadata(VICTIM), timeout=60) for r in good]
    poison = poison_requests(pb)
    abuse = [(name, request, message) for name, (request, message) in poison.items()] * 2
    with ThreadPoolExecutor(len(good) + len(abuse)) as pool:
        abused = [pool.submit(outcome, stub.Generate, r, serving.metadata(ABUSER)) for _, r, _ in abuse]
        victims = [pool.submit(outcome, stub.Generate, r, serving.metadata(VICTIM)) for r in good]
        abused, victims = [f.result() for f in abused], [f.result() for f in victims]
    failed = [(code, reply) for code, reply in victims if code != grpc.StatusCode.OK]
    assert failed == [], f"{len(failed)} of {len(victims)} of the other tenant's requests failed: {failed}"
    assert [(r.text, r.output_tokens) for _, r in victims] == [(r.text, r.output_tokens) for r in alone]
    assert alone[0].text == "olleh"
    for (name, _, message), (code, details) in zip(abuse, abused):
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (name, code, details)
        assert message in details, (name, details)


def test_oversize_text_is_refused_before_work_and_another_tenant_stays_fast(serving, pb):
    stub = serving.stub()
    small = pb.GenerateRequest(task="reverse", text="hello", params=pb.GenerationParams(max_new_tokens=8))
    victim = serving.metadata("globex")

    def timed() -> float:
        started = time.perf_counter()
        reply = stub.Generate(small, metadata=victim, timeout=60)
        assert reply.text == "olleh"
        return time.perf_counter() - started

    baseline = max(timed() for _ in range(5))
    big = grpc.insecure_channel(serving.grpc_target, options=[("grpc.max_send_message_length", 64 << 20)])
    from promptmux.serving.rpc.proto_gen import promptmux_pb2_grpc

    abuser = promptmux_pb2_grpc.PromptmuxStub(big)
    limit = 512 * 32  # engine.max_input_bytes, derived from max_input_tokens=512
    cases = [
        # Over the gRPC message limit (4 MiB here): refused by the proxy, never reaching a replica.
        ("30 MB", pb.GenerateRequest(task="reverse", text="x" * 30_000_000), grpc.StatusCode.RESOURCE_EXHAUSTED,
         "Received message larger than max"),
        # Under it but over engine.max_input_bytes: refused by the replica before tokenizing.
        # Tokenizing 3.9 MB took seconds of the replica's CPU (and GIL) before the check.
        ("3.9 MB", pb.GenerateRequest(task="reverse", text="y" * 3_900_000), grpc.StatusCode.INVALID_ARGUMENT,
         f"is 3900000 bytes (UTF-8), over the limit of {limit} (engine.max_input_bytes)"),
        ("3.9 MB, truncate", pb.GenerateRequest(task="reverse", text="z" * 3_900_000, truncate=True),
         grpc.StatusCode.INVALID_ARGUMENT, "engine.max_input_bytes"),
        ("multi-byte", pb.GenerateRequest(task="reverse", text="é" * (limit // 2 + 1)), grpc.StatusCode.INVALID_ARGUMENT,
         f"is {limit + 2} bytes (UTF-8)"),
    ]
    latencies: list[float] = []
    done = threading.Event()

    def victim_loop():
        while not done.is_set():
            latencies.append(timed())

    watcher = threading.Thread(target=victim_loop)
    watcher.start()
    abuse_seconds = {}
    try:
        time.sleep(0.2)
        with ThreadPoolExecutor(2 * REPEATS) as pool:
            futures = {(name, i): pool.submit(_timed_outcome, abuser.Generate, request, serving.metadata(ABUSER))
                       for name, request, _, _ in cases for i in range(REPEATS)}
            results = {key: f.result() for key, f in futures.items()}
        time.sleep(0.2)
    finally:
        done.set()
        watcher.join(120)
        big.close()
    assert len(latencies) >= 3
    bound = 1.0 + 2 * baseline
    assert max(latencies) < bound, (
        f"another tenant waited {max(latencies):.2f}s during the oversize requests (alone: {baseline:.2f}s)"
    )
    for name, _, code, message in cases:
        for i in range(REPEATS):
            got, details, seconds = results[(name, i)]
            assert got == code and message in details, (name, got, details)
            abuse_seconds[name] = max(abuse_seconds.get(name, 0.0), seconds)
    print(f"\noversize abuse: {abuse_seconds}; other tenant max {max(latencies):.3f}s over {len(latencies)} "
          f"requests, alone max {baseline:.3f}s")


def _timed_outcome(call, request, metadata):
    started = time.perf_counter()
    code, details = outcome(call, request, metadata)
    return code, details if isinstance(details, str) else "", time.perf_counter() - started


def test_generate_batch_over_its_limit_is_refused_whole(serving, pb):
    stub = serving.stub()
    items = [pb.GenerateRequest(task="reverse", text="hello")] * 13
    code, details = outcome(stub.GenerateBatch, pb.GenerateBatchRequest(requests=items), serving.metadata(VICTIM))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == (
        "GenerateBatch got 13 requests, more than one tenant may have in flight "
        "(serving.max_in_flight_per_tenant=12); split it into calls of at most 12"
    )
    reply = stub.GenerateBatch(pb.GenerateBatchRequest(requests=items[:12]), metadata=serving.metadata(VICTIM), timeout=60)
    assert [item.reply.text for item in reply.items] == ["olleh"] * 12


# ---------------------------------------------------------------------- fuzz

METHODS = ["Generate", "GenerateStream", "GenerateBatch", "RegisterPrompt", "RegisterPrompts", "ListPrompts",
           "GetPrompt", "DeletePrompt", "ListTasks", "Health"]
EXTREME_FLOATS = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e-300, 5e-324, 1e308, -1.0, 1e39, 1e-39, 0.5]
EXTREME_UINTS = [0, 1, 2**31 - 1, 2**32 - 1]


def random_text(rng: random.Random) -> str:
    kind = rng.randrange(5)
    if kind == 0:
        return ""
    if kind == 1:
        return "".join(chr(rng.randrange(0x20, 0x7F)) for _ in range(rng.randrange(1, 40)))
    if kind == 2:
        return "".join(chr(rng.choice([rng.randrange(0x80, 0xD800), rng.randrange(0xE000, 0x110000)]))
                       for _ in range(rng.randrange(1, 20)))
    if kind == 3:
        return rng.choice(["reverse", "copy\n", "../../etc", "acme/reverse", " ", "\x00", "é" * 200, "x" * 129])
    return "w" * rng.randrange(1, 20_000)


def random_params(pb, rng: random.Random):
    fields = {}
    if rng.random() < 0.7:
        fields["max_new_tokens"] = rng.choice(EXTREME_UINTS + [2, 8])
    fields["strategy"] = rng.choice([0, 1, 2, 3, 4, 2**31 - 1, -1])
    for name in ("temperature", "top_p", "length_penalty"):
        if rng.random() < 0.6:
            fields[name] = rng.choice(EXTREME_FLOATS)
    if rng.random() < 0.5:
        fields["num_beams"] = rng.choice(EXTREME_UINTS + [2])
    if rng.random() < 0.5:
        fields["seed"] = rng.choice([0, 2**63, 2**64 - 1])
    return pb.GenerationParams(**fields)


def random_generate(pb, rng: random.Random):
    return pb.GenerateRequest(
        task=rng.choice(["reverse", "upper", "", random_text(rng)]),
        language=rng.choice(["", "", random_text(rng)]),
        text=random_text(rng),
        params=random_params(pb, rng),
        truncate=rng.random() < 0.3,
        request_id=rng.choice(["", "r1", "q" * 300]),
    )


def random_message(pb, method: str, rng: random.Random):
    """A well-formed message of `method`'s request type with extreme or random field values."""
    if method in ("Generate", "GenerateStream"):
        return random_generate(pb, rng)
    if method == "GenerateBatch":
        return pb.GenerateBatchRequest(requests=[random_generate(pb, rng) for _ in range(rng.randrange(0, 14))])
    if method == "RegisterPrompts":
        return pb.RegisterPromptsRequest(prompts=[random_message(pb, "RegisterPrompt", rng)
                                                  for _ in range(rng.choice([0, 1, 3]))])
    if method == "RegisterPrompt":
        shape = rng.choice([[], [1], [1, 256], [0, 256], [2**32 - 1, 2**32 - 1], [65, 256], [2, 128], [1, 256, 1]])
        data = rng.choice([b"", b"\0" * 1024, bytes(rng.randrange(256) for _ in range(1024)), b"\xff" * 2048])
        return pb.RegisterPromptRequest(
            tenant=rng.choice(["", ABUSER, VICTIM, random_text(rng)]), task=rng.choice(["fuzz", random_text(rng)]),
            tensor=pb.PromptTensor(dtype=rng.choice(["float32", "bfloat16", "int8", "", random_text(rng)]),
                                   shape=shape, data=data),
            shared=rng.random() < 0.5, description=random_text(rng))
    if method == "ListPrompts":
        return pb.ListPromptsRequest(tenant=rng.choice(["", ABUSER, VICTIM, random_text(rng)]))
    if method in ("GetPrompt", "DeletePrompt"):
        kind = pb.GetPromptRequest if method == "GetPrompt" else pb.DeletePromptRequest
        fields = dict(tenant=rng.choice(["", VICTIM, random_text(rng)]), task=rng.choice(["fuzz", "reverse", random_text(rng)]))
        if method == "GetPrompt":
            fields["version"] = rng.choice(EXTREME_UINTS)
        return kind(**fields)
    return pb.ListTasksRequest() if method == "ListTasks" else pb.HealthRequest()


def mutate(data: bytes, rng: random.Random) -> bytes:
    """Random bytes, or a valid encoding truncated, extended or with flipped bytes."""
    kind = rng.randrange(4)
    if kind == 0 or not data:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64)))
    if kind == 1:
        return data[: rng.randrange(len(data))]
    if kind == 2:
        return data + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16)))
    flipped = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        flipped[rng.randrange(len(flipped))] = rng.randrange(256)
    return bytes(flipped)


def test_fuzz_ten_thousand_malformed_or_extreme_messages(serving, pb):
    """Raw bytes through a generic channel on every method's path, and well-formed messages
    with extreme values: no reply is INTERNAL or UNKNOWN, and the server then answers a
    normal request correctly. Never with the admin key: fuzzed deletes stay the abuser's."""
    rng = random.Random(1313)
    channel = grpc.insecure_channel(serving.grpc_target, options=[("grpc.max_send_message_length", 64 << 20)])
    grpc.channel_ready_future(channel).result(timeout=30)
    calls = {}
    for method in METHODS:
        path = f"/promptmux.v1.Promptmux/{method}"
        make = channel.unary_stream if method == "GenerateStream" else channel.unary_unary
        calls[method] = make(path, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    metadatas = [serving.metadata(ABUSER), serving.metadata(ABUSER), serving.metadata(None),
                 [("application", "promptmux"), ("authorization", "Bearer " + "k" * 50)]]
    total, in_flight = 10_000, threading.BoundedSemaphore(256)
    codes: dict[str, int] = {}
    bad: list = []
    lock = threading.Lock()

    def record(code, method, details):
        with lock:
            codes[code.name] = codes.get(code.name, 0) + 1
            if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN) and len(bad) < 20:
                bad.append((method, code.name, details))

    def finished(future, method):
        try:
            future.result()
            record(grpc.StatusCode.OK, method, "")
        except grpc.RpcError as error:
            record(error.code(), method, error.details())
        finally:
            in_flight.release()

    started = time.monotonic()
    streams = []
    for i in range(total):
        method = METHODS[i % len(METHODS)]
        valid = random_message(pb, method, rng).SerializeToString()
        data = valid if rng.random() < 0.5 else mutate(valid, rng)
        metadata = rng.choice(metadatas)
        in_flight.acquire()
        if method == "GenerateStream":
            streams.append((method, calls[method](data, metadata=metadata, timeout=20)))
            in_flight.release()
            if len(streams) >= 64:
                _drain(streams, record)
            continue
        future = calls[method].future(data, metadata=metadata, timeout=20)
        future.add_done_callback(lambda f, m=method: finished(f, m))
    _drain(streams, record)
    for _ in range(256):
        in_flight.acquire()  # every unary call finished
    elapsed = time.monotonic() - started
    channel.close()
    print(f"\nfuzz: {total} messages in {elapsed:.1f}s: {dict(sorted(codes.items()))}")
    assert sum(codes.values()) == total
    assert bad == [], f"INTERNAL or UNKNOWN replies: {bad}"
    stub = serving.stub()
    reply = stub.Generate(pb.GenerateRequest(task="reverse", text="hello"), metadata=serving.metadata(VICTIM), timeout=60)
    assert reply.text == "olleh"


def _drain(streams, record) -> None:
    for method, stream in streams:
        try:
            for _ in stream:
                pass
            record(grpc.StatusCode.OK, method, "")
        except grpc.RpcError as error:
            record(error.code(), method, error.details())
    streams.clear()
