"""Errors that carry the field and the value that caused them."""

from __future__ import annotations

from typing import Any


def shown(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, for one-line error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class StemAgentError(Exception):
    """Base class of every error stemagent raises on purpose."""


class InputError(StemAgentError, ValueError):
    """Bad input (a frame, a message, a file, a command): names the field and the value."""

    def __init__(self, field: str, value: Any, problem: str) -> None:
        self.field = field
        self.value = value
        self.problem = problem
        super().__init__(f"{field}={shown(value)}: {problem}")


class ConfigError(StemAgentError):
    """A configuration file that cannot be used; the message is one line naming file, field and value."""

    def __init__(self, path: str, field: str, value: Any, problem: str) -> None:
        self.path = path
        self.field = field
        self.value = value
        self.problem = problem
        super().__init__(f"{path}: {field}={shown(value)}: {problem}")
