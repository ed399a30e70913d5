"""Who runs next: per-tenant queues (tenant_queues.py), the batch-at-a-time batcher
(batcher.py) and the step scheduler (step_scheduler.py). `build_scheduler` picks one for
`serving.batching`; each drives its executor with plans (engine/plan.py)."""
from __future__ import annotations

import dataclasses

from ..config import ServingConfig
from ..engine.core import Engine
from ..engine.static_decoding import StaticExecutor
from ..engine.step.executor import StepExecutor
from .batcher import Batcher
from .step_scheduler import StepScheduler
from .tenant_queues import BatchObserver


def build_scheduler(config: ServingConfig, engine: Engine, observer: BatchObserver | None = None):
    """The replica's scheduler for `serving.batching`: the StepScheduler over the step
    executor for "continuous", the batch-at-a-time Batcher over the static one for "mixed"
    and "per_task"."""
    if config.batching == "continuous":
        if config.shared_step_rows == "auto":
            config = dataclasses.replace(config, shared_step_rows=0 if engine.device.type == "cuda" else 16)
        return StepScheduler(config, StepExecutor(engine.context), observer=observer)
    return Batcher(config, StaticExecutor(engine.context), observer=observer)
