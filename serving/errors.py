"""The project's error taxonomy. Each error carries the gRPC status name it maps to, so the
serving edge translates without guessing, and each message says what was wrong, what was
expected and how to fix it."""
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


class PermissionDeniedError(PromptmuxError):
    status = "PERMISSION_DENIED"


class UnauthenticatedError(PromptmuxError):
    status = "UNAUTHENTICATED"


class ResourceExhaustedError(PromptmuxError):
    status = "RESOURCE_EXHAUSTED"


class DeadlineExceededError(PromptmuxError):
    status = "DEADLINE_EXCEEDED"


class UnavailableError(PromptmuxError):
    status = "UNAVAILABLE"


class ModelLoadError(PromptmuxError):
    status = "FAILED_PRECONDITION"
