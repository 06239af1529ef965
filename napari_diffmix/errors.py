"""Error types that reach users.

Every error a user can cause (a bad file, a wrong flag, a mismatched model) is raised as a
subclass of :class:`DiffMixError` with a message that says what was wrong, where, and what
was expected. The CLI prints these without a traceback; the napari widgets show them as
notifications. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os


class DiffMixError(Exception):
    """Base class for errors caused by user input or environment, not by a bug."""


class DatasetError(DiffMixError, ValueError):
    """A dataset file or folder is missing, malformed or inconsistent."""

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        self.path = None if path is None else os.fspath(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


class SchemeError(DiffMixError, ValueError):
    """A class scheme is malformed, or labels do not fit the scheme."""


class LabelError(DiffMixError, ValueError):
    """A label map violates the data contract (dtype, shape, type consistency)."""


class CheckpointError(DiffMixError, ValueError):
    """A model checkpoint is missing, unsafe or does not match the expected config."""


class TrainingError(DiffMixError, RuntimeError):
    """Training cannot go on: NaN loss, out of memory, ranks out of step, bad settings, or a
    device that is not there."""


class StoreError(DiffMixError, ValueError):
    """An output store exists with another plan, is corrupt, or cannot be written."""


class OutputError(DiffMixError, OSError):
    """An output file or folder cannot be created or replaced (a file in the way, no
    permission, a full disk). Still an ``OSError`` with the original ``errno``."""

    def __init__(self, path: str | os.PathLike, cause: OSError):
        self.path = os.fspath(path)
        self.message = f"cannot write {self.path}: {cause.strerror or cause}"
        super().__init__(cause.errno, self.message)

    def __str__(self) -> str:
        return self.message


class UnsafeOutputError(DiffMixError, ValueError):
    """An output location would destroy data: it is an input, holds one, lies inside one, or
    is a folder this tool did not make (``--overwrite`` never replaces those)."""


class RenderError(DiffMixError, RuntimeError):
    """A render produced no usable image (e.g. the sample became NaN or Inf)."""


class OutputLockedError(DiffMixError, RuntimeError):
    """Another process is writing the same output (a store): two writers would mix their items."""
