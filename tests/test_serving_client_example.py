"""The plain client compiled from the .proto alone talks to the service."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

CLIENT = Path(__file__).resolve().parents[1] / "serving" / "rpc" / "client_example.py"


def run_client(serving, *extra: str) -> subprocess.CompletedProcess:
    # A fresh interpreter: the client must not lean on anything this process imported.
    return subprocess.run(
        [sys.executable, str(CLIENT), "--target", serving.grpc_target, "--max-new-tokens", "12", *extra],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PROMPTMUX_API_KEY": serving.keys["acme"]},
    )


def test_plain_client_generates_what_the_project_stub_gets(serving):
    from promptmux.serving.rpc.proto_gen import promptmux_pb2 as pb

    expected = serving.stub().Generate(
        pb.GenerateRequest(task="reverse", text="hello", params=pb.GenerationParams(max_new_tokens=12)),
        metadata=serving.metadata("acme"), timeout=60,
    ).text
    assert expected == "olleh"  # the shipped demo prompt on the embedded model, seeded by the replica
    unary = run_client(serving)
    assert unary.returncode == 0, unary.stderr
    assert unary.stdout == expected + "\n"
    streamed = run_client(serving, "--stream")
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == expected + "\n"


def test_plain_client_reports_status_codes(serving):
    failed = run_client(serving, "--task", "not-registered")
    assert failed.returncode == 1 and failed.stderr.startswith("error NOT_FOUND: unknown task 'not-registered'")


def test_the_serve_banners_client_command_works_as_printed(serving):
    """The banner's (and the README's) `./dev python serving/rpc/client_example.py ...`, run as printed."""
    import shlex

    from promptmux.serving.cli.serve import client_command

    checkout = CLIENT.parents[2]
    command = client_command(serving.grpc_target, serving.keys["acme"], cwd=checkout)
    assert command.startswith("./dev python serving/rpc/client_example.py --target ")
    assert client_command("h:1", "k", cwd=checkout.parent).startswith(f"{checkout / 'dev'} python ")
    venv = Path(sys.prefix)
    if not (venv / ".promptmux-installed").exists():
        pytest.skip("./dev would set up its own environment; this interpreter's is not one ./dev made")
    done = subprocess.run(
        shlex.split(command) + ["--task", "reverse", "--text", "hello", "--max-new-tokens", "12"],
        cwd=checkout, capture_output=True, text=True, timeout=120, env={**os.environ, "PROMPTMUX_VENV": str(venv)},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "olleh\n"
