"""The benchmark's own server: a child process that owns a private local Ray cluster.

Started by local_server.LocalServer, never by hand. It reads one JSON object on stdin:

    {"grpc_port": 9000, "http_port": 8000, "metrics_port": 8080, "num_cpus": 2,
     "replica_cpus": 0.1, "apps": {"promptmux-mixed": {<application args>}, ...}}

starts Ray (no dashboard, metrics pushed every second) and Serve with the project's gRPC
servicer, deploys every application (route prefix `/<name>`), prints one JSON line
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

    import ray
    from ray import serve

    from promptmux.serving.app import GRPC_SERVICER, build_deployment
    from promptmux.serving.proto_build import ensure_built
    from promptmux.serving.config import AppConfig

    ensure_built()
    ray.init(
        address="local",  # a private cluster, never someone else's
        num_cpus=spec.get("num_cpus"),
        include_dashboard=False,
        _metrics_export_port=spec["metrics_port"],
        _system_config={"metrics_report_interval_ms": 1000},
        log_to_driver=spec.get("log_to_driver", False),
        configure_logging=False,
    )
    try:
        serve.start(
            http_options={"host": "127.0.0.1", "port": spec["http_port"]},
            grpc_options={"port": spec["grpc_port"], "grpc_servicer_functions": [GRPC_SERVICER]},
        )
        handles = []
        for name, args in spec["apps"].items():
            app = build_deployment(AppConfig.from_args(args), ray_actor_options={"num_cpus": spec.get("replica_cpus", 0.1)})
            handles.append(serve.run(app, name=name, route_prefix=f"/{name}", blocking=False))
        _emit(event="deployed", apps=list(spec["apps"]), pid=os.getpid())
        watcher = threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True)
        watcher.start()  # the parent closing our stdin (or dying) also stops us
        stop.wait()
    except Exception as error:
        _emit(event="error", message=f"{type(error).__name__}: {error}")
        return 1
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
