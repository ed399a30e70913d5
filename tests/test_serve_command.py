"""`promptmux serve` itself, as a user runs it: one subprocess on free loopback ports (with
its own private Ray), checked from outside: the banner, /-/healthz, a Generate with the
printed demo key, every port listening on --host only (metrics included), the message
limit, and a clean Ctrl-C."""
from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import pytest

from conftest import free_port

pytestmark = pytest.mark.ray

START_LIMIT_S = 240  # a private Ray, Serve and a replica on a busy 2-core machine
STOP_LIMIT_S = 90


def read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line.rstrip("\n"))
    lines.put(None)


def wait_for_banner(process, lines: queue.Queue) -> list[str]:
    seen: list[str] = []
    end = time.monotonic() + START_LIMIT_S
    while time.monotonic() < end:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        if line is None:
            break
        seen.append(line)
        if line.strip() == "Ctrl-C stops.":
            return seen
    raise AssertionError(f"no banner within {START_LIMIT_S}s (exit code {process.poll()}); stdout: {seen}")


def listening_addresses(ports: dict[str, int]) -> dict[str, set[str]]:
    import psutil

    found: dict[str, set[str]] = {name: set() for name in ports}
    for conn in psutil.net_connections(kind="inet"):
        for name, port in ports.items():
            if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port:
                found[name].add(conn.laddr.ip)
    return found


def test_promptmux_serve_from_outside(tmp_path):
    from promptmux.serving.rpc.proto_gen import promptmux_pb2 as pb
    from promptmux.serving.rpc.proto_gen import promptmux_pb2_grpc

    ports = {"gRPC": free_port(), "HTTP": free_port(), "metrics": free_port()}
    command = [
        sys.executable, "-m", "promptmux.serving.cli.main", "serve", "--host", "127.0.0.1",
        "--grpc-port", str(ports["gRPC"]), "--http-port", str(ports["HTTP"]),
        "--metrics-port", str(ports["metrics"]), "--store", str(tmp_path / "prompts"), "--num-cpus", "1",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"PYTHONUNBUFFERED": "1"}
    env.pop("PROMPTMUX_API_KEYS_FILE", None)
    with open(tmp_path / "serve.log", "w") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, env=env,
                                   cwd=tmp_path, start_new_session=True)
        try:
            lines: queue.Queue = queue.Queue()
            threading.Thread(target=read_lines, args=(process.stdout, lines), daemon=True).start()
            banner = "\n".join(wait_for_banner(process, lines))
            assert "promptmux is serving model 'embedded'" in banner
            assert f"gRPC     127.0.0.1:{ports['gRPC']}" in banner
            assert f"http://127.0.0.1:{ports['HTTP']}/-/healthz" in banner
            assert f"http://127.0.0.1:{ports['metrics']}/metrics" in banner
            assert "listens  on 127.0.0.1 only (--host); gRPC messages up to 5 MiB" in banner
            key = re.search(r"demo key \(tenant 'demo', shown once, stored only hashed\): (\S+)", banner)[1]

            with urllib.request.urlopen(f"http://127.0.0.1:{ports['HTTP']}/-/healthz", timeout=30) as response:
                assert response.status == 200
            channel = grpc.insecure_channel(f"127.0.0.1:{ports['gRPC']}",
                                            options=[("grpc.max_send_message_length", 64 << 20)])
            stub = promptmux_pb2_grpc.PromptmuxStub(channel)
            metadata = [("application", "promptmux"), ("authorization", f"Bearer {key}")]
            reply = stub.Generate(pb.GenerateRequest(task="reverse", text="hello"), metadata=metadata, timeout=120)
            assert reply.text == "olleh"
            # A second serve on the same ports stops at once, before it writes anything: the
            # first keeps answering with its key.
            keys_file = tmp_path / f"dev-api-keys-{ports['gRPC']}.yaml"  # beside the store
            keys_before = keys_file.read_bytes()
            second = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
            assert second.returncode == 2, second.stderr[-2000:]
            assert f"port {ports['gRPC']} is in use (another promptmux serve?)" in second.stderr
            assert "Traceback" not in second.stderr and second.stdout == ""
            assert keys_file.read_bytes() == keys_before
            assert stub.Generate(pb.GenerateRequest(task="reverse", text="abc"), metadata=metadata, timeout=60).text == "cba"
            # The OpenAI-compatible API on the HTTP port, with the same key.
            request = urllib.request.Request(
                f"http://127.0.0.1:{ports['HTTP']}/v1/completions", method="POST",
                data=b'{"model": "reverse", "prompt": "hello"}',
                headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as response:
                assert json.loads(response.read())["choices"][0]["text"] == "olleh"
            # The proxy's limit is what the largest legal message needs (5 MiB for the defaults:
            # a GenerateBatch of 256 texts of 16 KiB, rounded up); anything larger never reaches a replica.
            with pytest.raises(grpc.RpcError) as caught:
                stub.Generate(pb.GenerateRequest(task="reverse", text="x" * (10 << 20)), metadata=metadata, timeout=60)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            channel.close()
            with urllib.request.urlopen(f"http://127.0.0.1:{ports['metrics']}/metrics", timeout=30) as response:
                assert response.status == 200 and "ray_" in response.read().decode()
            # Every port on --host only: never on another interface, metrics included.
            addresses = listening_addresses(ports)
            assert addresses == {name: addresses[name] for name in ports} and all(addresses.values()), addresses
            for name, ips in addresses.items():
                assert ips <= {"127.0.0.1", "::ffff:127.0.0.1"}, (name, ips)

            process.send_signal(signal.SIGINT)  # Ctrl-C
            assert process.wait(timeout=STOP_LIMIT_S) == 0
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)  # the session we started: the command and its Ray
                process.wait(30)
