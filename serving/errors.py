"""The project's error taxonomy, as the serving layer names it.

The classes live in prompts/errors.py (the store raises them too, and prompts/ must not
import serving/); every name is re-exported here so `from .errors import X` keeps working."""
from __future__ import annotations

from promptmux.prompts.errors import (  # noqa: F401  (re-exports)
    AlreadyExistsError,
    DeadlineExceededError,
    InvalidPromptError,
    InvalidRequestError,
    ModelLoadError,
    PermissionDeniedError,
    PromptmuxError,
    PromptUnusableError,
    QuotaExceededError,
    ResourceExhaustedError,
    StoredPromptUnreadableError,
    TaskNotFoundError,
    UnauthenticatedError,
    UnavailableError,
)
