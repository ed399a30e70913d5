"""The demo prompts that ship with the embedded model, and their seeding into a store.

Each `assets/demo_prompts/<task>.safetensors` holds one float32 prompt under the key
`prompt`, with `description` and the JSON `training` metadata in its header, and its task
embedding under `task_embedding` (serving/demo/task_embeddings.py), recipe in the header. They were
trained by `python -m promptmux.serving.demo.build` for the shipped embedded weights
only: other models must not receive them.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from promptmux.prompts.records import PromptMeta, content_hash
from promptmux.prompts.store import PromptStore
from promptmux.prompts.task_embedding import TASK_EMBEDDING_EXTRA_KEY

from ..config import DEMO_TENANT, ModelConfig
from ..model.embedded import DEMO_PROMPTS_DIR
from promptmux.prompts.errors import AlreadyExistsError, ModelLoadError, TaskNotFoundError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoPrompt:
    task: str
    tensor: torch.Tensor  # [L, D] float32
    description: str
    training: dict
    task_embedding: torch.Tensor | None = None  # [L, D] float32
    task_embedding_info: dict | None = None  # its recipe: PromptMeta.extra["task_embedding"]


def load_demo_prompts(directory: Path = DEMO_PROMPTS_DIR) -> list[DemoPrompt]:
    """Every shipped demo prompt, sorted by task id."""
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise ModelLoadError(
            f"no demo prompts in {str(directory)!r}; restore serving/assets from the repository or rebuild them "
            "with `python -m promptmux.serving.demo.build`"
        )
    return [_read(path) for path in files]


def seed_demo_prompts(
    store: PromptStore, tenant: str = DEMO_TENANT, *, directory: Path = DEMO_PROMPTS_DIR
) -> dict[str, PromptMeta]:
    """Register each demo prompt as a task of `tenant` published in the global namespace (every
    tenant calls it by its bare id, e.g. `reverse`, unless it has its own task of that id),
    unless its latest version already holds exactly that prompt, published. Returns every
    demo task's live metadata; running it again registers nothing.

    An id another tenant already published stays theirs: the demo prompt is then registered
    shared only (callers name it `demo/<task>`) and a warning says so."""
    live = {}
    for prompt in load_demo_prompts(directory):
        current = _latest(store, tenant, prompt.task)
        # A store seeded before the demo prompts carried task embeddings gets a version with one.
        lacks_embedding = prompt.task_embedding is not None and TASK_EMBEDDING_EXTRA_KEY not in (
            current.extra if current else {})
        if (current is not None and current.content_hash == content_hash(prompt.tensor) and current.published
                and not lacks_embedding):
            live[prompt.task] = current
            continue
        extra = {"source": "promptmux demo prompt", **prompt.training}
        if prompt.task_embedding is not None:
            extra[TASK_EMBEDDING_EXTRA_KEY] = prompt.task_embedding_info
        fields = dict(description=prompt.description, extra=extra, task_embedding=prompt.task_embedding,
                      check_quotas=False)  # the server's own prompts are no tenant's usage
        try:
            live[prompt.task] = store.register(tenant, prompt.task, prompt.tensor, publish=True, **fields)
        except AlreadyExistsError as error:
            log.warning("demo prompt %r not published: %s", prompt.task, error)
            if current is None or current.content_hash != content_hash(prompt.tensor) or lacks_embedding:
                current = store.register(tenant, prompt.task, prompt.tensor, shared=True, **fields)
            live[prompt.task] = current
    return live


def seed_demo_prompts_if_embedded(model: ModelConfig, store: PromptStore) -> dict[str, PromptMeta]:
    """The embedded default serves its demo tasks from the first start; other models get none
    (the prompts were trained for the shipped weights alone)."""
    return seed_demo_prompts(store) if model.source == "embedded" else {}


def _latest(store: PromptStore, tenant: str, task: str) -> PromptMeta | None:
    try:
        return store.meta(tenant, task)
    except TaskNotFoundError:
        return None


def _read(path: Path) -> DemoPrompt:
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            tensor = handle.get_tensor("prompt")
            embedding = handle.get_tensor("task_embedding") if "task_embedding" in handle.keys() else None
    except (SafetensorError, OSError, KeyError) as error:
        raise ModelLoadError(
            f"demo prompt {str(path)!r} is unreadable or has no 'prompt' tensor ({error}); restore serving/assets "
            "from the repository"
        ) from error
    return DemoPrompt(
        task=path.stem,
        tensor=tensor.float().contiguous(),
        description=header.get("description", ""),
        training=json.loads(header.get("training", "{}")),
        task_embedding=None if embedding is None else embedding.float().contiguous(),
        task_embedding_info=json.loads(header["task_embedding"]) if embedding is not None else None,
    )
