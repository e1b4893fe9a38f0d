"""Error types. Every error a user can cause is a :class:`CthardenError` with one readable line.

The CLI catches :class:`CthardenError`, prints its message and exits non-zero; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations


class CthardenError(Exception):
    """Base class for errors caused by bad input or configuration (not by bugs)."""


class ConfigError(CthardenError):
    """``params.yaml`` or a command-line override is invalid."""


class DataError(CthardenError):
    """An input file or dataset is missing, corrupt or inconsistent. The message names the file."""


class ValidationFailed(CthardenError):
    """A dataset failed its Great Expectations suite; nothing downstream may use it."""


class GateFailed(CthardenError):
    """A model failed the robustness gate (or regressed against the base branch in ``ci-gate``)."""
