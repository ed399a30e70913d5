"""The Ray Serve application: `import_path: promptmux.serving.replica.app:build_app`.

`args` is one dict with optional sections `model`, `store`, `engine` (serving/config.py) and
`serving` (serving/config.py). It is parsed here, once, so a bad key fails the deploy
with a message instead of failing every replica.

The deployment serves gRPC (its methods carry the RPC names) and HTTP through the same replica:
`serve.ingress()` gives it the OpenAI-compatible API (serving/replica/http_api.py), built in each
replica on its own engine and scheduler. The route prefix is `/`: `/v1/...` is the API, and
every other path answers a JSON 404.

Replica options not set in the Serve config get defaults that keep batches full: Serve must
let at least a whole batch reach a replica (`max_ongoing_requests` >= max_batch_size), and
here it lets the whole admission queue through so that the replica's own fair queue, not
Serve's FIFO, decides what runs next and answers overload with RESOURCE_EXHAUSTED.
"""
from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from ..rpc.proto_build import require_built
from ..config import APP_NAME, AppConfig  # noqa: F401  (APP_NAME: the name build_app deploys under, imported from here)

ROUTE_PREFIX = "/"
DEPLOYMENT_NAME = "PromptmuxServer"
GRPC_SERVICER = "promptmux.serving.rpc.proxy.add_PromptmuxServicer_to_server"


def deployment_defaults(config: AppConfig) -> dict[str, Any]:
    serving = config.serving
    return {
        "max_ongoing_requests": serving.max_queue_size + serving.max_batch_size,
        # Requests Serve itself may hold when every replica is full; beyond that the proxy
        # answers RESOURCE_EXHAUSTED instead of queueing without bound.
        "max_queued_requests": serving.max_queue_size,
        "graceful_shutdown_timeout_s": serving.shutdown_grace_s + 5,
        # Serve's access line logs every gRPC call as OK (a handler sets its status on the
        # context): promptmux writes its own, with the real status (replica/access_log.py).
        "logging_config": {"enable_access_log": False},
    }


def build_app(args: dict[str, Any] | None = None) -> Application:
    return build_deployment(AppConfig.from_args(args))


def build_deployment(config: AppConfig, **options: Any) -> Application:
    """The bound deployment; `options` override the defaults (e.g. ray_actor_options)."""
    require_built()  # the gRPC proxy imports the generated servicer on this machine
    from .ingress import HTTPIngressServer

    deployment = serve.deployment(HTTPIngressServer, name=DEPLOYMENT_NAME)
    return deployment.options(**{**deployment_defaults(config), **options}).bind(config)
