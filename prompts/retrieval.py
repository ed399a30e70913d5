"""Rank stored tasks by task-embedding similarity to a new task (SPoT retrieval).

The caller decides which tasks may be ranked (for a tenant: the tasks it can call, with the
name it calls each by, from the store's task table, `callable_by`); this module only loads their
embeddings and scores them, so visibility stays in one place.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Union

import torch

from .records import PromptMeta
from .store import PromptStore
from .task_embedding import TASK_EMBEDDING_EXTRA_KEY, EmbeddingRecipe, similarity_matrix


@dataclass(frozen=True)
class Match:
    meta: PromptMeta  # the stored version whose embedding matched
    score: float  # similarity to the query, -1..1
    name: str = ""  # what the caller calls the task by: `task`, or `owner/task` for another's share

    @property
    def call_name(self) -> str:
        return self.name or self.meta.task


Candidate = Union[PromptMeta, tuple[str, PromptMeta]]  # a meta alone is called by its task id


@dataclass(frozen=True)
class Ranking:
    matches: list[Match]  # best first, at most top_k
    compared: int  # candidates with a comparable embedding
    without_embedding: list[PromptMeta]  # candidates skipped: no embedding, or another model/recipe's


def comparable(meta: PromptMeta, recipe: EmbeddingRecipe, model_name: str) -> bool:
    info = meta.extra.get(TASK_EMBEDDING_EXTRA_KEY)
    if not isinstance(info, dict):
        return False
    key = recipe.comparable_key(model_name)
    return all(info.get(name) == value for name, value in key.items())


class EmbeddingCache:
    """Task embeddings by (tenant, task, version): versions are immutable, so entries never go stale."""

    def __init__(self, store: PromptStore, max_entries: int = 4096) -> None:
        self.store = store
        self.max_entries = max_entries
        self._entries: dict[tuple[str, str, int], torch.Tensor] = {}

    def get(self, meta: PromptMeta) -> torch.Tensor | None:
        key = (meta.tenant, meta.task, meta.version)
        if key not in self._entries:
            embedding = self.store.get(meta.tenant, meta.task, meta.version).task_embedding
            if embedding is None:
                return None
            if len(self._entries) >= self.max_entries:
                self._entries.pop(next(iter(self._entries)))
            self._entries[key] = embedding.float()
        return self._entries[key]


def rank_tasks(
    query: torch.Tensor,
    candidates: Iterable[Candidate],
    embeddings: EmbeddingCache,
    *,
    init: torch.Tensor,
    recipe: EmbeddingRecipe,
    model_name: str,
    top_k: int | None = None,
) -> Ranking:
    """Score every candidate that has a comparable embedding; best first."""
    scored, skipped = [], []
    for candidate in candidates:
        name, meta = candidate if isinstance(candidate, tuple) else (candidate.task, candidate)
        embedding = embeddings.get(meta) if comparable(meta, recipe, model_name) else None
        if embedding is None or embedding.shape != query.shape:
            skipped.append(meta)
        else:
            scored.append((name, meta, embedding))
    if not scored:
        return Ranking(matches=[], compared=0, without_embedding=skipped)
    scores = similarity_matrix([query, *(e for _, _, e in scored)], init, recipe.similarity)[0, 1:]  # [N]
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    matches = [Match(scored[i][1], float(scores[i]), name=scored[i][0]) for i in order]
    return Ranking(matches=matches[:top_k] if top_k else matches, compared=len(scored), without_embedding=skipped)
