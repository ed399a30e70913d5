"""The access line: one log line per call, gRPC or HTTP, with the status the caller got.

Serve's own access line is off (serving/replica/app.py): it logs every gRPC call as OK, because a
unary handler sets its status on the gRPC context and returns normally. This one is written where
promptmux sets the status, so NOT_FOUND is NOT_FOUND. Off by default (`serving.access_log`,
`promptmux serve --access-log`): a busy server's terminal stays readable.
"""
from __future__ import annotations

import logging

log = logging.getLogger("promptmux.access")


class AccessLog:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def record(self, protocol: str, method: str, tenant: str, status: str, seconds: float) -> None:
        if self.enabled:
            log.info("%s %s tenant=%s %s %.1fms", protocol, method, tenant or "-", status, seconds * 1000)
