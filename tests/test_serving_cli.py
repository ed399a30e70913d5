"""`promptmux serve` settings: Serve config files, overrides, the local demo key. (Starting the
server itself is what the Ray tests do, through the same build_deployment.)"""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from promptmux.serving.replica.auth import KeyRing
from promptmux.serving.cli.serve import add_serve_parser, make_dev_key_file, resolve_args
from promptmux.serving.config import AppConfig, read_config_file

SERVE_YAML = Path(__file__).resolve().parents[1] / "serving" / "configs" / "serve.yaml"


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


def test_the_projects_serve_config_feeds_promptmux_serve():
    app_args, options, serve_config = read_config_file(SERVE_YAML)
    assert serve_config["grpc_options"]["port"] == 9000 and serve_config["http_options"]["port"] == 8000
    assert options["autoscaling_config"]["min_replicas"] == 1 and "name" not in options
    config = AppConfig.from_args(app_args)
    assert config.promptmux.model.source == "embedded" and config.serving.batching == "continuous"


def test_command_line_overrides_the_config_file(tmp_path):
    args = parse("--config", str(SERVE_YAML), "--model", "random:tiny", "--store", str(tmp_path / "p"),
                 "--api-keys-file", str(tmp_path / "k.yaml"), "--replicas", "3")
    app_args, options, _ = resolve_args(args)
    assert app_args["model"]["source"] == "random:tiny"
    assert app_args["store"]["root"] == str(tmp_path / "p")
    assert app_args["serving"]["api_keys_file"] == str(tmp_path / "k.yaml")
    assert options["num_replicas"] == 3 and "autoscaling_config" not in options


def test_plain_args_file_and_defaults(tmp_path):
    path = tmp_path / "args.yaml"
    path.write_text(yaml.safe_dump({"engine": {"max_batch_size": 8}, "serving": {"batching": "per_task"}}))
    app_args, options, serve_config = resolve_args(parse("--config", str(path)))
    assert options == {} and serve_config == {}
    assert app_args["store"]["root"] == "var/prompts"
    config = AppConfig.from_args(app_args)
    assert config.serving.max_batch_size == 8 and config.serving.batching == "per_task"
    assert parse().handler.__name__ == "run_serve" and parse().metrics_port == 8080


def test_demo_key_file_holds_one_hashed_key_for_tenant_demo(tmp_path):
    path, key = make_dev_key_file(tmp_path / "prompts", 9000)
    assert path == tmp_path / "dev-api-keys-9000.yaml" and key not in path.read_text()
    principal = KeyRing.from_file(path).authenticate([("authorization", f"Bearer {key}")])
    assert (principal.tenant, principal.admin) == ("demo", False)
    _, other = make_dev_key_file(tmp_path / "prompts", 9000)
    assert other != key  # a fresh key every start: the file never holds it in clear
    elsewhere, _ = make_dev_key_file(tmp_path / "prompts", 9100)
    assert elsewhere != path and KeyRing.from_file(path).authenticate([("authorization", f"Bearer {other}")])


def test_a_busy_port_stops_serve_before_anything_starts(tmp_path):
    import socket

    from promptmux.serving.cli.serve import busy_port_message, run_serve

    with socket.socket() as listener, socket.socket() as spare:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        spare.bind(("127.0.0.1", 0))
        free = spare.getsockname()[1]
        spare.close()
        assert busy_port_message("127.0.0.1", {"gRPC": free}) is None
        message = busy_port_message("127.0.0.1", {"gRPC": free, "HTTP": port})
        assert message == (f"promptmux serve: port {port} is in use (another promptmux serve?); stop it, or pick a "
                           "free HTTP port with --http-port")
        args = parse("--http-port", str(port), "--store", str(tmp_path / "prompts"))
        assert run_serve(args) == 2
    assert not list(tmp_path.iterdir())  # no key file, no store: nothing was started or written


def test_promptmux_cli_offers_serve():
    from promptmux.serving.cli.main import build_parser

    args = build_parser().parse_args(["serve", "--grpc-port", "9100"])
    assert args.grpc_port == 9100 and args.handler.__name__ == "run_serve"


def test_every_command_takes_the_store_from_the_same_override_path(tmp_path, monkeypatch):
    """`promptmux serve` and the offline commands read $PROMPTMUX_STORE alike; --store beats it."""
    from promptmux.serving.cli.main import build_parser
    from promptmux.serving.cli.common import config_from_args

    monkeypatch.setenv("PROMPTMUX_STORE", str(tmp_path / "from-env"))
    app_args, _, _ = resolve_args(parse())
    assert app_args["store"]["root"] == str(tmp_path / "from-env")
    generate = build_parser().parse_args(["generate", "--task", "reverse", "hello"])
    assert config_from_args(generate).store.root == tmp_path / "from-env"
    app_args, _, _ = resolve_args(parse("--store", str(tmp_path / "flag")))
    assert app_args["store"]["root"] == str(tmp_path / "flag")


def test_offline_commands_read_a_whole_serve_config_and_refuse_unknown_keys(tmp_path):
    from promptmux.serving.cli.main import build_parser
    from promptmux.serving.cli.common import config_from_args

    generate = build_parser().parse_args(["generate", "--config", str(SERVE_YAML), "--task", "reverse", "x"])
    assert config_from_args(generate).model.source == "embedded"
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump({"serving": {"max_batch_sise": 8}}))
    bad = build_parser().parse_args(["generate", "--config", str(path), "--task", "reverse", "x"])
    with pytest.raises(ValueError, match=r"unknown serving key\(s\) \['max_batch_sise'\]; valid keys are .*max_batch_size"):
        config_from_args(bad)



@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("- tenant: acme\n  sha256: abc\n", "must be a mapping with a `keys:` list"),
])
def test_serve_refuses_a_bad_key_file_before_starting_ray(tmp_path, monkeypatch, capsys, content, message):
    from promptmux.serving.cli.serve import ray_environment, run_serve

    for name in ray_environment("127.0.0.1"):  # run_serve sets these; put them back afterwards
        monkeypatch.setenv(name, "")
    keys = tmp_path / "keys.yaml"
    if content is not None:
        keys.write_text(content)
    code = run_serve(parse("--model", "random:tiny", "--store", str(tmp_path / "p"), "--api-keys-file", str(keys)))
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "p").exists()  # nothing started, nothing written
