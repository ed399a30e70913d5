"""Which stored tasks resemble a new one: task embeddings ranked for a tenant.

Used by `promptmux prompts similar` and the SimilarTasks RPC. The candidates are exactly the
tasks the tenant can call, as the store's task table says (`callable_by`); nothing here decides
visibility. Computing the new task's embedding is a short prompt-tuning run (the config's
`task_embedding` recipe), so the RPC runs it in a worker thread, one at a time per replica.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Sequence

import torch

from promptmux.prompts.retrieval import EmbeddingCache, Ranking, rank_tasks
from promptmux.prompts.store import PromptStore
from promptmux.prompts.synthetic_tasks import Example
from promptmux.prompts.task_embedding import EmbeddingRecipe, compute_task_embedding, shared_init
from promptmux.prompts.task_table import TaskTable

from promptmux.prompts.errors import InvalidRequestError, ResourceExhaustedError
from ..model.loading import LoadedModel

MAX_TOP_K = 100
MAX_WAITING = 4  # calls queued behind the running one; more are refused, not queued without bound


@dataclass(frozen=True)
class SimilarityAnswer:
    ranking: Ranking
    recipe: EmbeddingRecipe
    examples_used: int


class TaskSimilarity:
    def __init__(self, loaded: LoadedModel, store: PromptStore, recipe: EmbeddingRecipe) -> None:
        recipe.validate()
        self.loaded = loaded
        self.recipe = recipe
        self.embeddings = EmbeddingCache(store)
        self._init: torch.Tensor | None = None
        self._lock = threading.Lock()  # one embedding run at a time: it is seconds of compute
        self._admission = threading.Lock()
        self._pending = 0

    def init(self) -> torch.Tensor:
        if self._init is None:
            self._init = shared_init(self.loaded.model, self.loaded.tokenizer, self.recipe)
        return self._init

    def check_examples(self, examples: Sequence[Example]) -> None:
        """Cheap validation, before any compute is spent."""
        if not examples:
            raise InvalidRequestError("no examples of the new task; send input/target pairs of it")
        if len(examples) > self.recipe.max_examples:
            raise InvalidRequestError(
                f"{len(examples)} examples sent, more than task_embedding.max_examples={self.recipe.max_examples}; "
                "send fewer (a few hundred are plenty for a task embedding)"
            )

    def embed(self, examples: Sequence[Example]) -> torch.Tensor:
        """The recipe's task embedding `[L, D]` of `examples`; blocks for the length of a short run."""
        self.check_examples(examples)
        with self._admission:
            if self._pending > MAX_WAITING:
                raise ResourceExhaustedError(
                    f"{self._pending} task-embedding runs are already running or queued on this replica; "
                    "retry SimilarTasks with backoff"
                )
            self._pending += 1
        try:
            with self._lock:
                return compute_task_embedding(self.loaded.model, self.loaded.tokenizer, examples, self.recipe,
                                              model_name=self.loaded.name, init=self.init()).tensor
        finally:
            with self._admission:
                self._pending -= 1

    def similar(self, tasks: TaskTable, tenant: str, examples: Sequence[Example], top_k: int) -> SimilarityAnswer:
        """The tenant's visible tasks, most similar to the task `examples` show first."""
        if not 1 <= top_k <= MAX_TOP_K:
            raise InvalidRequestError(f"top_k={top_k} is out of range; expected 1..{MAX_TOP_K}")
        query = self.embed(examples)
        with self._lock:  # the cache is shared by concurrent callers
            ranking = rank_tasks(query, tasks.callable_by(tenant), self.embeddings, init=self.init(),
                                 recipe=self.recipe, model_name=self.loaded.name, top_k=top_k)
        return SimilarityAnswer(ranking=ranking, recipe=self.recipe, examples_used=len(examples))
