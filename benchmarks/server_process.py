"""The benchmark's own server: a child process that owns a private local Ray cluster.

Started by local_server.LocalServer, never by hand. It reads one JSON object on stdin:

    {"grpc_port": 9000, "http_port": 8000, "metrics_port": 8080, "num_cpus": 2,
     "replica_cpus": 0.1, "apps": {"promptmux-mixed": {<application args>}, ...}}

starts Ray (no dashboard, metrics pushed every second) and Serve with the project's gRPC
servicer through `promptmux serve`'s own start-up (serving/cli/local_serve.py), deploys every application (route prefix `/<name>`), prints one JSON line
`{"event": "deployed", ...}`, then serves until stdin closes or SIGTERM arrives, and shuts
Serve and Ray down. Its Ray processes are its own: nothing else is touched.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading


def _emit(**event) -> None:
    print(json.dumps(event), flush=True)


def main() -> int:
    spec = json.loads(sys.stdin.readline())
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    from promptmux.serving.config import AppConfig
    from promptmux.serving.cli.local_serve import local_serve

    replica_options = {"ray_actor_options": {"num_cpus": spec.get("replica_cpus", 0.1)}}
    try:
        apps = {name: (AppConfig.from_args(args), replica_options, f"/{name}") for name, args in spec["apps"].items()}
        with local_serve(
            apps, grpc_port=spec["grpc_port"], http_port=spec["http_port"], metrics_port=spec["metrics_port"],
            num_cpus=spec.get("num_cpus"),  # a private cluster, never someone else's
            _system_config={"metrics_report_interval_ms": 1000},
            log_to_driver=spec.get("log_to_driver", False), configure_logging=False,
        ):
            _emit(event="deployed", apps=list(spec["apps"]), pid=os.getpid())
            watcher = threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True)
            watcher.start()  # the parent closing our stdin (or dying) also stops us
            stop.wait()
    except Exception as error:
        _emit(event="error", message=f"{type(error).__name__}: {error}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
