"""Which prompt version each tenant's task reference resolves to, kept in memory.

Built from the store's listing and its claims on published ids, and swapped whole on
refresh, so the batch path reads it without I/O and without locks. The sharing rules
themselves are in prompts/namespace.py."""
from __future__ import annotations

from promptmux.prompts.namespace import TaskNamespace
from promptmux.prompts.store import PromptStore


class PromptIndex(TaskNamespace):
    @classmethod
    def from_store(cls, store: PromptStore) -> "PromptIndex":
        namespace = store.namespace()
        return cls(latest=namespace.latest, published=namespace.published)

    def visible_to(self, tenant: str):
        """(name to call it by, metadata) of every task `tenant` can call, sorted by name."""
        return self.callable_by(tenant)
