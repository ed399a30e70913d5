"""The gRPC servicer function Ray Serve's proxy loads (`grpc_options.grpc_servicer_functions`).

It registers promptmux's service with handlers that pass the request bytes through: the
generated `add_PromptmuxServicer_to_server` makes the proxy decode each request with
`FromString`, and a message that does not parse then fails inside grpc as INTERNAL
("Exception deserializing request!") before any promptmux code runs. Here the replica decodes
them (`rpc/convert.py`), and a malformed message is INVALID_ARGUMENT with a message that says so.

It also sets the status a caller gets when the replica serving its request dies. That status is decided inside the
proxy, not by the replica: Ray Serve 2.60's proxy maps every exception to a gRPC status in
`ray.serve._private.grpc_util.get_grpc_response_status`, and a replica that died mid-request
(SIGKILL, the kernel's OOM killer, a lost node, or a replica Serve stopped after it failed
its health check) arrives as `RayActorError` and leaves as INTERNAL with Ray's actor-death
text. INTERNAL tells clients the request is broken and must not be retried; in fact nothing
is wrong with it, and a retry is served by another replica or by the restarted one. So a
dead or unreachable replica answers UNAVAILABLE, the status gRPC clients retry.

It also serves the standard gRPC health protocol, `grpc.health.v1.Health/Check` and `Watch`
(the `grpcio-health-checking` servicer), on the same port, answered by the proxy itself:
Kubernetes' native gRPC probe and gRPC load balancers send no `application` metadata, so the
call cannot be routed to a replica, and Ray Serve 2.60's proxy runs such "passthrough"
services (as it runs server reflection) in its own process. It answers SERVING for "" and for
`promptmux.v1.Promptmux` while the proxy serves: the proxy routes only to replicas that pass
their own check_health (serving/replica/health.py), so this is the proxy's readiness, and the
replicas' health stays Serve's job. A Ray without passthrough services gets no health service
(logged); probe the HTTP proxy's /-/healthz there.

The proxy imports this module by the path in the Serve config, in its own process, before it
serves anything; the mapping is installed there once. An error the replica's own code
raised (`RayTaskError`, even one caused by another actor's death) keeps Ray's mapping.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import grpc

from .proto_build import require_built

log = logging.getLogger(__name__)

SERVICE = "promptmux.v1.Promptmux"
REPLICA_DIED_MESSAGE = (
    "the replica serving this request stopped before it replied ({cause}); the request did not "
    "complete: retry it, and another replica (or the restarted one) serves it"
)


def add_PromptmuxServicer_to_server(servicer: Any, server: Any) -> None:  # noqa: N802 (gRPC's naming)
    """What `grpc_servicer_functions` names: promptmux's service, its request bytes passed
    through undecoded, plus UNAVAILABLE on replica death."""
    install_replica_death_status()
    add_health_servicer(server)
    add_promptmux_servicer(servicer, server)


HEALTH_SERVICE = "grpc.health.v1.Health"


def add_health_servicer(server) -> bool:
    """grpc.health.v1.Health on the proxy itself; False where this Ray cannot run it there."""
    if not hasattr(server, "add_passthrough_service"):
        log.warning("this Ray Serve proxy cannot serve grpc.health.v1.Health itself (no passthrough services); "
                    "probe the HTTP proxy's /-/healthz instead")
        return False
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_health.v1._async import HealthServicer

    health = HealthServicer()
    server.add_passthrough_service(HEALTH_SERVICE)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    # `set` is a coroutine and this runs before the proxy's loop serves; no watcher exists yet,
    # so the initial status is written as the servicer's own __init__ writes the one of "".
    health._server_status[SERVICE] = health_pb2.HealthCheckResponse.SERVING
    return True


class _Captured:
    """Stands in for a server while the generated function registers its handlers."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass  # the registered handlers below carry the same methods

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        assert service == SERVICE, service
        self.handlers = dict(handlers)


def add_promptmux_servicer(servicer, server) -> None:
    """The generated registration, with each handler's request deserializer removed."""
    require_built()
    from .proto_gen import promptmux_pb2_grpc

    captured = _Captured()
    promptmux_pb2_grpc.add_PromptmuxServicer_to_server(servicer, captured)
    raw = {name: handler._replace(request_deserializer=None) for name, handler in captured.handlers.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, raw),))
    if hasattr(server, "add_registered_method_handlers"):
        server.add_registered_method_handlers(SERVICE, raw)


def replica_death_status(error: BaseException):
    """UNAVAILABLE for a replica that died or cannot be reached; None for any other error."""
    from ray.exceptions import RayActorError, RayTaskError
    from ray.serve._private.proxy_request_response import ResponseStatus

    if not isinstance(error, RayActorError) or isinstance(error, RayTaskError):
        return None
    return ResponseStatus(
        code=grpc.StatusCode.UNAVAILABLE,
        is_error=True,
        message=REPLICA_DIED_MESSAGE.format(cause=type(error).__name__),
    )


def install_replica_death_status() -> bool:
    """Wrap the proxy's status mapping once per process. False if this Ray has no such hook."""
    from ray.serve._private import proxy

    original: Callable | None = getattr(proxy, "get_grpc_response_status", None)
    if original is None:
        log.warning(
            "ray.serve._private.proxy.get_grpc_response_status is missing in this Ray version: a replica's "
            "death reaches gRPC callers with Ray's own status (INTERNAL), not UNAVAILABLE"
        )
        return False
    if getattr(original, "promptmux_replica_death", False):
        return True

    def get_grpc_response_status(error: BaseException, request_timeout_s, request_id: str):
        status = replica_death_status(error)
        if status is None:
            return original(error, request_timeout_s, request_id)
        log.warning("request %s: %s", request_id, status.message)
        return status

    get_grpc_response_status.promptmux_replica_death = True
    proxy.get_grpc_response_status = get_grpc_response_status
    return True
