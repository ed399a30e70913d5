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

import logging
import os
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
    # Ray's local cluster authenticates its own processes with a token it makes (and warns
    # that it does, at every start): nothing for the user to do, so it is said once, quietly.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    ray.init(address="local", include_dashboard=False, num_cpus=num_cpus, _metrics_export_port=metrics_port,
             **ray_options)
    try:
        serve.start(
            logging_config={"enable_access_log": False},  # promptmux's own has the real status (replica/access_log.py)
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


# ---------------------------------------------------------------------- binding the gRPC proxy
# Bind Ray Serve's gRPC proxy to one address (`promptmux serve --host`).
#
# Ray Serve 2.60 listens for gRPC on `[::]:<port>`, every interface, with no option to change
# it (serve/_private/grpc_util.py). `promptmux serve` installs `bind_grpc_proxy_to_host` as
# its Ray job's `worker_process_setup_hook`, so the proxy process listens on $PROMPTMUX_GRPC_HOST
# instead. If a Ray upgrade moves the function this wraps, the hook fails loudly (the proxy
# does not start) rather than silently listening everywhere; `promptmux serve` also checks
# the listening sockets after start-up.

GRPC_HOST_ENV = "PROMPTMUX_GRPC_HOST"
HOOK = "promptmux.serving.cli.local_serve.bind_grpc_proxy_to_host"
_WILDCARDS = {"", "0.0.0.0", "::", "[::]"}


def bind_grpc_proxy_to_host() -> None:
    host = os.environ.get(GRPC_HOST_ENV, "")
    if host in _WILDCARDS:
        return
    from ray.serve._private import default_impl

    original = default_impl.add_grpc_address
    if getattr(original, "promptmux_host", None) is not None:
        return

    def add_grpc_address(server, server_address: str):
        port = server_address.rsplit(":", 1)[1]
        return original(server, f"{grpc_host(host)}:{port}")

    add_grpc_address.promptmux_host = host  # type: ignore[attr-defined]
    default_impl.add_grpc_address = add_grpc_address


def grpc_host(host: str) -> str:
    """`host` as a gRPC address host part (IPv6 literals in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
