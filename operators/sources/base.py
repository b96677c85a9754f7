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

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["Idle", "Source", "SourceContext", "SourceReader"]


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
