"""The project's error taxonomy. Each error carries the gRPC status name it maps to, so the
serving edge translates without guessing, and each message says what was wrong, what was
expected and how to fix it.

It lives with the domain (prompts/) so every layer, serving/ included, raises and catches the
same classes without importing upward."""
from __future__ import annotations


class PromptmuxError(Exception):
    """Base class. `status` is a gRPC status code name."""

    status = "INTERNAL"


class InvalidRequestError(PromptmuxError, ValueError):
    status = "INVALID_ARGUMENT"


class InvalidPromptError(InvalidRequestError):
    """A prompt that cannot be registered: wrong shape, dtype, non-finite values, too long."""


class TaskNotFoundError(PromptmuxError, KeyError):
    status = "NOT_FOUND"

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0] if self.args else "task not found"


class AlreadyExistsError(PromptmuxError):
    """A name another owner holds, e.g. a task id already published in the global namespace."""

    status = "ALREADY_EXISTS"


class PermissionDeniedError(PromptmuxError):
    status = "PERMISSION_DENIED"


class UnauthenticatedError(PromptmuxError):
    status = "UNAUTHENTICATED"


class ResourceExhaustedError(PromptmuxError):
    status = "RESOURCE_EXHAUSTED"


class QuotaExceededError(ResourceExhaustedError):
    """A tenant's store quota (prompts, rows, description size) would be exceeded."""


class DeadlineExceededError(PromptmuxError):
    status = "DEADLINE_EXCEEDED"


class UnavailableError(PromptmuxError):
    status = "UNAVAILABLE"


class ModelLoadError(PromptmuxError):
    status = "FAILED_PRECONDITION"


class StoredPromptUnreadableError(PromptmuxError):
    """A version file in the store is corrupt or unreadable; the operator must restore or remove it."""

    status = "FAILED_PRECONDITION"


class PromptUnusableError(PromptmuxError):
    """A stored prompt version that cannot be used on the served model: unreadable when a batch
    loads it, or its shape or d_model does not match. It fails the requests that name it, and
    no others."""

    status = "FAILED_PRECONDITION"
