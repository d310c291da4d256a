"""Errors every layer raises; the server maps them to OpenAI-shaped 4xx, the CLI to one line."""

from __future__ import annotations


class GearshiftError(Exception):
    """Base class: a clear, user-facing message. Never wraps a traceback for the user."""


class InvalidRequestError(GearshiftError, ValueError):
    """A request the engine refuses before queuing it (HTTP 400). `param` names the field."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class ModelLoadError(GearshiftError):
    """The model cannot be loaded: missing, corrupt, truncated, or an unsupported architecture."""


class EngineOverloadedError(GearshiftError):
    """The waiting queue is full (HTTP 429 with Retry-After)."""


class EngineError(GearshiftError):
    """The engine failed while serving a request it had accepted (HTTP 500, retryable): never the client's
    fault, so never a 400."""


class ModelNotReadyError(GearshiftError):
    """The model is still loading (or failed to): HTTP 503 with Retry-After, not a client error."""
