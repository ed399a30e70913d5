"""Start promptmux on a private local Ray cluster, and stop it: the one start-up that
`promptmux serve` (serving/cli/serve.py) and the benchmark harness's own server
(benchmarks/server_process.py) share.

    with local_serve(apps, grpc_port=9000, http_port=8000, metrics_port=8080):
        ...  # serving until the block ends; Serve and Ray are shut down on the way out

`apps` maps an application name to (AppConfig, deployment options, route prefix). Ray starts
with `address="local"`, always a fresh cluster of its own, never one someone else started
here, with no dashboard, its Prometheus export on `metrics_port`; Serve's gRPC proxy serves the
project's servicer on `grpc_port` and its HTTP proxy (health) listens on `host:http_port`.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Mapping

from ..config import AppConfig


@contextmanager
def local_serve(
    apps: Mapping[str, tuple[AppConfig, dict[str, Any], str]],
    *,
    grpc_port: int,
    http_port: int,
    metrics_port: int,
    host: str = "127.0.0.1",
    num_cpus: float | None = None,
    **ray_options: Any,
) -> Iterator[None]:
    """Deploy every application, yield while they serve, then shut Serve and Ray down.
    `ray_options` go to `ray.init` (runtime_env, _system_config, log_to_driver, ...)."""
    import ray
    from ray import serve

    from ..replica.app import GRPC_SERVICER, build_deployment
    from ..rpc.proto_build import ensure_built

    ensure_built()  # a command that starts a server builds the gRPC code if the .proto changed
    ray.init(address="local", include_dashboard=False, num_cpus=num_cpus, _metrics_export_port=metrics_port,
             **ray_options)
    try:
        serve.start(
            http_options={"host": host, "port": http_port},
            grpc_options={"port": grpc_port, "grpc_servicer_functions": [GRPC_SERVICER]},
        )
        for name, (config, options, route_prefix) in apps.items():
            serve.run(build_deployment(config, **options), name=name, route_prefix=route_prefix, blocking=False)
        yield
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
