"""What Ray Serve deploys: a PromptmuxServer whose parts are built from the application config.

PromptmuxServer (serving/replica/server.py) receives its engine, prompt administration, task
similarity and key ring; this module builds them, once per replica, inside the replica's
process (a model is not shipped through `bind`). Tests and other hosts can build a
PromptmuxServer from parts of their own."""
from __future__ import annotations

import os
from typing import Any

import torch

from .auth import KeyRing
from ..config import API_KEYS_ENV, AppConfig
from ..demo.prompts import seed_demo_prompts_if_embedded
from .server import PromptmuxServer
from ..engine.core import Engine
from .prompt_admin import PromptAdmin
from .task_similarity import TaskSimilarity


def build_replica_parts(config: AppConfig) -> dict[str, Any]:
    """The keyword arguments of PromptmuxServer besides `config`."""
    serving = config.serving
    # The path was resolved where the app was built; a replica's own environment may name it too.
    keys_file = serving.api_keys_file or os.environ.get(API_KEYS_ENV)
    if not keys_file:
        raise ValueError(
            f"no API key file: set serving.api_keys_file or ${API_KEYS_ENV} (the service never runs "
            "without authentication; `promptmux serve` makes a demo key file for local use)"
        )
    if serving.torch_threads:
        torch.set_num_threads(serving.torch_threads)
    keys = KeyRing.from_file(keys_file)
    engine = Engine.from_config(config.promptmux)
    # Replicas seed too (KubeRay starts no `promptmux serve`); two replicas racing at most
    # register the same content twice.
    seed_demo_prompts_if_embedded(config.promptmux.model, engine.store)
    engine.refresh_prompts()
    return {
        "engine": engine,
        "prompts": PromptAdmin(engine.store, engine.index),
        "similarity": TaskSimilarity(engine.loaded, engine.store, config.promptmux.task_embedding),
        "keys": keys,
    }


class PromptmuxReplica(PromptmuxServer):
    """The class `serve.deployment` wraps (serving/replica/app.py): `bind(config)` is all it takes."""

    def __init__(self, config: AppConfig) -> None:
        super().__init__(config, **build_replica_parts(config))
