"""Which prompt version each tenant's task reference resolves to, kept in memory.

A view over the store's task table (prompts/task_table.py), which is kept current from the
store's change log: `refresh` applies only the entries written since the last one, so its
cost does not grow with the number of registered tasks. The batch path resolves one key at
a time without I/O and without locks. The sharing rules themselves are in
prompts/namespace.py."""
from __future__ import annotations

from promptmux.prompts.records import PromptMeta
from promptmux.prompts.store import PromptStore
from promptmux.prompts.task_table import TaskTable


class PromptIndex:
    def __init__(self, table: TaskTable) -> None:
        self.table = table

    @classmethod
    def from_store(cls, store: PromptStore) -> "PromptIndex":
        index = cls(store.tasks)
        index.refresh()
        return index

    def refresh(self, tenant: str | None = None) -> int:
        """Apply the store's new changes; returns how many. `tenant`: also settle that tenant's
        changes still in flight now (after its own registration or delete). The periodic
        refresh (no `tenant`) also reconciles with a full listing when that is configured and due."""
        applied = self.table.catch_up(tenant)
        if tenant is None:
            applied += self.table.reconcile_if_due()
        return applied

    def resolve(self, tenant: str, ref: str) -> PromptMeta:
        return self.table.resolve(tenant, ref)

    def visible_to(self, tenant: str) -> list[tuple[str, PromptMeta]]:
        """(name to call it by, metadata) of every task `tenant` can call, sorted by name."""
        return self.table.callable_by(tenant)

    callable_by = visible_to

    def tenant_tasks(self, tenant: str) -> list[PromptMeta]:
        """The latest version of each of `tenant`'s own tasks, sorted by task id."""
        return self.table.tenant_tasks(tenant)

    @property
    def latest(self):
        return self.table.latest

    @property
    def published(self):
        return self.table.published

    def __len__(self) -> int:
        return len(self.table)
