"""One error hierarchy for diffmem. Every error names the parameter or file, the value received
and what would work instead. All derive from :class:`DiffMemError`, itself a ``ValueError``."""

from __future__ import annotations


class DiffMemError(ValueError):
    """Base class of every error diffmem raises on purpose."""


class DataError(DiffMemError):
    """A dataset, image, report or manifest cannot be read as asked.

    Parameters
    ----------
    message : str
        What is wrong and how to fix it.
    path : str, optional
        The file or folder at fault; shown first in the message.
    """

    def __init__(self, message: str, *, path: object | None = None):
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


class ConfigError(DiffMemError):
    """An unknown preset, method or option value."""


class ModelError(DiffMemError):
    """A model folder of the wrong kind, with missing files or unsafe weights."""


class PromptError(DiffMemError):
    """A prompt that cannot be used (empty, only markers, ...)."""


class OutputError(DiffMemError):
    """An output folder that cannot or must not be written."""


class TrainingError(DiffMemError):
    """Training cannot go on (a NaN loss, a checkpoint that does not match)."""


class MissingDependencyError(DiffMemError, ImportError):
    """An optional dependency is missing; the message names the extra to install."""
