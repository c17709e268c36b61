"""Errors a user can fix.

Every error raised for bad input derives from :class:`UserError`. The CLI prints its message as one
line and exits with its ``exit_code``; it never shows a traceback for these. Messages name the fix.
"""
from __future__ import annotations


class UserError(Exception):
    """A failure caused by the user's input or environment, with a message that names the fix."""

    exit_code: int = 2


class UnknownModelError(UserError):
    """The model name is neither an alias nor a timm model we can prune."""


class BudgetError(UserError):
    """The budget is not a number in (0, 1], or no aligned model is that small."""


class WeightsError(UserError):
    """No usable weights: missing or corrupt checkpoint, or pretrained weights out of reach."""


class DataError(UserError):
    """The data directory is missing, empty or unreadable."""


class OutputPathError(UserError):
    """The output path cannot be written."""


class PlanError(UserError):
    """A plan file is missing, corrupt, or does not fit the model."""


class OptionError(UserError):
    """A command-line option has a value the tool cannot use (a negative seed, an unknown device, ...)."""
