"""What every `promptmux` command shares: the model and store arguments, the config they
build, and the prompt store opened from it. Subcommand modules import this, never cli.py."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..config import DEFAULT_STORE_ROOT, DEMO_TENANT, STORE_ENV, AppConfig, PromptmuxConfig, apply_overrides, read_config_file

# Commands act for the demo prompts' tenant unless told otherwise.
DEFAULT_TENANT = DEMO_TENANT


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model and store")
    group.add_argument("--config", type=Path,
                       help="YAML with model/store/engine/task_embedding sections, or a whole Serve config")
    group.add_argument("--model", help="'embedded' (default), 'random:<shape>' or a local checkpoint directory")
    group.add_argument("--dtype", choices=["float32", "bfloat16"])
    group.add_argument("--device", help="cpu, cuda or cuda:N")
    group.add_argument("--store", type=Path, help=f"prompt store directory (default ${STORE_ENV} or {DEFAULT_STORE_ROOT})")


def config_from_args(args: argparse.Namespace) -> PromptmuxConfig:
    """Build the one config object: the file first (serving/config.py's one loader), then the
    command line and $PROMPTMUX_STORE, through the override path `promptmux serve` takes too."""
    app_args, _, _ = read_config_file(getattr(args, "config", None))
    app_args = apply_overrides(app_args, model=getattr(args, "model", None), dtype=getattr(args, "dtype", None),
                               device=getattr(args, "device", None), store=getattr(args, "store", None))
    return AppConfig.from_args(app_args).promptmux


def open_store(config: PromptmuxConfig):
    from promptmux.prompts.store import PromptStore

    from ..model.loading import model_d_model

    return PromptStore(
        config.store.root, d_model=model_d_model(config.model), max_length=config.store.max_prompt_length,
        quotas=config.store.quotas(),
    )
