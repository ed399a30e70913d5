"""Which prompt a tenant's task reference names: the sharing rules, in one place.

- A bare id (`summarize`) is the caller's own task if it has one; otherwise the task of that
  id *published* in the global namespace, if any; otherwise NOT_FOUND.
- `owner/task` (`acme/summarize`) is that owner's task, if the owner is the caller or the
  owner marked it shared; otherwise NOT_FOUND, worded exactly as for an unknown task.
- Only an admin key (and the server seeding its demo prompts) publishes, and an id has one
  publisher at a time (the store refuses a second with ALREADY_EXISTS). So a registration by
  one tenant never changes what another tenant's existing requests resolve to: an ordinary
  tenant's share is reachable only under its own name, and a bare id a tenant already calls
  keeps naming the same owner until that owner deletes it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from .errors import TaskNotFoundError
from .ids import format_task_ref, parse_task_ref
from .records import PromptMeta

TaskKey = tuple[str, str]  # (tenant, task)


def task_not_found(tenant: str, ref: str) -> TaskNotFoundError:
    return TaskNotFoundError(
        f"unknown task {ref!r} for tenant {tenant!r}; list the tasks you can call, with the name to call each "
        "by, with ListTasks, or register a prompt first (RegisterPrompt / `promptmux prompts import`)"
    )


@dataclass(frozen=True)
class TaskNamespace:
    """An immutable view: swapped whole on refresh, read without locks or I/O."""

    latest: Mapping[TaskKey, PromptMeta] = field(default_factory=dict)  # latest live version per task
    published: Mapping[str, PromptMeta] = field(default_factory=dict)  # task id -> its published version

    @classmethod
    def build(cls, latest: Mapping[TaskKey, PromptMeta], claims: Mapping[str, str]) -> "TaskNamespace":
        """`claims` maps a published task id to the owner holding it (the store's claim files).
        A claim counts while its owner's latest version of the task is live and published."""
        published = {}
        for task, owner in claims.items():
            meta = latest.get((owner, task))
            if meta is not None and meta.published:
                published[task] = meta
        return cls(latest=dict(latest), published=published)

    def resolve(self, tenant: str, ref: str) -> PromptMeta:
        owner, task = parse_task_ref(ref)
        if owner is None:
            meta = self.latest.get((tenant, task)) or self.published.get(task)
        else:
            meta = self.latest.get((owner, task))
            if meta is not None and owner != tenant and not meta.shared:
                meta = None  # another tenant's private task answers as an unknown one
        if meta is None:
            raise task_not_found(tenant, ref)
        return meta

    def callable_by(self, tenant: str) -> list[tuple[str, PromptMeta]]:
        """Every task `tenant` can call, once each, with the name to call it by, sorted by name."""
        names: dict[str, PromptMeta] = {}
        for (owner, task), meta in self.latest.items():
            if owner == tenant:
                names[task] = meta
        for task, meta in self.published.items():
            names.setdefault(task, meta)
        reachable_bare = {(m.tenant, m.task) for m in names.values()}
        for (owner, task), meta in self.latest.items():
            if owner != tenant and meta.shared and (owner, task) not in reachable_bare:
                names[format_task_ref(owner, task)] = meta
        return sorted(names.items())
