"""Tenant and task ids: the one validator every layer uses (store, auth, engine, gRPC, CLI).

An id is 1-128 ASCII characters: letters, digits, '.', '_' or '-', starting with a letter or
digit. The pattern ends in `\\Z`, so even `ID_PATTERN.match` is a full match: a trailing
newline (`copy\\n`) or any non-ASCII character is refused. Ids name directories in the store,
so nothing else may pass.

A task reference in a request is a task id (`summarize`) or an owner-qualified task id
(`acme/summarize`); see prompts/namespace.py for how each resolves.
"""
from __future__ import annotations

import re

from .errors import InvalidRequestError

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
ID_RULE = "1-128 ASCII letters, digits, '.', '_' or '-', starting with a letter or digit"
OWNER_SEPARATOR = "/"


def is_valid_id(value: object) -> bool:
    return isinstance(value, str) and ID_PATTERN.match(value) is not None


def check_id(kind: str, value: object, error: type[InvalidRequestError] = InvalidRequestError) -> str:
    """`value` if it is a valid id, else `error` (INVALID_ARGUMENT) naming `kind` ("tenant", "task")."""
    if not is_valid_id(value):
        raise error(f"invalid {kind} id {value!r}: expected {ID_RULE}")
    return value  # type: ignore[return-value]


def parse_task_ref(ref: object, kind: str = "task") -> tuple[str | None, str]:
    """(owner or None, task id) of a task reference: `task` or `owner/task`."""
    if isinstance(ref, str) and OWNER_SEPARATOR in ref:
        owner, _, task = ref.partition(OWNER_SEPARATOR)
        if is_valid_id(owner) and is_valid_id(task):
            return owner, task
        raise InvalidRequestError(
            f"invalid {kind} reference {ref!r}: expected a task id, or owner/task with each part {ID_RULE}"
        )
    return None, check_id(kind, ref)


def format_task_ref(owner: str | None, task: str) -> str:
    return task if owner is None else f"{owner}{OWNER_SEPARATOR}{task}"
