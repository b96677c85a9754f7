"""The onceflow error hierarchy.

Every error onceflow raises derives from :class:`OnceflowError`. Subclasses
exist where a caller would catch them differently. Messages are lowercase,
name the operator and the column where there is one, and end with what to do.

This module is a leaf: it imports nothing from onceflow, so every package
(``runtime``, ``operators``, ``checkpoint``) can import it without a cycle.
Users import these names from ``onceflow``.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "DataError",
    "JobFailedError",
    "OnceflowError",
    "OperatorError",
    "PlanError",
    "SinkCommitError",
]


class OnceflowError(Exception):
    """Root of every error onceflow raises."""

    def __reduce__(self) -> tuple[object, ...]:
        # Keep keyword attributes (operator, column, ...) when Ray pickles the error.
        return (_rebuild, (type(self), self.args, dict(self.__dict__)))


def _rebuild(kind: type[OnceflowError], args: tuple[object, ...], attributes: dict[str, object]) -> OnceflowError:
    error = kind.__new__(kind)
    error.args = args
    error.__dict__.update(attributes)
    return error


class PlanError(OnceflowError):
    """The dataflow cannot be planned: a bad graph, a bad option, a name clash."""


class DataError(OnceflowError):
    """A batch does not have the columns or types an operator expects.

    Attributes:
        operator: the name of the operator that rejected the batch.
        column: the offending column, where there is one.

    """

    def __init__(self, message: str, *, operator: str = "", column: str | None = None) -> None:
        super().__init__(message)
        self.operator = operator
        self.column = column


class OperatorError(OnceflowError):
    """User code or an operator failed while processing.

    Attributes:
        operator: the name of the operator that failed.
        subtask: the failing subtask index, or ``None`` where unknown.

    """

    def __init__(self, message: str, *, operator: str = "", subtask: int | None = None) -> None:
        super().__init__(message)
        self.operator = operator
        self.subtask = subtask


class CheckpointError(OnceflowError):
    """A checkpoint could not complete, or too many failed in a row.

    Attributes:
        reason: why (``"expired"``, ``"declined"``, ``"too many failures"``...).
    """

    def __init__(self, message: str, *, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


class SinkCommitError(OnceflowError):
    """A sink could not commit (or abort) a pre-committed transaction."""


class JobFailedError(OnceflowError):
    """A job stopped because an operator failed; nothing uncommitted was published.

    Attributes:
        job: the job name.
        operator: the operator (``<operator>/<subtask>``) that failed first, if known.

    """

    def __init__(self, message: str, *, job: str = "", operator: str = "") -> None:
        super().__init__(message)
        self.job = job
        self.operator = operator
