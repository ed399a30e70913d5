"""A plain gRPC client for promptmux, built from serving/rpc/promptmux.proto alone.

It needs only grpcio and grpcio-tools (no promptmux install): the .proto is compiled into
a temporary folder at start.

    python serving/rpc/client_example.py --target 127.0.0.1:9000 --api-key <key>
    python serving/rpc/client_example.py --task reverse --text hello --stream
    python serving/rpc/client_example.py --task reverse --text hello --candidates olleh hello HELLO
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
from pathlib import Path

import grpc
from grpc_tools import protoc

PROTO = Path(__file__).with_name("promptmux.proto")


def load_generated(proto: Path):
    """Compile the .proto and import its messages and stubs."""
    out = tempfile.mkdtemp(prefix="promptmux-proto-")
    include = Path(protoc.__file__).parent / "_proto"
    status = protoc.main([
        "grpc_tools.protoc", f"-I{proto.parent}", f"-I{include}",
        f"--python_out={out}", f"--grpc_python_out={out}", str(proto),
    ])
    if status != 0:
        raise SystemExit(f"could not compile {proto}")
    sys.path.insert(0, out)
    return importlib.import_module(f"{proto.stem}_pb2"), importlib.import_module(f"{proto.stem}_pb2_grpc")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Call promptmux's Generate over gRPC.")
    parser.add_argument("--target", default="127.0.0.1:9000", help="host:port of the gRPC endpoint")
    parser.add_argument("--api-key", default=os.environ.get("PROMPTMUX_API_KEY"), help="default $PROMPTMUX_API_KEY")
    parser.add_argument("--task", default="reverse")
    parser.add_argument("--text", default="hello")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--stream", action="store_true", help="print text as it is generated")
    parser.add_argument("--candidates", nargs="+", metavar="TEXT",
                        help="score these outputs instead of generating (the Score RPC): each one's log-likelihood")
    parser.add_argument("--proto", type=Path, default=PROTO)
    args = parser.parse_args(argv)
    if not args.api_key:
        parser.error("no API key: pass --api-key or set PROMPTMUX_API_KEY (`promptmux serve` prints a demo key)")

    pb, pb_grpc = load_generated(args.proto)
    metadata = [("application", "promptmux"), ("authorization", f"Bearer {args.api_key}")]
    request = pb.GenerateRequest(
        task=args.task, text=args.text, params=pb.GenerationParams(max_new_tokens=args.max_new_tokens)
    )
    with grpc.insecure_channel(args.target) as channel:
        stub = pb_grpc.PromptmuxStub(channel)
        try:
            if args.candidates:
                scored = stub.Score(pb.ScoreRequest(task=args.task, text=args.text, candidates=args.candidates),
                                    metadata=metadata, timeout=60)
                for candidate, logprob in zip(args.candidates, scored.logprobs):
                    print(f"{logprob:10.4f}  {candidate}")
                print(f"best: {scored.text}")
            elif args.stream:
                for message in stub.GenerateStream(request, metadata=metadata, timeout=60):
                    print(message.delta, end="", flush=True)
                print()
            else:
                reply = stub.Generate(request, metadata=metadata, timeout=60)
                print(reply.text)
        except grpc.RpcError as error:
            print(f"error {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
