"""`promptmux prompts import|list|show|export|rm`, through the CLI's entry point, on a store on disk."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from promptmux.prompts.records import content_hash
from promptmux.serving.cli.main import main

D_MODEL = 256  # the embedded default's width


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_prompt_commands_round_trip_a_prompt(tmp_path, capsys):
    store = ["--store", str(tmp_path / "prompts")]
    first, second = np.full((4, D_MODEL), 0.25, np.float32), np.full((6, D_MODEL), -0.5, np.float32)
    np.save(tmp_path / "first.npy", first)
    np.save(tmp_path / "second.npy", second)

    code, out, _ = run(capsys, "prompts", "import", *store, "--tenant", "acme", "--task", "summarize", "--shared",
                       "--description", "first try", str(tmp_path / "first.npy"))
    assert code == 0 and out.startswith("registered acme/summarize version 1: length 4, d_model 256, float32")
    code, out, _ = run(capsys, "prompts", "import", *store, "--tenant", "acme", "--task", "summarize",
                       str(tmp_path / "second.npy"))
    assert code == 0 and "version 2: length 6" in out

    code, out, _ = run(capsys, "prompts", "list", *store, "--tenant", "acme")
    rows = [line.split() for line in out.splitlines()[1:]]
    assert code == 0 and [r[:6] for r in rows] == [["acme", "summarize", "2", "6", "float32", "private"]]

    code, out, _ = run(capsys, "prompts", "show", *store, "--tenant", "acme", "summarize")
    shown = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [(m["version"], m["length"], m["shared"]) for m in shown] == [(1, 4, True), (2, 6, False)]
    assert shown[0]["description"] == "first try"

    exported = tmp_path / "v1.safetensors"
    code, out, _ = run(capsys, "prompts", "export", *store, "--tenant", "acme", "--version", "1", "summarize",
                       str(exported))
    assert code == 0 and out.strip() == f"wrote acme/summarize version 1 to {exported}"
    tensor = load_file(str(exported))["prompt"]
    assert torch.equal(tensor, torch.from_numpy(first)) and content_hash(tensor) == shown[0]["content_hash"]

    code, out, _ = run(capsys, "prompts", "rm", *store, "--tenant", "acme", "summarize")
    assert code == 0 and out.strip() == "deleted acme/summarize (2 version(s))"
    code, _, err = run(capsys, "prompts", "show", *store, "--tenant", "acme", "summarize")
    assert code == 1 and err.startswith("error (NOT_FOUND): unknown task 'summarize' for tenant 'acme'")
    code, out, _ = run(capsys, "prompts", "list", *store, "--tenant", "acme")
    assert code == 0 and out.strip() == "no prompts registered"


@pytest.mark.parametrize("bad", ["copy\n", "c\u00f6py", "../x"])
def test_import_refuses_a_bad_id_and_writes_nothing(tmp_path, capsys, bad):
    np.save(tmp_path / "p.npy", np.zeros((2, D_MODEL), np.float32))
    code, _, err = run(capsys, "prompts", "import", "--store", str(tmp_path / "prompts"), "--tenant", "acme",
                       "--task", bad, str(tmp_path / "p.npy"))
    assert code == 1 and err.startswith(f"error (INVALID_ARGUMENT): invalid task id {bad!r}")
    assert not any((tmp_path / "prompts").rglob("*.safetensors"))


def test_the_installed_command_lists_published_demo_tasks_and_refuses_a_second_publisher(tmp_path, capsys):
    store = ["--store", str(tmp_path / "prompts")]
    command = Path(sys.executable).with_name("promptmux")
    listed = subprocess.run([str(command), "prompts", "list", *store], capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0, listed.stderr
    rows = {tuple(line.split()[:2]): line.split()[5] for line in listed.stdout.splitlines()[1:]}
    assert rows[("demo", "reverse")] == "published"
    np.save(tmp_path / "p.npy", np.zeros((2, D_MODEL), np.float32))
    code, _, err = run(capsys, "prompts", "import", *store, "--tenant", "acme", "--task", "reverse", "--publish",
                       str(tmp_path / "p.npy"))
    assert code == 1 and err.startswith("error (ALREADY_EXISTS): task id 'reverse' is already published")
