"""The class Serve deploys: the replica (server.py) with its HTTP ingress (http_api.py).

`serve.ingress()` without an app builds the ASGI app in each replica, after the replica's own
constructor, from `__serve_build_asgi_app__`: the routes are bound to that replica's engine,
scheduler, keys and metrics. gRPC calls still reach the replica's RPC methods by name.
"""
from __future__ import annotations

from ray import serve

from .http_api import build_http_app
from .server import PromptmuxServer


class _ServedReplica(PromptmuxServer):
    def __serve_build_asgi_app__(self):
        return build_http_app(self)

    async def __del__(self):
        # Serve awaits the ingress wrapper's __del__, which awaits this one only if it is a
        # coroutine function: PromptmuxServer's plain __del__ returns its shutdown coroutine.
        stopping = PromptmuxServer.__del__(self)
        if stopping is not None:
            await stopping


HTTPIngressServer = serve.ingress()(_ServedReplica)
