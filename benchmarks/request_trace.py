"""Which hand-written files one unary Generate passes, traced with `sys.settrace`.

A replica (`PromptmuxServer`, the embedded model, continuous batching) is built from its
parts as Serve builds it, warmed with one request, then one more `Generate(task=reverse,
text=hello)` is traced on every thread (the event loop, the prepare worker, the engine
thread). Every function call whose code lies in `serving/`, `prompts/` or `kernels/` is a
visit of its file; generated code (`proto_gen/`) is not hand-written and is left out.

A file is *entered* through a function of its own that code outside the file called: the
RPC runtime, the event loop or a thread (a coroutine resumed counts once), or another
project file. `entries` counts the distinct such functions, so a file that others call in
one place is entered once, and one that is called back into, or used piecemeal (first this
helper, then that one), is entered several times. Repeated steps of the decode loop call the
same functions, so they do not add entries.

Run from the repository root:

    python -m promptmux.benchmarks.request_trace [--json]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

HAND_WRITTEN = ("serving", "prompts", "kernels")


@dataclass
class Trace:
    """Files in first-visit order, and the functions of each that outside code entered."""

    files: list[str] = field(default_factory=list)
    entered_by: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))  # file -> "func <- caller"
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # file -> call events

    def entries(self, file: str) -> int:
        return len({edge.split(" <- ")[0] for edge in self.entered_by[file]})

    def summary(self) -> dict:
        return {
            "files": len(self.files),
            "entered_more_than_once": sorted(f for f in self.files if self.entries(f) > 1),
            "per_file": [
                {"file": f, "entries": self.entries(f), "calls": self.calls[f],
                 "entered_through": sorted({edge.split(" <- ")[0] for edge in self.entered_by[f]})}
                for f in self.files
            ],
        }


def _relative(root: Path, filename: str) -> str | None:
    """The file's path from the repository root when it is hand-written project code."""
    try:
        path = Path(filename).resolve().relative_to(root)
    except ValueError:
        return None
    if path.parts[0] not in HAND_WRITTEN or "proto_gen" in path.parts or path.suffix != ".py":
        return None
    return str(path)


class _Tracer:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.active = False
        self.trace = Trace()
        self._known: dict[str, str | None] = {}

    def _file(self, filename: str) -> str | None:
        if filename not in self._known:
            self._known[filename] = _relative(self.root, filename)
        return self._known[filename]

    def __call__(self, frame, event, arg):
        if not self.active or event != "call":
            return None
        file = self._file(frame.f_code.co_filename)
        if file is None:
            return None
        trace = self.trace
        if file not in trace.calls:
            trace.files.append(file)
        trace.calls[file] += 1
        caller = frame.f_back
        caller_file = None if caller is None else self._file(caller.f_code.co_filename)
        if caller_file != file:
            name = frame.f_code.co_qualname
            if name.startswith("<") or name.endswith(".<genexpr>"):
                return None  # comprehension frames belong to the function around them
            source = caller_file or "runtime"
            trace.entered_by[file].add(f"{name} <- {source}")
        return None


class _Context:
    """What Serve's gRPC context offers a replica method."""

    def __init__(self, metadata) -> None:
        self.metadata, self.code, self.details = list(metadata), None, ""

    def invocation_metadata(self):
        return self.metadata

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details

    def set_trailing_metadata(self, metadata):
        pass


def trace_generate(root: Path) -> Trace:
    from promptmux.serving.config import AppConfig
    from promptmux.serving.replica.auth import write_key_file
    from promptmux.serving.replica.server import PromptmuxServer
    from promptmux.serving.rpc.proto_gen import promptmux_pb2 as pb

    with tempfile.TemporaryDirectory() as scratch:
        keys = write_key_file(Path(scratch) / "keys.yaml", [("acme", "trace-key", False)])
        config = AppConfig.from_args({
            "model": {"source": "embedded"},
            "store": {"root": str(Path(scratch) / "prompts")},
            "serving": {"api_keys_file": str(keys), "batching": "continuous"},
        })
        server = PromptmuxServer(config)
        tracer = _Tracer(root.resolve())
        metadata = [("authorization", "Bearer trace-key")]
        request = pb.GenerateRequest(task="reverse", text="hello",
                                     params=pb.GenerationParams(max_new_tokens=16)).SerializeToString()

        async def main() -> str:
            await server.Generate(request, _Context(metadata))  # warm-up: first-use paths are not traced
            tracer.active = True
            reply = await server.Generate(request, _Context(metadata))
            tracer.active = False
            await server.shutdown()
            return reply.text

        threading.settrace(tracer)
        sys.settrace(tracer)
        try:
            text = asyncio.run(main())
        finally:
            sys.settrace(None)
            threading.settrace(None)
        if text != "olleh":
            raise RuntimeError(f"the traced Generate answered {text!r}, expected 'olleh'")
        return tracer.trace


def report(trace: Trace) -> str:
    summary = trace.summary()
    lines = [
        f"Hand-written files one Generate passes: {summary['files']}",
        f"Entered more than once: {len(summary['entered_more_than_once'])}",
        "",
        "| # | file | entries | calls | entered through |",
        "|---:|---|---:|---:|---|",
    ]
    for i, row in enumerate(summary["per_file"], 1):
        lines.append(f"| {i} | `{row['file']}` | {row['entries']} | {row['calls']} | "
                     + ", ".join(f"`{name}`" for name in row["entered_through"]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_DISABLE_METRICS", "1")
    trace = trace_generate(Path(__file__).resolve().parents[1])
    sys.stdout.write(json.dumps(trace.summary(), indent=1) + "\n" if args.json else report(trace))


if __name__ == "__main__":
    main()
