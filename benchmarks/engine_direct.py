"""The one engine-direct set-up every engine-level benchmark shares: torch threads set before
the model exists (as a replica does), the model loaded once, an Engine on a private temporary
prompt store, and random prompts registered for the workload. No batcher, no gRPC, no Ray.

    with DirectEngine({"source": "random:t5-small"}, {"max_batch_size": 64}) as engine:
        tasks = register_random_prompts(engine, "bench", [20] * 64, seed=0)
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

from promptmux.serving.config import PromptmuxConfig
from promptmux.serving.engine.core import Engine


class DirectEngine:
    """An Engine of its own, on a temporary store removed on close (or on the `store` section
    given, e.g. the harness's server's store). A context manager."""

    def __init__(self, model: dict[str, Any] | str, engine: dict[str, Any] | None = None, *,
                 store: dict[str, Any] | None = None, torch_threads: int | None = 1, seed: int | None = 0) -> None:
        if torch_threads:
            # Before the model exists, as a replica does (and Ray sets OMP_NUM_THREADS for it):
            # threads sized during the build would otherwise linger beside the engine's.
            torch.set_num_threads(torch_threads)
        if seed is not None:
            torch.manual_seed(seed)
        self._root = None
        if store is None:
            self._root = tempfile.TemporaryDirectory(prefix="promptmux-engine-direct-")
            store = {"root": str(Path(self._root.name)), "max_prompt_length": 1024}
        self.config = PromptmuxConfig.from_dict({
            "model": {"source": model} if isinstance(model, str) else dict(model),
            "store": dict(store),
            "engine": dict(engine or {}),
        })
        self.engine = Engine.from_config(self.config)

    def close(self) -> None:
        if self._root is not None:
            self._root.cleanup()

    def __enter__(self) -> Engine:
        return self.engine

    def __exit__(self, *exc) -> None:
        self.close()


def register_random_prompts(engine: Engine, tenant: str, lengths: Sequence[int], *, seed: int,
                            scale: float = 0.05, prefix: str = "task") -> list[str]:
    """Register task `{prefix}{i}` with a `[lengths[i], d_model]` random prompt (scaled like a
    trained one) for each i; the engine sees them at once. Returns the task ids."""
    generator = torch.Generator().manual_seed(seed)
    tasks = []
    for i, length in enumerate(lengths):
        task = f"{prefix}{i}"
        engine.store.register(tenant, task, scale * torch.randn(length, engine.loaded.d_model, generator=generator))
        tasks.append(task)
    engine.refresh_prompts()
    return tasks
