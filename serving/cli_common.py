"""What every `promptmux` command shares: the model and store arguments, the config they
build, and the prompt store opened from it. Subcommand modules import this, never cli.py."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import yaml

from .config import PromptmuxConfig

DEFAULT_TENANT = "demo"


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model and store")
    group.add_argument("--config", type=Path, help="YAML with model/store/engine sections")
    group.add_argument("--model", help="'embedded' (default), 'random:<shape>' or a local checkpoint directory")
    group.add_argument("--dtype", choices=["float32", "bfloat16"])
    group.add_argument("--device", help="cpu, cuda or cuda:N")
    group.add_argument("--store", type=Path, help="prompt store directory (default $PROMPTMUX_STORE or var/prompts)")


def config_from_args(args: argparse.Namespace) -> PromptmuxConfig:
    """Build the one config object: YAML file first, then command-line overrides."""
    raw: dict = {}
    if getattr(args, "config", None):
        raw = yaml.safe_load(Path(args.config).read_text()) or {}
    raw = {k: dict(v or {}) for k, v in raw.items()}
    model = raw.setdefault("model", {})
    for flag, key in (("model", "source"), ("dtype", "dtype"), ("device", "device")):
        if getattr(args, flag, None):
            model[key] = getattr(args, flag)
    store = raw.setdefault("store", {})
    if getattr(args, "store", None):
        store["root"] = str(args.store)
    else:
        store.setdefault("root", os.environ.get("PROMPTMUX_STORE", "var/prompts"))
    return PromptmuxConfig.from_dict(raw)


def open_store(config: PromptmuxConfig):
    from promptmux.prompts.store import PromptStore

    from .model_loading import model_d_model

    return PromptStore(
        config.store.root, d_model=model_d_model(config.model), max_length=config.store.max_prompt_length,
        quotas=config.store.quotas(),
    )
