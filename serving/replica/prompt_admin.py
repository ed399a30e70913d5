"""Prompt administration as a replica's RPCs need it: register, read, list and delete a
tenant's prompts, and list the tasks a tenant can call.

Writes go to the prompt store; each write then settles the writer's own change in the
replica's task table at once, so the prompt is usable (or gone) here before the reply, and on
other replicas within a refresh. Who may do what is decided by the caller
(serving/replica/auth.py's `require_owner_or_admin`), not here. Blocking: callers on an event loop
run these in a thread."""
from __future__ import annotations

from typing import Sequence

from promptmux.prompts.errors import PromptmuxError
from promptmux.prompts.records import PromptMeta, Registration
from promptmux.prompts.store import PromptStore

from promptmux.prompts.task_table import TaskTable


class PromptAdmin:
    def __init__(self, store: PromptStore, tasks: TaskTable) -> None:
        self._store = store
        self.tasks = tasks  # what the replica's requests resolve against

    @property
    def d_model(self) -> int:
        """The served model's d_model: every prompt must have it."""
        return self._store.d_model

    @property
    def max_length(self) -> int:
        return self._store.max_length

    def check_description(self, owner: str, description: str) -> None:
        """The description quota, cheap: check it before copying a tensor."""
        self._store.quotas.check_description(owner, description)

    def register_many(self, registrations: Sequence[Registration]) -> list[PromptMeta | PromptmuxError]:
        """Store the group (each item succeeds or fails alone) and make it usable here at once,
        elsewhere within a refresh."""
        outcomes = self._store.register_many(registrations)
        for owner in dict.fromkeys(registration.tenant for registration in registrations):
            self.tasks.refresh(owner)
        return outcomes

    def tenant_prompts(self, owner: str) -> list[PromptMeta]:
        """The latest version of each of `owner`'s tasks, as the store holds them now."""
        self.tasks.refresh(owner)  # every replica lists what the store holds now
        return self.tasks.tenant_tasks(owner)

    def meta(self, owner: str, task: str, version: int | None) -> PromptMeta:
        return self._store.meta(owner, task, version)

    def delete(self, owner: str, task: str) -> int:
        removed = self._store.delete(owner, task)
        self.tasks.refresh(owner)
        return removed

    def visible_to(self, tenant: str) -> list[tuple[str, PromptMeta]]:
        """(name to call it by, metadata) of every task `tenant` can call; O(callable tasks)."""
        return self.tasks.callable_by(tenant)
