"""Bind Ray Serve's gRPC proxy to one address (`promptmux serve --host`).

Ray Serve 2.60 listens for gRPC on `[::]:<port>`, every interface, with no option to change
it (serve/_private/grpc_util.py). `promptmux serve` installs `bind_grpc_proxy_to_host` as
its Ray job's `worker_process_setup_hook`, so the proxy process listens on $PROMPTMUX_GRPC_HOST
instead. If a Ray upgrade moves the function this wraps, the hook fails loudly (the proxy
does not start) rather than silently listening everywhere; `promptmux serve` also checks
the listening sockets after start-up.
"""
from __future__ import annotations

import os

GRPC_HOST_ENV = "PROMPTMUX_GRPC_HOST"
HOOK = "promptmux.serving.cli.serve_bind.bind_grpc_proxy_to_host"
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
