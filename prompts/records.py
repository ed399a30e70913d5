"""What the prompt store keeps for each version."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

SUPPORTED_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class PromptMeta:
    tenant: str
    task: str
    version: int
    content_hash: str  # sha256 of the raw tensor bytes, as stored
    d_model: int
    length: int
    dtype: str
    created_at: float  # unix seconds
    shared: bool = False  # other tenants may call it as `tenant/task`
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. training metadata
    # In the global namespace: a bare `task` reaches it for tenants without their own `task`.
    # Implies shared. Older files lack the field and read as False.
    published: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PromptMeta":
        return cls(**json.loads(text))

    @property
    def key(self) -> tuple[str, str]:
        return (self.tenant, self.task)


@dataclass(frozen=True)
class Registration:
    """One new version to store (PromptStore.register_many); the arguments of PromptStore.register."""

    tenant: str
    task: str
    tensor: torch.Tensor  # [L, d_model]
    shared: bool = False
    publish: bool = False
    description: str = ""
    extra: dict[str, Any] | None = None
    task_embedding: torch.Tensor | None = None  # [L', d_model]


@dataclass(frozen=True)
class StoredPrompt:
    meta: PromptMeta
    tensor: torch.Tensor  # [L, D] on CPU, dtype as registered
    task_embedding: torch.Tensor | None = None  # [L', D] early checkpoint, when the version has one


def content_hash(tensor: torch.Tensor) -> str:
    raw = tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(raw).hexdigest()
