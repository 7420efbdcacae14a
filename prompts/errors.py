"""Errors of the prompt domain (format, registry, training).

Each class names one kind of failure; `softprompt.server.grpc_api.status` maps each to one gRPC status code,
so the message alone must tell the user what to fix.
"""

from __future__ import annotations


class PromptError(Exception):
    """Base of every error raised by softprompt.prompts."""


class InvalidNameError(PromptError):
    """A task name, version or alias does not follow the reference syntax."""


class InvalidPromptError(PromptError):
    """Uploaded prompt bytes or config are malformed, or the tensor cannot serve this base model."""


class BaseModelMismatchError(PromptError):
    """The prompt was made for a different base model (refused unless forced)."""


class PromptNotFoundError(PromptError):
    """No task, version or alias matches the reference."""


class RegistryConflictError(PromptError):
    """The store's state forbids the change (e.g. deleting a version an alias points at)."""


class CorruptPromptError(PromptError):
    """A stored version no longer matches its recorded checksum or metadata."""


class ChatTemplateError(PromptError):
    """The chat template was asked for but the base model's tokenizer has none."""


class TrainingDataError(PromptError):
    """Training or evaluation data is unreadable, empty or inconsistent; the message names the line."""


class StoreUnavailableError(PromptError):
    """The prompt store cannot be reached or refuses access; the message names the store and what failed."""
