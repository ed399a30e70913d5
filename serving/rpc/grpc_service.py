"""The Promptmux service as Ray Serve's gRPC proxy registers it (through
serving/rpc/proxy.py, the function `grpc_servicer_functions` names).

The generated `add_PromptmuxServicer_to_server` makes the proxy decode each request with
`FromString`; a message that does not parse then fails inside grpc as INTERNAL ("Exception
deserializing request!") before any promptmux code runs. Here the same handlers take the
request bytes as they are: the replica decodes them (`grpc_convert.request_message`) and a
malformed message is INVALID_ARGUMENT, with a message that says so.
"""
from __future__ import annotations

import grpc

from .proto_build import require_built

SERVICE = "promptmux.v1.Promptmux"


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
    require_built()
    from .proto_gen import promptmux_pb2_grpc

    captured = _Captured()
    promptmux_pb2_grpc.add_PromptmuxServicer_to_server(servicer, captured)
    raw = {name: handler._replace(request_deserializer=None) for name, handler in captured.handlers.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, raw),))
    if hasattr(server, "add_registered_method_handlers"):
        server.add_registered_method_handlers(SERVICE, raw)
