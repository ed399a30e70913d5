"""promptmux's configuration: one object per layer, built once (CLI or YAML) and passed down.

One YAML shape for every command: sections `model`, `store`, `engine`, `task_embedding` (the
engine's PromptmuxConfig) and `serving` (a replica's ServingConfig); AppConfig bundles them.
A file is either those sections or a whole Serve config (serving/configs/serve.yaml), whose
promptmux application's `args` are the sections (`read_config_file`). Command-line flags and
environment variables override the file in one place (`apply_overrides`), for `promptmux
generate`, `prompts ...` and `promptmux serve` alike. Every section rejects unknown keys with
the list of valid ones (`_build`).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from promptmux.prompts.quotas import StoreQuotas
from promptmux.prompts.task_embedding import EmbeddingRecipe

# Defaults written once: where the prompt store lives, and the tenant of the demo prompts
# (`promptmux serve`'s demo key and the CLI's --tenant default).
DEFAULT_STORE_ROOT = "var/prompts"
STORE_ENV = "PROMPTMUX_STORE"  # overrides DEFAULT_STORE_ROOT for every command
API_KEYS_ENV = "PROMPTMUX_API_KEYS_FILE"
DEMO_TENANT = "demo"
# The application's name in a Serve config (serving/replica/app.py deploys it under this name).
APP_NAME = "promptmux"

ENGINE_SECTIONS = ("model", "store", "engine", "task_embedding")
APP_SECTIONS = (*ENGINE_SECTIONS, "serving")

DTypeName = Literal["float32", "bfloat16"]
Quantization = Literal["none", "8bit", "4bit", "int8"]


@dataclass(frozen=True)
class ModelConfig:
    """Which frozen model to load, and how to place it.

    `source` is either `embedded` (the built-in default), `random:<shape>` (random weights
    of a named shape, e.g. `random:t5-xxl`, for benchmarks), or a local checkpoint directory.
    """

    source: str = "embedded"
    dtype: DTypeName = "float32"
    device: str = "cpu"
    # "auto" shards over the visible GPUs with accelerate; None keeps the whole model on `device`.
    device_map: str | dict[str, Any] | None = None
    # Per-device memory caps for sharding, e.g. {"0": "70GiB", "1": "70GiB", "cpu": "100GiB"}.
    max_memory: dict[str, str] | None = None
    # "int8": int8 weights on a CPU (serving/model/int8.py); "8bit"/"4bit": bitsandbytes on a GPU.
    quantization: Quantization = "none"
    seed: int = 0
    # On a CPU, keep each float Linear's weight also packed for oneDNN (serving/model/packed.py):
    # 1.0-1.8x faster projections for twice the weights' memory. Off: the default GEMM only.
    packed_weights: bool = True

    def __post_init__(self) -> None:
        allowed = Quantization.__args__
        if self.quantization not in allowed:
            raise ValueError(
                f"model.quantization={self.quantization!r} is unknown; expected one of {', '.join(map(repr, allowed))} "
                "('int8' on a CPU, '8bit' or '4bit' with bitsandbytes on a GPU)"
            )


@dataclass(frozen=True)
class StoreConfig:
    """Where prompts live and what the store accepts."""

    root: Path = Path(DEFAULT_STORE_ROOT)
    max_prompt_length: int = 1024
    # How often a replica reads the store's change log for new entries, so updates land
    # without a restart (an idle read is one failed open, whatever the number of tasks).
    refresh_interval_s: float = 0.5
    # A replica writes a snapshot of every task's latest version after this many new change-log
    # entries, so a starting replica reads one file plus the entries after it (0: never).
    snapshot_every_changes: int = 10_000
    # Every this many seconds a replica also lists the whole store and re-reads any task its
    # table disagrees with: for writers that log nothing (an older promptmux, a hand edit). It
    # costs a full listing (tens of µs per task) each time. 0: off; the change log alone.
    reconcile_interval_s: float = 0.0
    # Per-tenant quotas (prompts/quotas.py); a registration past one is RESOURCE_EXHAUSTED.
    # Prompts and rows count each task's latest version.
    max_prompts_per_tenant: int = 10_000
    max_rows_per_tenant: int = 1_048_576
    max_description_bytes: int = 4096

    def quotas(self) -> StoreQuotas:
        return StoreQuotas(
            max_prompts_per_tenant=self.max_prompts_per_tenant,
            max_rows_per_tenant=self.max_rows_per_tenant,
            max_description_bytes=self.max_description_bytes,
        )


# Default text bound per input token: a UTF-8 character is at most 4 bytes and SentencePiece
# pieces rarely span more than a few characters, so 32 leaves room for truncate=true inputs
# several times longer than max_input_tokens while bounding the tokenizer's work.
INPUT_BYTES_PER_TOKEN = 32


@dataclass(frozen=True)
class EngineConfig:
    """Limits and resources of the batched generation engine."""

    max_input_tokens: int = 512
    # Most UTF-8 bytes of input text, checked before tokenizing (with truncate too). None:
    # max_input_tokens * INPUT_BYTES_PER_TOKEN, room for any tokenizer's longest pieces.
    max_input_bytes: int | None = None
    max_new_tokens_limit: int = 256
    max_batch_size: int = 64
    # Device prompt cache: fixed-size pages of rows in one preallocated tensor.
    prompt_cache_rows: int = 65536
    prompt_cache_page_rows: int = 16
    # Host-memory tier under the device cache, in rows of d_model (pinned memory on CUDA);
    # prompts are read into it when a request is admitted. 0: no host tier.
    prompt_host_cache_rows: int = 262_144
    # "auto" picks Triton on CUDA and the vectorised PyTorch path on CPU.
    concat_backend: Literal["auto", "triton", "torch", "reference"] = "auto"
    # "merged-bias": T5 attention through SDPA with the position bias and padding mask merged
    # once per forward (kernels/t5_attention_bias.py; 1.4x eager on CPU, equal tokens).
    # "model": leave the model's own attention implementation untouched.
    attention: Literal["merged-bias", "model"] = "merged-bias"
    # How the step loop (serving/engine/step/executor.py) runs its decoder forward: "cuda-graphs"
    # (captured per padded shape), "compile" (torch.compile), "none" (eager). "auto" is
    # cuda-graphs on CUDA and eager on CPU, the only mode there (see serving/engine/step/decode_graphs.py).
    decode_graphs: Literal["auto", "cuda-graphs", "compile", "none"] = "auto"

    def __post_init__(self) -> None:
        for name in ("max_input_tokens", "max_new_tokens_limit", "max_batch_size"):
            if not getattr(self, name) > 0:
                raise ValueError(f"engine.{name}={getattr(self, name)} is invalid; expected a value > 0")
        if self.max_input_bytes is not None and self.max_input_bytes < self.max_input_tokens:
            raise ValueError(
                f"engine.max_input_bytes={self.max_input_bytes} is below engine.max_input_tokens="
                f"{self.max_input_tokens}; every token is at least one byte, so raise it (or leave it unset: "
                f"{INPUT_BYTES_PER_TOKEN} bytes per token)"
            )

    @property
    def input_bytes_limit(self) -> int:
        """The text size limit in UTF-8 bytes (max_input_bytes, or derived from max_input_tokens)."""
        return self.max_input_bytes or self.max_input_tokens * INPUT_BYTES_PER_TOKEN


@dataclass(frozen=True)
class PromptmuxConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    # How task embeddings are computed (`prompts embed`, `prompts similar`, SimilarTasks):
    # steps and max_examples bound the work one SimilarTasks call may cost.
    task_embedding: EmbeddingRecipe = field(default_factory=EmbeddingRecipe)

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> "PromptmuxConfig":
        raw = dict(raw or {})
        _check_sections(raw, ENGINE_SECTIONS, "config section")
        recipe = _build(EmbeddingRecipe, raw.get("task_embedding"))
        recipe.validate()
        return cls(
            model=_build(ModelConfig, raw.get("model")),
            store=_build(StoreConfig, raw.get("store")),
            engine=_build(EngineConfig, raw.get("engine")),
            task_embedding=recipe,
        )

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["store"]["root"] = str(self.store.root)
        return out


def _check_sections(raw: dict[str, Any], allowed: tuple[str, ...], what: str) -> None:
    unknown = set(raw) - set(allowed)
    if unknown:
        names = ", ".join(repr(s) for s in allowed[:-1]) + f" and {allowed[-1]!r}"
        raise ValueError(f"unknown {what}(s) {sorted(unknown)}; expected only {names}")


def _build(kind: type, raw: dict[str, Any] | None, label: str | None = None):
    """`kind(**raw)`, refusing keys `kind` does not have (the one unknown-key check)."""
    raw = dict(raw or {})
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = set(raw) - names
    if unknown:
        raise ValueError(
            f"unknown {label or kind.__name__} key(s) {sorted(unknown)}; valid keys are {sorted(names)}"
        )
    if kind is StoreConfig and "root" in raw:
        raw["root"] = Path(raw["root"])
    return kind(**raw)


BatchingMode = Literal["continuous", "mixed", "per_task"]
BATCHING_MODES = ("continuous", "mixed", "per_task")


@dataclass(frozen=True)
class ServingConfig:
    """How a replica admits, queues and batches requests, and who may call it.

    How often prompts (and the key file) are re-read is `store.refresh_interval_s`."""

    # YAML file of hashed API keys (see serving/replica/auth.py). None: $PROMPTMUX_API_KEYS_FILE.
    api_keys_file: str | None = None
    # "continuous": iteration-level batching (serving/scheduling/step_scheduler.py): requests join and
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
    # Continuous: the rows a step runs while a light tenant (one holding at most half an
    # equal share of the slots in use) decodes next to a heavier one. The light tenants' rows all run, the
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
    # Health (serving/replica/health.py, Serve's check_health): a replica whose engine has started or
    # finished no batch for this long while requests are queued or running is unhealthy, and
    # Serve replaces it. Keep it above the longest batch (max_new_tokens_limit decode steps).
    engine_stall_timeout_s: float = 120.0
    # The health check also lists the prompt store's root; a listing that fails or takes
    # longer than this (a hung NFS mount) fails the check. Keep it below Serve's
    # health_check_timeout_s so the replica's own message, not a bare timeout, says why.
    store_check_timeout_s: float = 10.0
    # One log line per call (gRPC or HTTP) with its real status and duration, logger
    # `promptmux.access` (`promptmux serve --access-log`). Off: a busy server's terminal stays quiet.
    access_log: bool = False

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
    """Everything one replica needs, parsed from the application args (the sections above)."""

    promptmux: PromptmuxConfig = field(default_factory=PromptmuxConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)

    @classmethod
    def from_args(cls, args: dict[str, Any] | None) -> "AppConfig":
        raw = dict(args or {})
        _check_sections(raw, APP_SECTIONS, "application arg section")
        serving_raw = raw.pop("serving", None)
        promptmux = PromptmuxConfig.from_dict(raw)
        serving = _build(ServingConfig, serving_raw, "serving").resolved(promptmux.engine.max_batch_size)
        return cls(promptmux=promptmux, serving=serving)

    def to_args(self) -> dict[str, Any]:
        return {**self.promptmux.to_dict(), "serving": dataclasses.asdict(self.serving)}

# ---------------------------------------------------------------------- the one loader
def read_config_file(path: str | Path | None) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(application args, deployment options, Serve-level options) of a config file.

    A file of sections (`model:`, `store:`, ...) is the application args itself; a whole Serve
    config (with `applications:`) gives its promptmux application's args and its deployment's
    options. No file: all three empty."""
    if path is None:
        return {}, {}, {}
    raw = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a YAML mapping of config sections ({', '.join(APP_SECTIONS)})")
    if "applications" not in raw:
        return raw, {}, {}
    apps = [a for a in raw["applications"] if a.get("name") == APP_NAME]
    if not apps:
        raise ValueError(f"{path} has no application named {APP_NAME!r}")
    app = apps[0]
    deployments = app.get("deployments") or [{}]
    options = {k: v for k, v in deployments[0].items() if k != "name"}
    return app.get("args") or {}, options, raw


def apply_overrides(
    app_args: dict[str, Any],
    *,
    model: str | None = None,
    dtype: str | None = None,
    device: str | None = None,
    store: str | Path | None = None,
    api_keys_file: str | Path | None = None,
    access_log: bool = False,
) -> dict[str, Any]:
    """The one override path: command-line values over the file's, then the store root from
    $PROMPTMUX_STORE or the default. Returns new application args (sections copied)."""
    args = {k: dict(v or {}) for k, v in app_args.items()}
    for key, value in (("source", model), ("dtype", dtype), ("device", device)):
        if value:
            args.setdefault("model", {})[key] = value
    store_section = args.setdefault("store", {})
    if store:
        store_section["root"] = str(store)
    store_section.setdefault("root", os.environ.get(STORE_ENV) or DEFAULT_STORE_ROOT)
    if api_keys_file:
        args.setdefault("serving", {})["api_keys_file"] = str(api_keys_file)
    if access_log:
        args.setdefault("serving", {})["access_log"] = True
    return args
