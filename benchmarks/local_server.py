"""Start and stop the benchmark's own promptmux server (server_process.py, in a child process).

Each server variant of the scenarios becomes one Serve application on one private Ray
cluster, reached on one gRPC port by its `application` metadata, so switching between mixed
and per-task batching costs nothing during a run. Variants share one prompt store, so a
workload's prompts are registered once.

Stopping closes the child's stdin (it shuts Serve and Ray down itself), then sends SIGTERM
to the child's pid, and only if it still lives, SIGKILL to the process group the child
leads: a group this class created (`start_new_session`), holding nothing but the child and
the Ray processes it started.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from promptmux.serving.replica.auth import write_key_file

ADMIN_TENANT = "bench-admin"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LocalServer:
    """A harness-owned server. Use as a context manager, or call start() and stop()."""

    apps: dict[str, dict[str, Any]]  # application name -> args (store root and key file filled in)
    tenants: list[str]
    workdir: Path | None = None
    grpc_port: int | None = None
    http_port: int | None = None
    metrics_port: int | None = None
    num_cpus: int | None = None
    replica_cpus: float = 0.1
    start_timeout_s: float = 300.0
    keys: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    _tempdir: tempfile.TemporaryDirectory | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def store_root(self) -> Path:
        return self._workdir() / "prompts"

    def _workdir(self) -> Path:
        if self.workdir is None:
            self._tempdir = tempfile.TemporaryDirectory(prefix="promptmux-bench-")
            self.workdir = Path(self._tempdir.name)
        return self.workdir

    def start(self) -> "LocalServer":
        workdir = self._workdir()
        self.grpc_port = self.grpc_port or free_port()
        self.http_port = self.http_port or free_port()
        self.metrics_port = self.metrics_port or free_port()
        self.keys = {tenant: f"bench-{secrets.token_urlsafe(18)}" for tenant in sorted(set(self.tenants))}
        self.keys[ADMIN_TENANT] = f"bench-admin-{secrets.token_urlsafe(18)}"
        keys_file = write_key_file(
            workdir / "keys.yaml", [(t, k, t == ADMIN_TENANT) for t, k in self.keys.items()]
        )
        apps = {}
        for name, args in self.apps.items():
            args = json.loads(json.dumps(args))
            args.setdefault("store", {})["root"] = str(self.store_root)
            args.setdefault("serving", {})["api_keys_file"] = str(keys_file)
            apps[name] = args
        spec = {
            "grpc_port": self.grpc_port,
            "http_port": self.http_port,
            "metrics_port": self.metrics_port,
            "num_cpus": self.num_cpus or os.cpu_count(),
            "replica_cpus": self.replica_cpus,
            "apps": apps,
        }
        self.log_path = workdir / "server.log"
        log = self.log_path.open("w")
        # Ray starts its workers at nice 15 so its own daemons stay responsive; on a machine
        # shared with other work that starves the replica and proxy against everything at
        # nice 0, engine-direct runs included. Equal terms for every measured process.
        env = {**os.environ, "RAY_worker_niceness": "0"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "promptmux.benchmarks.server_process"],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            start_new_session=True,
        )
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(spec) + "\n")
        self.process.stdin.flush()
        self._await_deployed()
        return self

    def _await_deployed(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        deadline = time.monotonic() + self.start_timeout_s
        import selectors

        selector = selectors.DefaultSelector()
        selector.register(self.process.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not selector.select(timeout=1.0):
                if self.process.poll() is not None:
                    break
                continue
            line = self.process.stdout.readline()
            if not line:
                break
            try:
                event = json.loads(line)
            except ValueError:
                continue  # Ray may print to stdout
            if event.get("event") == "deployed":
                threading.Thread(target=self._drain_stdout, daemon=True).start()
                return
            if event.get("event") == "error":
                self.stop()
                raise RuntimeError(f"the benchmark server failed to start: {event['message']}; log: {self.log_path}")
        self.stop()
        raise RuntimeError(
            f"the benchmark server did not deploy within {self.start_timeout_s:.0f}s (exit code "
            f"{self.process.returncode}); its log is {self.log_path}:\n{self._log_tail()}"
        )

    def _drain_stdout(self) -> None:
        """Keep reading the child's stdout, so a chatty child never blocks on a full pipe."""
        process = self.process
        if process is None or process.stdout is None:
            return
        for _ in process.stdout:
            pass

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:]) if self.log_path else ""
        except OSError:
            return ""

    def stop(self, timeout_s: float = 60.0) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        try:
            if process.stdin:
                process.stdin.close()  # asks the child to shut Serve and Ray down
        except OSError:
            pass
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout_s / 2)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)  # the group this class started, nothing else
                process.wait(timeout=10)
        if self._tempdir is not None:
            self._tempdir.cleanup()
            self._tempdir = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def replica_pids(self, application: str | None = None) -> list[int]:
        """Pids of this server's Serve replicas (of one application, if given)."""
        return self._descendants(f"ServeReplica:{application}:" if application else "ServeReplica:")

    def proxy_pids(self) -> list[int]:
        return self._descendants("ProxyActor")

    def process_roles(self, application: str) -> dict[str, list[int]]:
        """Every process of this server by role, for one application's run: its replica(s),
        the gRPC proxy, other applications' (idle) replicas, the Serve controller, and Ray's
        own daemons (GCS, raylet, dashboard, agents) with the child itself."""
        roles: dict[str, list[int]] = {"replica": [], "gRPC proxy": [], "other replicas": [],
                                       "Serve controller": [], "Ray daemons": []}
        if self.process is None:
            return roles
        roles["Ray daemons"].append(self.process.pid)
        for pid, command in self._children():
            if f"ServeReplica:{application}:" in command:
                roles["replica"].append(pid)
            elif "ServeReplica:" in command:
                roles["other replicas"].append(pid)
            elif "ProxyActor" in command:
                roles["gRPC proxy"].append(pid)
            elif "ServeController" in command:
                roles["Serve controller"].append(pid)
            else:
                roles["Ray daemons"].append(pid)
        return roles

    def _descendants(self, marker: str) -> list[int]:
        return [pid for pid, command in self._children() if marker in command]

    def _children(self) -> list[tuple[int, str]]:
        if self.process is None:
            return []
        import psutil

        try:
            children = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.Error:
            return []
        out = []
        for child in children:
            try:
                out.append((child.pid, " ".join(child.cmdline())))
            except psutil.Error:
                continue
        return out

    def __enter__(self) -> "LocalServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
