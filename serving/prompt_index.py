"""Which prompt version each (tenant, task) resolves to, kept in memory.

Built from the store's listing and swapped whole on refresh, so the batch path reads it
without I/O and without locks."""
from __future__ import annotations

from dataclasses import dataclass, field

from promptmux.prompts.records import PromptMeta
from promptmux.prompts.store import PromptStore

from .errors import TaskNotFoundError


@dataclass(frozen=True)
class PromptIndex:
    own: dict[tuple[str, str], PromptMeta] = field(default_factory=dict)
    shared: dict[str, PromptMeta] = field(default_factory=dict)  # task id -> shared version

    @classmethod
    def from_store(cls, store: PromptStore) -> "PromptIndex":
        own = store.snapshot()
        shared: dict[str, PromptMeta] = {}
        for (tenant, task), meta in sorted(own.items()):
            if meta.shared:
                shared.setdefault(task, meta)  # the first tenant by name wins a clash
        return cls(own=own, shared=shared)

    def resolve(self, tenant: str, task: str) -> PromptMeta:
        """A tenant's own task, else a shared one. Another tenant's private task answers
        exactly as an unknown task does."""
        meta = self.own.get((tenant, task)) or self.shared.get(task)
        if meta is None:
            raise TaskNotFoundError(
                f"unknown task {task!r} for tenant {tenant!r}; register its prompt first "
                "(promptmux prompts import) or list tasks with `promptmux prompts list`"
            )
        return meta

    def visible_to(self, tenant: str) -> list[PromptMeta]:
        mine = {task: meta for (owner, task), meta in self.own.items() if owner == tenant}
        for task, meta in self.shared.items():
            mine.setdefault(task, meta)
        return [mine[task] for task in sorted(mine)]
