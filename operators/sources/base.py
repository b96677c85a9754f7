"""The source contract: a picklable config builds a replayable reader.

A :class:`Source` is a configuration object that is pickled to every source
subtask actor. There it builds a :class:`SourceReader` for its share of the
input (its *split*). A reader hands out Arrow record batches and can report
its position (``offset()``) as a small msgpack-able value; building a reader
with that value as ``resume_offset`` continues right after the last batch the
old reader returned. That is what makes sources replayable for checkpoints.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from checkpoint.errors import PlanError

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["Idle", "Source", "SourceContext", "SourceReader", "parse_split_offset"]


@dataclass(frozen=True, slots=True)
class Idle:
    """Returned by :meth:`SourceReader.read` when no batch is ready yet.

    Attributes:
        seconds: how long the runtime should wait before reading again.

    """

    seconds: float


@dataclass(frozen=True, slots=True)
class SourceContext:
    """Where a source reader runs.

    Attributes:
        operator: the source operator's name (``source_0``).
        subtask: this subtask's index.
        parallelism: how many subtasks read this source together.

    """

    operator: str
    subtask: int = 0
    parallelism: int = 1


class SourceReader(ABC):
    """Reads one subtask's split of a source."""

    @abstractmethod
    def read(self) -> pa.RecordBatch | Idle | None:
        """Return the next batch, ``Idle`` when none is ready, ``None`` at the end."""

    @abstractmethod
    def offset(self) -> Any:
        """Return the position after the last batch returned (msgpack-able)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release files and connections."""


class Source(ABC):
    """A replayable input. Subclasses are small picklable configs."""

    @abstractmethod
    def build(self, ctx: SourceContext, resume_offset: Any | None = None) -> SourceReader:
        """Return the reader for ``ctx.subtask``'s split, positioned at ``resume_offset``."""

    def max_parallelism(self) -> int | None:
        """Return the most subtasks this source can use, or ``None`` for no limit."""
        return None


def parse_split_offset(ctx: SourceContext, resume_offset: Any, *, source: str,
                       fields: tuple[tuple[str, str], ...]) -> tuple[int, ...]:
    """Check an offset of non-negative integers whose first names this subtask's split.

    Splits (batches, row groups, files) go round-robin to subtasks, so the
    first field modulo the parallelism must be ``ctx.subtask``.

    Args:
        ctx: where the reader runs.
        resume_offset: the offset to check, a dict.
        source: the source class, for messages (``"ParquetSource"``).
        fields: ``(key, placeholder)`` pairs, the split index first.

    Returns:
        The fields' values, in order.

    Raises:
        PlanError: the offset is malformed or belongs to another subtask.
    """
    raw = [resume_offset.get(key) if isinstance(resume_offset, dict) else None for key, _ in fields]
    values = [v for v in raw if isinstance(v, int) and v >= 0]
    if len(values) != len(fields):
        shape = ", ".join(f"'{key}': {placeholder}" for key, placeholder in fields)
        msg = (
            f"{source} {ctx.operator}: resume offset {resume_offset!r} is not {{{shape}}}; "
            f"resume from an offset() of a {source} reader"
        )
        raise PlanError(msg)
    parallelism = max(ctx.parallelism, 1)
    if values[0] % parallelism != ctx.subtask:
        msg = (
            f"{source} {ctx.operator}: resume offset {resume_offset!r} does not belong to "
            f"subtask {ctx.subtask} of {parallelism}; restore at the parallelism the offset was taken with"
        )
        raise PlanError(msg)
    return tuple(values)
