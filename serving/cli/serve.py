"""`promptmux serve`: the whole service on this machine with one command.

Starts a local Ray (no dashboard) with its Prometheus export on --metrics-port, Ray Serve with
its gRPC proxy on --grpc-port and HTTP proxy (health) on --http-port, deploys the promptmux
application, seeds the demo prompts for the embedded model, prints where everything is, and
stops cleanly on Ctrl-C or SIGTERM.

Before it starts anything, it checks that its ports are free: a port in use (another
promptmux serve?) stops it at once with exit code 2, and nothing else happens.

API keys (the service never runs without them): the key file comes from --api-keys-file,
the config's `serving.api_keys_file`, or $PROMPTMUX_API_KEYS_FILE. With none of those, a
local demo key file is created next to the prompt store, holding (hashed) one fresh key for
tenant `demo`, which is printed once. The file is named by the gRPC port
(`dev-api-keys-9000.yaml`): a server on another port never rewrites the file a running one
reads, and a server on the same port cannot be running (its port is checked first). Deployments (serving/configs/serve.yaml, Kubernetes)
never do this: a replica with no key file refuses to start.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from ..config import DEFAULT_STORE_ROOT, DEMO_TENANT, STORE_ENV, apply_overrides, read_config_file


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "serve",
        help="run the gRPC service locally on Ray Serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", type=Path,
        help="YAML with the application args (sections model, store, engine, serving), or a whole Serve "
        "config such as serving/configs/serve.yaml, whose promptmux application, ports and deployment "
        "options are used",
    )
    parser.add_argument("--grpc-port", type=int, help="gRPC port (default 9000, or the Serve config's)")
    parser.add_argument("--http-port", type=int, help="HTTP port for health checks (default 8000, or the Serve config's)")
    parser.add_argument("--metrics-port", type=int, default=8080, help="Prometheus metrics port (default 8080)")
    parser.add_argument(
        "--host", default="127.0.0.1",
        help="address that gRPC, HTTP and metrics all listen on: a loopback address (default 127.0.0.1, this "
        "machine only) or 0.0.0.0 (every interface)",
    )
    parser.add_argument("--model", help="'embedded' (default), 'random:<shape>' or a local checkpoint directory")
    parser.add_argument("--store", type=Path, help=f"prompt store directory (default ${STORE_ENV} or {DEFAULT_STORE_ROOT})")
    parser.add_argument("--api-keys-file", type=Path, help="hashed API key file (see serving/replica/auth.py)")
    parser.add_argument("--replicas", type=int, help="replicas of the model (default 1)")
    parser.add_argument("--num-cpus", type=float, help="CPUs Ray may use (default: all)")
    parser.add_argument("--access-log", action="store_true",
                        help="log one line per call with its real status (serving.access_log; off by default)")
    parser.set_defaults(handler=run_serve)
    return parser


def resolve_args(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(application args, deployment options, Serve-level options): the --config file read by
    the one loader, then the command line through the one override path (serving/config.py)."""
    try:
        app_args, options, serve_config = read_config_file(args.config)
    except ValueError as error:
        raise SystemExit(f"promptmux serve: {error}") from None
    app_args = apply_overrides(app_args, model=args.model, store=args.store, api_keys_file=args.api_keys_file,
                               access_log=args.access_log)
    options = dict(options)
    if args.replicas:
        options.pop("autoscaling_config", None)
        options["num_replicas"] = args.replicas
    return app_args, options, serve_config


def make_dev_key_file(store_root: Path, grpc_port: int) -> tuple[Path, str]:
    """A fresh key for tenant `demo`, stored hashed next to the prompt store, in the file of
    this gRPC port (only the server on that port reads it)."""
    from ..replica.auth import generate_key, write_key_file

    key = generate_key()
    path = write_key_file(Path(store_root).parent / f"dev-api-keys-{grpc_port}.yaml", [(DEMO_TENANT, key, False)])
    return path, key


def port_in_use(host: str, port: int) -> bool:
    """Whether something listens on `port` at `host` (or would stop a listener there)."""
    import socket

    reach = "127.0.0.1" if host in _EVERY_INTERFACE else host
    family = socket.AF_INET6 if ":" in reach else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        if probe.connect_ex((reach, port)) == 0:
            return True
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed server's TIME_WAIT is no listener
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def busy_port_message(host: str, ports: dict[str, int]) -> str | None:
    """The message for the first port in use, or None when every port is free."""
    for name, port in ports.items():
        if port_in_use(host, port):
            flag = {"gRPC": "--grpc-port", "HTTP": "--http-port", "metrics": "--metrics-port"}[name]
            return (f"promptmux serve: port {port} is in use (another promptmux serve?); stop it, or pick a free "
                    f"{name} port with {flag}")
    return None


def run_serve(args: argparse.Namespace) -> int:
    host = bind_host(args.host)
    app_args, options, serve_config = resolve_args(args)
    grpc_port = args.grpc_port or serve_config.get("grpc_options", {}).get("port", 9000)
    http_port = args.http_port or serve_config.get("http_options", {}).get("port", 8000)
    busy = busy_port_message(host, {"gRPC": grpc_port, "HTTP": http_port, "metrics": args.metrics_port})
    if busy:  # before anything starts or is written: a running server keeps its keys
        print(busy, file=sys.stderr)
        return 2
    # Before Ray is imported: it reads its single-machine switch at import time.
    os.environ.update(ray_environment(host))

    from ..replica.app import ROUTE_PREFIX
    from ..replica.auth import KeyRing
    from .common import open_store
    from ..config import APP_NAME, AppConfig
    from ..demo.prompts import seed_demo_prompts_if_embedded
    from .local_serve import local_serve
    from ..rpc.message_limits import GRPC_MAX_MESSAGE_ENV, grpc_max_message_bytes
    from ..model.loading import model_d_model
    from .local_serve import HOOK as BIND_HOOK

    config = AppConfig.from_args(app_args)
    dev_key = None
    if not config.serving.api_keys_file:
        keys_file, dev_key = make_dev_key_file(config.promptmux.store.root, grpc_port)
        app_args.setdefault("serving", {})["api_keys_file"] = str(keys_file.resolve())
    else:
        # A replica refuses a bad key file; say so now, not after Ray has started and retried.
        try:
            KeyRing.from_file(config.serving.api_keys_file)
        except (FileNotFoundError, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        app_args.setdefault("serving", {})["api_keys_file"] = str(Path(config.serving.api_keys_file).resolve())
    # Replicas may run in another working directory: hand them absolute paths.
    app_args["store"]["root"] = str(Path(app_args["store"]["root"]).resolve())
    config = AppConfig.from_args(app_args)

    max_message = grpc_max_message_bytes(config, model_d_model(config.promptmux.model))
    seed_demo_prompts_if_embedded(config.promptmux.model, open_store(config.promptmux))
    # Ray's processes (raylet, metrics agent, Serve's proxies) inherit this environment.
    os.environ[GRPC_MAX_MESSAGE_ENV] = str(max_message)
    apps = {APP_NAME: (config, options, ROUTE_PREFIX)}
    try:
        with local_serve(apps, grpc_port=grpc_port, http_port=http_port, metrics_port=args.metrics_port, host=host,
                         num_cpus=args.num_cpus, runtime_env={"worker_process_setup_hook": BIND_HOOK}):
            try:
                stop = _stop_on_signals()
                check_listening(host, {"gRPC": grpc_port, "HTTP": http_port, "metrics": args.metrics_port})
                _print_banner(config, grpc_port, http_port, args, dev_key, host, max_message)
                while not stop():
                    time.sleep(0.5)
            finally:
                print("\nstopping promptmux ...", file=sys.stderr)
    except KeyboardInterrupt:
        pass
    return 0


_LOOPBACK = {"localhost": "127.0.0.1", "127.0.0.1": "127.0.0.1", "::1": "::1"}
_EVERY_INTERFACE = {"0.0.0.0", "::"}


def bind_host(host: str) -> str:
    """The address to listen on, or SystemExit when Ray cannot keep every port on it: Ray
    exports metrics on loopback (when its node address is loopback) or on every interface."""
    if host in _LOOPBACK or host.startswith("127."):
        return _LOOPBACK.get(host, host)
    if host in _EVERY_INTERFACE:
        return host
    raise SystemExit(
        f"promptmux serve: --host {host} is not supported: Ray's metrics export listens either on loopback or on "
        "every interface, so promptmux serve binds everything to 127.0.0.1 (the default) or to 0.0.0.0; "
        "put a firewall or a proxy in front for one interface"
    )


def ray_environment(host: str, terminal: bool | None = None) -> dict[str, str]:
    """Environment for the local Ray this command starts, so that it listens on `host` only
    (and writes no colour codes when its output is not a terminal)."""
    from .local_serve import GRPC_HOST_ENV

    env = {GRPC_HOST_ENV: host}
    if not (sys.stderr.isatty() if terminal is None else terminal):
        env["RAY_COLOR_PREFIX"] = "0"  # Ray's log prefixes carry colour codes unless told otherwise
    if host not in _EVERY_INTERFACE:
        # Ray's single-machine mode (its default on macOS and Windows): the node address is
        # loopback, so the raylet, the metrics agent and its exporter listen on loopback only.
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    return env


def check_listening(host: str, ports: dict[str, int], timeout_s: float = 30.0) -> None:
    """Every named port listens, on `host` only; SystemExit naming the port otherwise."""
    import psutil

    wanted = {host, f"::ffff:{host}"} if host not in _EVERY_INTERFACE else {"0.0.0.0", "::"}
    end = time.monotonic() + timeout_s
    while True:
        listening: dict[int, set[str]] = {}
        for conn in psutil.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr.port in ports.values():
                listening.setdefault(conn.laddr.port, set()).add(conn.laddr.ip)
        wrong = {name: listening[port] - wanted for name, port in ports.items() if listening.get(port, set()) - wanted}
        if wrong:
            raise SystemExit(f"promptmux serve: {wrong} listen on more than --host {host}; stopping")
        if all(port in listening for port in ports.values()):
            return
        if time.monotonic() > end:
            missing = [name for name, port in ports.items() if port not in listening]
            raise SystemExit(f"promptmux serve: {missing} did not start listening within {timeout_s:.0f}s")
        time.sleep(0.2)


def _stop_on_signals():
    """Ctrl-C (SIGINT) and SIGTERM (docker stop, kill) both stop cleanly. SIGINT is handled
    explicitly too: a shell starts background jobs with it ignored."""
    stopped = {"now": False}

    def handle(signum, frame):
        stopped["now"] = True

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handle)
    return lambda: stopped["now"]


def client_command(target: str, key: str, cwd: Path | None = None) -> str:
    """A client command line that works where this server runs, on a fresh machine too.

    The system Python may lack grpc, so: in a checkout, the project's own environment through
    `./dev python`; in an installed package, this very interpreter, which has the serve extras.
    """
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "dev").is_file() and (checkout / "serving" / "rpc" / "client_example.py").is_file():
        here = (cwd or Path.cwd()).resolve()
        dev = "./dev" if here == checkout else str(checkout / "dev")
        return f"{dev} python serving/rpc/client_example.py --target {target} --api-key {key}"
    return f"{sys.executable} -m promptmux.serving.rpc.client_example --target {target} --api-key {key}"


def _print_banner(config, grpc_port: int, http_port: int, args: argparse.Namespace, dev_key: str | None,
                  host: str, max_message_bytes: int) -> None:
    serving = config.serving
    reach = "127.0.0.1" if host in _EVERY_INTERFACE else host
    where = "every interface" if host in _EVERY_INTERFACE else host
    lines = [
        "",
        f"promptmux is serving model {config.promptmux.model.source!r} ({serving.batching} batching, "
        f"batches of up to {serving.max_batch_size})",
        f"  gRPC     {reach}:{grpc_port}   "
        "service promptmux.v1.Promptmux; metadata `application: promptmux` and `authorization: Bearer <key>`",
        f"  HTTP     http://{reach}:{http_port}/v1   OpenAI-compatible completions and models "
        "(`Authorization: Bearer <key>`); health at /-/healthz",
        f"           health   http://{reach}:{http_port}/-/healthz",
        f"  metrics  http://{reach}:{args.metrics_port}/metrics",
        f"  listens  on {where}{'' if host in _EVERY_INTERFACE else ' only'} (--host); gRPC messages up to {max_message_bytes // (1024 * 1024)} MiB",
        f"  prompts  {config.promptmux.store.root}",
        f"  API keys {serving.api_keys_file}",
    ]
    if dev_key:
        lines += [
            f"  demo key (tenant {DEMO_TENANT!r}, shown once, stored only hashed): {dev_key}",
            "",
            f"  try: {client_command(f'{reach}:{grpc_port}', dev_key)} --task reverse --text hello",
            f"       curl -s http://{reach}:{http_port}/v1/completions -H 'Authorization: Bearer {dev_key}' "
            "-H 'Content-Type: application/json' -d '{\"model\": \"reverse\", \"prompt\": \"hello\"}'",
        ]
    lines += ["", "Ctrl-C stops."]
    print("\n".join(lines), flush=True)
