"""Configuration objects, one per layer, built once (CLI or YAML) and passed down."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from promptmux.prompts.quotas import StoreQuotas
from promptmux.prompts.task_embedding import EmbeddingRecipe

DTypeName = Literal["float32", "bfloat16"]
Quantization = Literal["none", "8bit", "4bit"]


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
    quantization: Quantization = "none"
    seed: int = 0


@dataclass(frozen=True)
class StoreConfig:
    """Where prompts live and what the store accepts."""

    root: Path = Path("var/prompts")
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
    # How the step loop (serving/step_engine.py) runs its decoder forward: "cuda-graphs"
    # (captured per padded shape), "compile" (torch.compile), "none" (eager). "auto" is
    # cuda-graphs on CUDA and eager on CPU, the only mode there (see serving/decode_graphs.py).
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
        unknown = set(raw) - {"model", "store", "engine", "task_embedding"}
        if unknown:
            raise ValueError(
                f"unknown config section(s) {sorted(unknown)}; expected only 'model', 'store', 'engine' "
                "and 'task_embedding'"
            )
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


def _build(kind: type, raw: dict[str, Any] | None):
    raw = dict(raw or {})
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = set(raw) - names
    if unknown:
        raise ValueError(
            f"unknown {kind.__name__} key(s) {sorted(unknown)}; valid keys are {sorted(names)}"
        )
    if kind is StoreConfig and "root" in raw:
        raw["root"] = Path(raw["root"])
    return kind(**raw)
