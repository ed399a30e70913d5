"""Compile serving/rpc/promptmux.proto into the importable package `promptmux.serving.rpc.proto_gen`.

The generated code is not committed. It is built at install and build time, never as a side
effect of an import: `./dev` runs `python -m promptmux.serving.rpc.proto_build` when it installs
the project and whenever the .proto (or this file) is newer than the build, container images
run it at build time, and the commands that start a server (`promptmux serve`, the benchmark
harness's local server) run `ensure_built` first. A sha256 of the .proto is recorded in the
generated `__init__.py`; modules that need the generated code call `require_built`, which
fails with instructions when it is missing or stale, and builds nothing.

Several processes (Ray's gRPC proxy, replicas, tests) may build at once: each writes into its
own temporary folder and moves whole files into place, `__init__.py` last, so a reader sees
either a complete old build or a complete new one.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_PATH = Path(__file__).with_name("promptmux.proto")
OUT_DIR = Path(__file__).with_name("proto_gen")
_MODULES = ("promptmux_pb2.py", "promptmux_pb2_grpc.py")
_HASH_LINE = re.compile(r'^PROTO_SHA256 = "([0-9a-f]{64})"$', re.MULTILINE)


# Bump when the post-processing below changes, so existing builds are redone.
_GENERATOR_REVISION = b"2"


def proto_sha256(proto_path: Path = PROTO_PATH) -> str:
    return hashlib.sha256(proto_path.read_bytes() + _GENERATOR_REVISION).hexdigest()


def is_current(out_dir: Path = OUT_DIR, proto_path: Path = PROTO_PATH) -> bool:
    try:
        init = (out_dir / "__init__.py").read_text()
    except FileNotFoundError:
        return False
    match = _HASH_LINE.search(init)
    return (
        match is not None
        and match.group(1) == proto_sha256(proto_path)
        and all((out_dir / name).exists() for name in _MODULES)
    )


def compile_proto(proto_path: Path, out_dir: Path) -> None:
    """Run grpc_tools' protoc on one .proto, writing `<stem>_pb2.py` and `<stem>_pb2_grpc.py`."""
    try:
        from grpc_tools import protoc
    except ImportError as error:
        raise RuntimeError(
            "grpcio-tools is needed to compile serving/rpc/promptmux.proto; install promptmux[serve]"
        ) from error
    import importlib.resources

    well_known = importlib.resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"--proto_path={proto_path.parent}",
        f"--proto_path={well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(proto_path),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {proto_path}; run `python -m grpc_tools.protoc` with {args[1:]} to see why")


def build(out_dir: Path = OUT_DIR, proto_path: Path = PROTO_PATH) -> Path:
    """Generate the package; returns its folder."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".build-", dir=out_dir))
    try:
        compile_proto(proto_path, stage)
        # protoc assumes top-level modules. Inside a package the grpc module's import must be
        # relative, and messages must name their real module, or pickling them (Ray does,
        # between its gRPC proxy and the replicas) fails to import `promptmux_pb2`.
        _rewrite(stage / "promptmux_pb2_grpc.py", "import promptmux_pb2 as promptmux__pb2",
                 "from . import promptmux_pb2 as promptmux__pb2")
        _rewrite(stage / "promptmux_pb2.py", "BuildTopDescriptorsAndMessages(DESCRIPTOR, 'promptmux_pb2', _globals)",
                 "BuildTopDescriptorsAndMessages(DESCRIPTOR, __name__, _globals)")
        (stage / "__init__.py").write_text(
            '"""Generated from serving/rpc/promptmux.proto by promptmux.serving.rpc.proto_build; do not edit."""\n'
            f'PROTO_SHA256 = "{proto_sha256(proto_path)}"\n'
        )
        for name in (*_MODULES, "__init__.py"):
            os.replace(stage / name, out_dir / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    importlib.invalidate_caches()
    return out_dir


def _rewrite(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    if old not in text:
        raise RuntimeError(f"{path.name} from this grpcio-tools lacks {old!r}; update proto_build.py for it")
    path.write_text(text.replace(old, new))


def ensure_built() -> None:
    """Build the generated package if it is missing or older than the .proto (commands only)."""
    if not is_current():
        build()


def require_built(out_dir: Path = OUT_DIR, proto_path: Path = PROTO_PATH) -> None:
    """Raise RuntimeError, saying how to build it, if the generated package is missing or stale
    (not ImportError: that reads as a missing optional extra, and hides commands)."""
    if not is_current(out_dir, proto_path):
        raise RuntimeError(
            f"the gRPC code generated from {proto_path.name} is missing or older than the .proto ({out_dir}); "
            "build it with `python -m promptmux.serving.rpc.proto_build` (`./dev` does this when it installs the "
            "project or the .proto changes; container images at build time)"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the generated code is missing or stale")
    args = parser.parse_args(argv)
    if args.check:
        current = is_current()
        print(f"{OUT_DIR}: {'current' if current else 'missing or stale'}")
        return 0 if current else 1
    print(f"generated {build()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
