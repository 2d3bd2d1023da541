"""Exceptions raised for user-facing problems.

Every message says what was wrong, where, and what to do about it. The CLI turns any
:class:`ModelLegoError` into a one-line message and a non-zero exit status.
"""

from __future__ import annotations


class ModelLegoError(Exception):
    """Base class of all errors caused by input the user can fix."""


class ModelLegoWarning(UserWarning):
    """Something the user should know that does not stop the command (the CLI prints it as
    one ``modellego: warning:`` line)."""


class DataError(ModelLegoError):
    """A dataset could not be found, read or understood."""


class ModelFileError(ModelLegoError):
    """A model file is missing, unsafe, corrupted or inconsistent."""


class UnsupportedModelError(ModelLegoError):
    """A model, layer or graph pattern that modellego cannot handle correctly."""


class PlanError(ModelLegoError):
    """A disassembly or assembly plan that cannot be applied (e.g. a layer left empty)."""


class ExportError(ModelLegoError):
    """A network could not be exported, or its export does not reproduce modellego's outputs
    (nothing is written)."""


class TrainingError(ModelLegoError):
    """A training run diverged (non-finite loss or weights); nothing is written."""


class OutputWriteError(ModelFileError, OSError):
    """An output could not be written (no space, no permission, ...): a one-line
    :class:`ModelFileError` that is also the :class:`OSError` it stands for, so that code
    catching ``OSError`` around a write keeps working."""


def exception_line(exc: BaseException, limit: int = 300) -> str:
    """``"Type: first line of the message"`` (the line cut at ``limit`` characters), for a
    one-line error that names an exception raised by another library."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {(lines[0] if lines else '')[:limit]}"
