"""A replica's health and death: check_health notices a stalled engine or a hung store, Serve
replaces such a replica, and callers whose requests were in flight get UNAVAILABLE (never
INTERNAL, never a hang), whether Serve stopped the replica or it was killed.

The Serve tests stall a replica the way a hung NFS volume does: the prompt file a batch
must read is swapped for a FIFO, and opening a FIFO with no writer blocks in the kernel,
exactly where a read from a stuck mount blocks. Nothing in the server knows about tests.
"""
from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from conftest import hand_prepared
from promptmux.serving.engine.plan import StepOutputs
from promptmux.serving.scheduling.batcher import Batcher
from promptmux.serving.replica.health import ReplicaHealth, ReplicaUnhealthyError
from promptmux.serving.engine.types import BatchStats, GenerationRequest, GenerationResult
from promptmux.serving.config import AppConfig, ServingConfig

# ---------------------------------------------------------------------- without Ray


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class GatedEngine:
    """A static executor that holds each batch until `gate` is set; answers `ok` for every request."""

    slots = 0

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()

    def execute(self, plan, stream=None):
        self.entered.set()
        assert self.gate.wait(20), "the test never released the engine"
        outputs = StepOutputs(static=BatchStats(len(plan.static), 1, 0.0, 0, 0, 0.0, 0.0))
        for handle, prepared in plan.static:
            outputs.finished[handle] = GenerationResult(prepared.request.request_id, "ok", [1], "eos", 0, 1, 1)
        return outputs


def request(text: str = "x"):
    return hand_prepared(GenerationRequest(tenant="acme", text=text, task="t", request_id=text))


def test_stalled_for_counts_only_time_with_work_and_no_progress():
    clock, engine = Clock(), GatedEngine()

    async def main():
        batcher = Batcher(ServingConfig(max_batch_size=4, batch_wait_timeout_s=0.0).resolved(64),
                          engine, clock=clock)
        assert batcher.stalled_for() == 0.0
        clock.now += 500  # a long idle spell is not a stall
        job = asyncio.ensure_future(batcher.submit(request()))
        await asyncio.sleep(0)
        assert batcher.stalled_for() == 0.0
        while not engine.entered.is_set():
            await asyncio.sleep(0.005)
        clock.now += 42  # the batch started at the old time and has not finished
        assert batcher.stalled_for() == pytest.approx(42)
        assert batcher.stalled_for(now=clock.now + 8) == pytest.approx(50)
        engine.gate.set()
        assert (await job).text == "ok"
        assert batcher.stalled_for(now=clock.now + 1000) == 0.0  # idle again
        await batcher.close(0)

    asyncio.run(asyncio.wait_for(main(), 30))


class FixedStall:
    def __init__(self, seconds: float) -> None:
        self.seconds, self.queue_depth = seconds, 3

    def stalled_for(self, now=None) -> float:
        return self.seconds


def test_health_fails_when_the_engine_stalls_past_the_limit(tmp_path):
    config = ServingConfig(engine_stall_timeout_s=30)
    asyncio.run(ReplicaHealth(config, FixedStall(29.0), tmp_path).check())
    with pytest.raises(ReplicaUnhealthyError, match=r"no batch for 31\.0s .*engine_stall_timeout_s=30"):
        asyncio.run(ReplicaHealth(config, FixedStall(31.0), tmp_path).check())


def test_health_fails_when_the_store_is_missing(tmp_path):
    health = ReplicaHealth(ServingConfig(), FixedStall(0), tmp_path / "not-mounted")
    with pytest.raises(ReplicaUnhealthyError, match="not-mounted cannot be listed"):
        asyncio.run(health.check())


def test_health_fails_within_its_limit_when_the_store_hangs_and_never_stacks_probes(tmp_path):
    release, calls = threading.Event(), []

    def hanging_probe(root: Path) -> None:  # a listing stuck in the kernel, as on a hung NFS mount
        calls.append(root)
        release.wait(20)

    health = ReplicaHealth(ServingConfig(store_check_timeout_s=0.2), FixedStall(0), tmp_path, probe=hanging_probe)

    async def main():
        for _ in range(3):
            started = time.monotonic()
            with pytest.raises(ReplicaUnhealthyError, match="has not returned after .* the volume is hung"):
                await health.check()
            assert time.monotonic() - started < 5
        assert len(calls) == 1, "a stuck probe is reported again, not joined by another thread"
        release.set()
        await asyncio.sleep(0.05)
        await health.check()  # the volume answers again: healthy, with a fresh probe
        assert len(calls) == 2

    asyncio.run(main())


@pytest.mark.parametrize("key", ["engine_stall_timeout_s", "store_check_timeout_s"])
def test_health_limits_must_be_positive(key):
    with pytest.raises(ValueError, match=f"serving.{key}=0 is invalid"):
        AppConfig.from_args({"serving": {key: 0}})


# ---------------------------------------------------------------------- through Serve

FRAGILE_APP = "promptmux-fragile"
STALL_LIMIT_S = 2.0


@dataclass
class Replica:
    name: str
    actor: object
    pid: int


@dataclass
class FragileApp:
    """A second small application on the shared Serve instance, with its own store and a
    short stall limit, so a test may stall and kill its replica without touching `serving`."""

    grpc_target: str
    store_root: Path
    keys: dict

    def metadata(self, tenant: str = "acme"):
        return [("application", FRAGILE_APP), ("authorization", f"Bearer {self.keys[tenant]}")]

    def stub(self, retry_unavailable: bool = False):
        from promptmux.serving.rpc.proto_gen import promptmux_pb2_grpc

        options = []
        if retry_unavailable:  # gRPC's standard client retries, as a careful caller configures them
            options.append(("grpc.service_config", (
                '{"methodConfig": [{"name": [{"service": "promptmux.v1.Promptmux"}], "retryPolicy": {'
                '"maxAttempts": 5, "initialBackoff": "0.5s", "maxBackoff": "4s", "backoffMultiplier": 2,'
                '"retryableStatusCodes": ["UNAVAILABLE"]}}]}')))
        return promptmux_pb2_grpc.PromptmuxStub(grpc.insecure_channel(self.grpc_target, options=options))

    def generate(self, task: str, tenant: str = "acme", stub=None):
        from promptmux.serving.rpc.proto_gen import promptmux_pb2 as pb

        stub = stub or self.stub()
        params = pb.GenerationParams(max_new_tokens=4)
        return stub.Generate(pb.GenerateRequest(task=task, text="hi", params=params),
                             metadata=self.metadata(tenant), timeout=120)

    def register(self, task: str) -> Path:
        """A new private task of acme, visible on the replica; returns its version file."""
        import torch

        from promptmux.prompts.store import PromptStore
        from promptmux.serving.rpc.proto_gen import promptmux_pb2 as pb

        PromptStore(self.store_root, d_model=256, max_length=64).register("acme", task, torch.randn(4, 256))
        stub, end = self.stub(), time.monotonic() + 60
        while task not in [t.task for t in stub.ListTasks(pb.ListTasksRequest(), metadata=self.metadata(), timeout=30).tasks]:
            assert time.monotonic() < end, f"the replica never listed {task}"
            time.sleep(0.2)
        (path,) = (self.store_root / "acme" / task).glob("v*.safetensors")
        return path

    def replica(self) -> Replica:
        import ray

        prefix = f"SERVE_REPLICA::{FRAGILE_APP}#"
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["namespace"] == "serve" and a["name"].startswith(prefix)]
        assert len(names) == 1, f"expected one replica of {FRAGILE_APP}, found {names}"
        actor = ray.get_actor(names[0], namespace="serve")
        return Replica(names[0], actor, ray.get(actor.is_allocated.remote(), timeout=30)[0])

    def wait_until_serving(self, timeout_s: float = 180) -> None:
        from promptmux.serving.rpc.proto_gen import promptmux_pb2 as pb

        stub, end = self.stub(), time.monotonic() + timeout_s
        while True:
            try:
                if stub.Health(pb.HealthRequest(), metadata=self.metadata(), timeout=10).status == "SERVING":
                    return
            except grpc.RpcError:
                assert time.monotonic() < end, f"{FRAGILE_APP} did not come back within {timeout_s}s"
            time.sleep(0.3)


@pytest.fixture(scope="module")
def fragile(serving, tmp_path_factory):
    from ray import serve

    from promptmux.serving.replica.app import build_deployment

    store_root = tmp_path_factory.mktemp("fragile") / "prompts"
    args = {
        "model": {"source": "embedded"},
        "store": {"root": str(store_root), "max_prompt_length": 64, "refresh_interval_s": 0.25},
        # No host tier: these tests stall the batch on a hung prompt read, which the host tier
        # would move to admission (Engine.prepare), outside the batch the stall check watches.
        "engine": {"max_batch_size": 8, "max_new_tokens_limit": 16, "prompt_host_cache_rows": 0},
        "serving": {"api_keys_file": serving.args["serving"]["api_keys_file"], "torch_threads": 1,
                    "engine_stall_timeout_s": STALL_LIMIT_S, "shutdown_grace_s": 0.5},
    }
    app = build_deployment(AppConfig.from_args(args), ray_actor_options={"num_cpus": 0.5},
                           health_check_period_s=1, health_check_timeout_s=10)
    serve.run(app, name=FRAGILE_APP, route_prefix=f"/{FRAGILE_APP}", blocking=False)
    harness = FragileApp(grpc_target=serving.grpc_target, store_root=store_root, keys=serving.keys)
    harness.wait_until_serving()
    yield harness
    serve.delete(FRAGILE_APP)


@contextmanager
def hung_read(path: Path):
    """While inside, opening `path` blocks as on a hung NFS mount (it is a FIFO with no writer).
    The real file comes back on exit, for the replacement replica to read."""
    backup = path.with_name("backup")
    os.link(path, backup)
    fifo = path.with_name("fifo")
    os.mkfifo(fifo)
    os.replace(fifo, path)
    try:
        yield
    finally:
        os.replace(backup, path)


def wait_until_check_health_fails(replica: Replica, limit_s: float = 60) -> str:
    """Ask the replica's own check_health (what Serve calls) until it reports the stall."""
    import ray

    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        try:
            ray.get(replica.actor.check_health.remote(), timeout=10)
        except Exception as error:  # noqa: BLE001 (Ray wraps the replica's error)
            if "started or finished no batch" in str(error):
                return str(error)
            raise
        time.sleep(0.1)
    raise AssertionError(f"check_health never failed within {limit_s}s although the engine is stalled")


def wait_until_in_replica(replica: Replica, count: int, limit_s: float = 60) -> None:
    """Until `count` requests are inside the replica (Serve's own count, read off the event loop)."""
    import ray

    end = time.monotonic() + limit_s
    while ray.get(replica.actor.get_num_ongoing_requests.remote(), timeout=10) < count:
        assert time.monotonic() < end, f"{count} requests never reached the replica"
        time.sleep(0.05)


def outcome(call):
    try:
        call.result(timeout=180)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as error:
        return error.code(), error.details()


@pytest.mark.ray
def test_a_stalled_replica_fails_its_health_check_and_serve_replaces_it(fragile):
    path = fragile.register("hang-health")
    stalled = fragile.replica()
    with ThreadPoolExecutor(4) as pool, hung_read(path):
        stuck = pool.submit(fragile.generate, "hang-health")
        queued = pool.submit(fragile.generate, "reverse", "globex")
        message = wait_until_check_health_fails(stalled)
        assert f"engine_stall_timeout_s={STALL_LIMIT_S}" in message
    # Serve marks the replica unhealthy, stops it and starts another; the callers are told to retry.
    for code, details in (outcome(stuck), outcome(queued)):
        assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
    fragile.wait_until_serving()
    replacement = fragile.replica()
    assert replacement.name != stalled.name and replacement.pid != stalled.pid
    assert fragile.generate("hang-health").output_tokens > 0  # the replacement reads the store again


@pytest.mark.ray
def test_requests_in_flight_on_a_killed_replica_get_unavailable_and_retries_all_succeed(fragile):
    path = fragile.register("hang-kill")
    fragile.wait_until_serving()
    doomed = fragile.replica()
    with ThreadPoolExecutor(8) as pool:
        with hung_read(path):
            in_flight = [pool.submit(fragile.generate, "hang-kill")] + [
                pool.submit(fragile.generate, "reverse", tenant) for tenant in ("globex", "flood", "acme")]
            wait_until_in_replica(doomed, len(in_flight))  # long before Serve's health check could act
            os.kill(doomed.pid, signal.SIGKILL)  # only the replica this test started
        outcomes = [outcome(call) for call in in_flight]
        for code, details in outcomes:
            assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
            assert "stopped before it replied" in details and "retry" in details
        # Callers that retry UNAVAILABLE (gRPC's retry policy) lose nothing: the restarted replica serves them.
        retrying = fragile.stub(retry_unavailable=True)
        again = [pool.submit(fragile.generate, task, "acme", retrying) for task in ("hang-kill", "reverse") * 4]
        assert [outcome(call)[0] for call in again] == [grpc.StatusCode.OK] * len(again)
    assert fragile.replica().pid != doomed.pid


@pytest.mark.ray
def test_serve_exports_the_healthy_replica_count_the_alert_rules_read(serving):
    # deploy/kubernetes/base/prometheusrule.yaml alerts on this series, by these labels.
    from conftest import metric

    serving.wait_for_metrics(lambda text: metric(
        text, "ray_serve_deployment_replica_healthy", application="promptmux", deployment="PromptmuxServer") >= 1)
