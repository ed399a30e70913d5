"""Shared fixtures.

Ray: every test that needs Ray uses ONE local cluster for the whole session (`ray_cluster`)
and the serving tests share ONE deployed application (`serving`): starting Ray, Serve and a
replica costs seconds on a 2-core machine, so nothing here starts them twice.
"""
from __future__ import annotations

import importlib
import os
import re
import socket
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# ---------------------------------------------------------------------- optional modules


def require_module(name: str):
    """Import an optional test dependency: skip without it, except in CI, where it must fail.

    CI installs every test extra, so a missing module there is a broken install and must not
    pass quietly as a skip. Elsewhere (the GPU device image has no grpc_tools or jsonschema)
    the tests that need it skip and the rest of the module still runs.
    """
    if os.environ.get("CI"):
        return importlib.import_module(name)
    return pytest.importorskip(name, reason=f"needs {name}; install the test extras: pip install -e '.[serve,test]'")


# ---------------------------------------------------------------------- requests without a model


def hand_prepared(request, token_ids=None):
    """A PreparedRequest built by hand (no engine, no prompts): what schedulers and fake
    executors take. Its tokens are the text's characters unless given."""
    from promptmux.serving.engine.types import PreparedRequest

    tokens = tuple(ord(c) for c in request.text) if token_ids is None else tuple(token_ids)
    return PreparedRequest(request=request, token_ids=tokens, prompts=())


# ---------------------------------------------------------------------- Ray cluster


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class RayCluster:
    metrics_port: int

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the session, with Prometheus metrics on a free loopback port."""
    ray = pytest.importorskip("ray")
    metrics_port = free_port()
    ray.init(
        address="local",  # a private cluster, never one another process started on this machine
        num_cpus=2,
        include_dashboard=False,
        _metrics_export_port=metrics_port,
        # Metrics reach the endpoint every second instead of every ten, so tests wait less.
        _system_config={"metrics_report_interval_ms": 1000},
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        yield RayCluster(metrics_port=metrics_port)
    finally:
        try:
            from ray import serve

            serve.shutdown()
        finally:
            ray.shutdown()


# ---------------------------------------------------------------------- serving app

TENANT_KEYS = {"acme": "key-acme-7d1f", "globex": "key-globex-29ab", "flood": "key-flood-5c0e"}
ADMIN_TENANT, ADMIN_KEY = "ops", "key-ops-admin-88e2"
D_MODEL = 256  # the embedded model's width
# Private tasks of two tenants, with clashing ids ("summarize") to prove isolation, plus
# tasks another tenant shares with everyone.
PRIVATE_TASKS = {
    "acme": ["summarize", "classify", "translate", "extract"],
    "globex": ["summarize", "rewrite", "tag", "answer"],
}
SHARED_TASKS = {"demo": ["reverse", "english"]}


@dataclass
class Serving:
    """The deployed application and how to reach it."""

    grpc_target: str
    http_port: int
    store_root: Path
    args: dict
    cluster: RayCluster
    keys: dict[str, str] = field(default_factory=dict)

    def metadata(self, tenant: str | None) -> list[tuple[str, str]]:
        md = [("application", "promptmux")]
        if tenant is not None:
            md.append(("authorization", f"Bearer {self.keys[tenant]}"))
        return md

    def stub(self):
        import grpc

        from promptmux.serving.rpc.proto_gen import promptmux_pb2_grpc

        channel = grpc.insecure_channel(self.grpc_target)
        grpc.channel_ready_future(channel).result(timeout=30)
        return promptmux_pb2_grpc.PromptmuxStub(channel)

    def open_store(self):
        from promptmux.prompts.store import PromptStore

        return PromptStore(self.store_root, d_model=D_MODEL, max_length=64)

    def scrape(self) -> str:
        with urllib.request.urlopen(self.cluster.metrics_url, timeout=5) as response:
            return response.read().decode()

    def wait_for_metrics(self, condition, limit_s: float = 30.0) -> str:
        """Metrics reach the endpoint on Ray's report interval (1 s here): poll, bounded."""
        end = time.monotonic() + limit_s
        while True:
            text = self.scrape()
            if condition(text):
                return text
            assert time.monotonic() < end, "the metrics endpoint did not show the expected change in time"
            time.sleep(0.5)

    def deploy(self) -> None:
        from ray import serve

        from promptmux.serving.replica.app import APP_NAME, ROUTE_PREFIX, build_deployment
        from promptmux.serving.config import AppConfig

        app = build_deployment(AppConfig.from_args(self.args), ray_actor_options={"num_cpus": 0.5})
        serve.run(app, name=APP_NAME, route_prefix=ROUTE_PREFIX, blocking=False)
        self.wait_until_serving()

    def wait_until_serving(self, timeout_s: float = 120) -> None:
        import grpc

        from promptmux.serving.rpc.proto_gen import promptmux_pb2 as pb

        stub, end = self.stub(), time.monotonic() + timeout_s
        while True:
            try:
                if stub.Health(pb.HealthRequest(), metadata=self.metadata(None), timeout=10).status == "SERVING":
                    return
            except grpc.RpcError:
                if time.monotonic() > end:
                    raise
            time.sleep(0.2)


_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)$")


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of every Prometheus sample of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if not match or match["name"] != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match["labels"] or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match["value"])
    return total


def multi_task_batches(text: str) -> float:
    """How many engine batches held more than one distinct prompt."""
    name = "ray_promptmux_batch_distinct_tasks"
    return metric(text, f"{name}_count") - metric(text, f"{name}_bucket", le="1.0")


def seed_prompts(store) -> None:
    """Random prompts for every test task, except the demo tasks the replica itself seeds from
    the shipped assets (the embedded model's real `reverse`)."""
    import torch

    from promptmux.serving.demo.prompts import load_demo_prompts

    shipped = {prompt.task for prompt in load_demo_prompts()}
    generator = torch.Generator().manual_seed(1234)
    for owner, tasks in [*PRIVATE_TASKS.items(), *SHARED_TASKS.items()]:
        for task in tasks:
            if owner == "demo" and task in shipped:
                continue
            tensor = torch.randn(6, D_MODEL, generator=generator)
            store.register(owner, task, tensor, publish=owner in SHARED_TASKS, description=f"{owner}'s {task}")


@pytest.fixture(scope="session")
def serving(ray_cluster, tmp_path_factory):
    """The promptmux application on Serve, gRPC and HTTP on free loopback ports."""
    from ray import serve

    from promptmux.prompts.store import PromptStore
    from promptmux.serving.replica.app import GRPC_SERVICER
    from promptmux.serving.replica.auth import write_key_file
    from promptmux.serving.rpc.message_limits import GRPC_MAX_MESSAGE_ENV, grpc_max_message_bytes
    from promptmux.serving.rpc.proto_build import ensure_built
    from promptmux.serving.config import AppConfig

    ensure_built()
    root = tmp_path_factory.mktemp("serving")
    store_root = root / "prompts"
    seed_prompts(PromptStore(store_root, d_model=D_MODEL, max_length=64))
    keys = {**TENANT_KEYS, ADMIN_TENANT: ADMIN_KEY}
    keys_file = write_key_file(
        root / "keys.yaml", [(t, k, False) for t, k in TENANT_KEYS.items()] + [(ADMIN_TENANT, ADMIN_KEY, True)]
    )
    args = {
        "model": {"source": "embedded"},
        "store": {"root": str(store_root), "max_prompt_length": 64, "refresh_interval_s": 0.25},
        "engine": {"max_batch_size": 32, "max_new_tokens_limit": 64},
        "task_embedding": {"steps": 3, "batch_size": 8},  # SimilarTasks tests: a short run suffices
        "serving": {
            "api_keys_file": str(keys_file),
            "batching": "continuous",  # the default: every serving test runs on the step scheduler
            "batch_wait_timeout_s": 0.05,
            "max_in_flight_per_tenant": 12,
            "torch_threads": 1,
        },
    }
    grpc_port, http_port = free_port(), free_port()
    # The proxy refuses messages larger than the largest legal one (serving/rpc/message_limits.py).
    max_message = grpc_max_message_bytes(AppConfig.from_args(args), D_MODEL)
    serve.start(
        http_options={"host": "127.0.0.1", "port": http_port},
        grpc_options={"port": grpc_port, "grpc_servicer_functions": [GRPC_SERVICER]},
        controller_options={"runtime_env": {"env_vars": {GRPC_MAX_MESSAGE_ENV: str(max_message)}}},
    )
    harness = Serving(
        grpc_target=f"127.0.0.1:{grpc_port}",
        http_port=http_port,
        store_root=store_root,
        args=args,
        cluster=ray_cluster,
        keys=keys,
    )
    harness.deploy()
    yield harness
