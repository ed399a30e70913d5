"""The serving layer's config (the `serving` section of the Ray Serve application args),
and the application config that bundles it with the engine's PromptmuxConfig.

The application args are one dict with optional sections `model`, `store`, `engine` (the
keys of serving/config.py) and `serving` (the keys of ServingConfig below). They are parsed
once in `build_app`, so a typo fails the deploy instead of every replica.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from .config import PromptmuxConfig

BatchingMode = Literal["continuous", "mixed", "per_task"]
BATCHING_MODES = ("continuous", "mixed", "per_task")
API_KEYS_ENV = "PROMPTMUX_API_KEYS_FILE"


@dataclass(frozen=True)
class ServingConfig:
    """How a replica admits, queues and batches requests, and who may call it.

    How often prompts (and the key file) are re-read is `store.refresh_interval_s`."""

    # YAML file of hashed API keys (see serving/auth.py). None: $PROMPTMUX_API_KEYS_FILE.
    api_keys_file: str | None = None
    # "continuous": iteration-level batching (serving/step_scheduler.py): requests join and
    # leave the running batch between decoder steps. "mixed": batch-at-a-time (any tasks
    # share a batch, which runs to completion; the static mode, kept for comparison).
    # "per_task": batch-at-a-time with one task per batch (what one-adapter-per-forward
    # serving offers; kept for comparison).
    batching: BatchingMode = "continuous"
    # Most requests per engine batch (continuous: rows decoding at once). None:
    # engine.max_batch_size. 1 disables batching.
    max_batch_size: int | None = None
    # Batch-at-a-time modes: after the first request arrives, how long to wait for more
    # before running a batch. Continuous batching admits at once and ignores it.
    batch_wait_timeout_s: float = 0.01
    # Continuous: encoder positions (prompt rows + input tokens) admitted per step, so a
    # burst of long inputs spreads over several steps and decoding never stalls for long.
    # A single request longer than this is admitted alone, in a step of its own. Smaller
    # spreads bursts thinner: on a 2-core CPU (embedded shape, 64 slots) 192 against 1024
    # halved a steady tenant's p99 under a flood at equal throughput; too small for the
    # traffic leaves freed slots empty for a step or more.
    max_encoder_tokens_per_step: int = 256
    # Continuous: the rows a step runs while a light tenant (holding at most a quarter of
    # this many slots) decodes next to a heavier one. The light tenants' rows all run, the
    # heavier tenants' fill the rest (at least a quarter); their other rows keep their slots
    # and wait a step. On a CPU a step costs in proportion to its rows, so this keeps a light
    # tenant's latency near its latency alone under a flood, for some of the flood's
    # throughput while the light tenant decodes; alone, or among equals, every row runs.
    # "auto": 16 on CPU; 0 (off) on CUDA, where a step costs about the same for 1 row as for 64.
    shared_step_rows: int | Literal["auto"] = "auto"
    # Requests waiting for a batch, beyond which new ones get RESOURCE_EXHAUSTED at once.
    max_queue_size: int = 1024
    # Requests one tenant may have queued or running on a replica (RESOURCE_EXHAUSTED past it),
    # so one tenant's flood cannot fill the queue for everyone.
    max_in_flight_per_tenant: int = 256
    # A request still waiting after this long is dropped before compute (DEADLINE_EXCEEDED).
    # A client's own gRPC deadline also drops it: the cancellation reaches the replica.
    max_queue_wait_s: float = 30.0
    # On shutdown, how long queued requests may still run before they get UNAVAILABLE.
    shutdown_grace_s: float = 10.0
    # torch intra-op threads per replica; None leaves torch's default.
    torch_threads: int | None = None
    # Health (serving/health.py, Serve's check_health): a replica whose engine has started or
    # finished no batch for this long while requests are queued or running is unhealthy, and
    # Serve replaces it. Keep it above the longest batch (max_new_tokens_limit decode steps).
    engine_stall_timeout_s: float = 120.0
    # The health check also lists the prompt store's root; a listing that fails or takes
    # longer than this (a hung NFS mount) fails the check. Keep it below Serve's
    # health_check_timeout_s so the replica's own message, not a bare timeout, says why.
    store_check_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.batching not in BATCHING_MODES:
            raise ValueError(
                f"serving.batching={self.batching!r} is unknown; expected 'continuous' (the default), 'mixed' or 'per_task'"
            )
        positive = {
            "max_encoder_tokens_per_step": self.max_encoder_tokens_per_step,
            "max_queue_size": self.max_queue_size,
            "max_in_flight_per_tenant": self.max_in_flight_per_tenant,
            "max_queue_wait_s": self.max_queue_wait_s,
            "engine_stall_timeout_s": self.engine_stall_timeout_s,
            "store_check_timeout_s": self.store_check_timeout_s,
        }
        if self.max_batch_size is not None:
            positive["max_batch_size"] = self.max_batch_size
        if self.torch_threads is not None:
            positive["torch_threads"] = self.torch_threads
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"serving.{name}={value} is invalid; expected a value > 0")
        if self.shared_step_rows != "auto" and not (
            isinstance(self.shared_step_rows, int) and not isinstance(self.shared_step_rows, bool)
            and self.shared_step_rows >= 0
        ):
            raise ValueError(
                f"serving.shared_step_rows={self.shared_step_rows!r} is invalid; expected \"auto\", 0 (off) "
                "or a number of rows > 0"
            )
        for name in ("batch_wait_timeout_s", "shutdown_grace_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"serving.{name}={getattr(self, name)} is invalid; expected a value >= 0")

        if self.max_queue_wait_s <= self.batch_wait_timeout_s:
            raise ValueError(
                f"serving.max_queue_wait_s={self.max_queue_wait_s} must exceed serving.batch_wait_timeout_s="
                f"{self.batch_wait_timeout_s}, or every request would expire while its batch forms"
            )

    def resolved(self, engine_max_batch_size: int) -> "ServingConfig":
        """A copy with every default made concrete, checked against the engine's limits."""
        max_batch = self.max_batch_size or engine_max_batch_size
        if max_batch > engine_max_batch_size:
            raise ValueError(
                f"serving.max_batch_size={max_batch} exceeds engine.max_batch_size={engine_max_batch_size}; "
                "raise the engine's limit or lower the serving one"
            )
        keys_file = self.api_keys_file or os.environ.get(API_KEYS_ENV) or None
        return dataclasses.replace(self, max_batch_size=max_batch, api_keys_file=keys_file)


@dataclass(frozen=True)
class AppConfig:
    """Everything one replica needs, parsed from the application args."""

    promptmux: PromptmuxConfig = field(default_factory=PromptmuxConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)

    @classmethod
    def from_args(cls, args: dict[str, Any] | None) -> "AppConfig":
        raw = dict(args or {})
        unknown = set(raw) - {"model", "store", "engine", "task_embedding", "serving"}
        if unknown:
            raise ValueError(
                f"unknown application arg section(s) {sorted(unknown)}; expected only 'model', 'store', "
                "'engine', 'task_embedding' and 'serving'"
            )
        serving_raw = dict(raw.pop("serving", None) or {})
        names = {f.name for f in dataclasses.fields(ServingConfig)}
        unknown = set(serving_raw) - names
        if unknown:
            raise ValueError(f"unknown serving key(s) {sorted(unknown)}; valid keys are {sorted(names)}")
        promptmux = PromptmuxConfig.from_dict(raw)
        serving = ServingConfig(**serving_raw).resolved(promptmux.engine.max_batch_size)
        return cls(promptmux=promptmux, serving=serving)

    def to_args(self) -> dict[str, Any]:
        return {**self.promptmux.to_dict(), "serving": dataclasses.asdict(self.serving)}
