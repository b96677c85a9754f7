"""The source contract: a picklable config builds a replayable reader.

A :class:`Source` is a configuration object that is pickled to every source
subtask actor. There it builds a :class:`SourceReader` for its share of the
input (its *split*). A reader hands out Arrow record batches and can report
its position (``offset()``) as a small msgpack-able value; building a reader
with that value as ``resume_offset`` continues right after the last batch the
old reader returned. That is what makes sources replayable for checkpoints.

Rescaling: the built-in sources split their input into numbered *splits*
(batches, row groups, files) and a reader's offset lists its
:class:`SplitCursor` objects, each an arithmetic sequence of splits and the
progress through it. When a job resumes at another parallelism, every new
reader gets :class:`RescaledOffsets` (the offsets of all the old readers) and
:func:`deal_cursors` hands each new reader its share of the old cursors, split
further where needed, so every split is read exactly once: none skipped, none
twice.

Example:
    >>> old = [SplitCursor(2, 0, 6), SplitCursor(2, 1, 5)]  # two readers, at batches 6 and 5
    >>> [deal_cursors(old, subtask, 3) for subtask in range(3)]  # doctest: +NORMALIZE_WHITESPACE
    [[SplitCursor(stride=6, start=5, next=5, position=0), SplitCursor(stride=6, start=8, next=8, position=0)],
     [SplitCursor(stride=6, start=6, next=6, position=0), SplitCursor(stride=6, start=9, next=9, position=0)],
     [SplitCursor(stride=6, start=7, next=7, position=0), SplitCursor(stride=6, start=10, next=10, position=0)]]
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from onceflow.errors import PlanError

if TYPE_CHECKING:
    import pyarrow as pa

    from onceflow.operators.logic import Emitted
    from onceflow.operators.watermark import BoundedOutOfOrderness, SplitWatermarkGenerator

__all__ = [
    "Idle",
    "PerSplitWatermarks",
    "RescaledOffsets",
    "SideOutputs",
    "Source",
    "SourceContext",
    "SourceReader",
    "SplitCursor",
    "cursors_offset",
    "deal_cursors",
    "parse_split_offset",
    "resume_cursors",
]


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


class PerSplitWatermarks(ABC):
    """An optional ability of a reader: it tracks event time per split (a Kafka partition).

    The runtime asks such a reader for its watermark generator instead of
    building one for the whole subtask; the reader reports each split's
    event times to it before returning a batch, and keeps them in its offset.
    """

    @abstractmethod
    def split_watermarks(self, strategy: BoundedOutOfOrderness, max_event_time: int | None) -> SplitWatermarkGenerator:
        """Return the reader's per-split watermark generator for ``strategy``.

        Args:
            strategy: the source's watermark strategy.
            max_event_time: the subtask's restored ``max_event_time``.

        Returns:
            The generator the reader feeds, its splits assigned.

        """


class SideOutputs(ABC):
    """An optional ability of a reader: a read may set rows aside for side output ports (dead letters).

    After every :meth:`SourceReader.read` that returns a batch (perhaps an
    empty one, when every row was set aside), the runtime takes the rows that
    read set aside and emits them in the same step as the batch, so the
    reader's ``offset()`` covers both: a reader resumed from it emits neither
    again. Rows set aside carry no event time and do not move the watermark.
    """

    @abstractmethod
    def take_side_outputs(self) -> Emitted:
        """Return the ``(port, batch)`` pairs the last read set aside, and forget them."""


@dataclass(frozen=True, slots=True)
class RescaledOffsets:
    """The ``resume_offset`` of a reader when the job resumes at another parallelism.

    Attributes:
        offsets: the ``offset()`` of every reader of the earlier run, in subtask
            order; the new reader takes its share of them over.

    """

    offsets: tuple[Any, ...]


class Source(ABC):
    """A replayable input. Subclasses are small picklable configs."""

    @abstractmethod
    def build(self, ctx: SourceContext, resume_offset: Any | None = None) -> SourceReader:
        """Return the reader for ``ctx.subtask``'s split, positioned at ``resume_offset``.

        ``resume_offset`` is ``None`` (start), an ``offset()`` of this subtask's
        reader at the same parallelism, or :class:`RescaledOffsets` when the
        parallelism changed; a source that cannot rescale raises ``PlanError``
        for the last.
        """

    def max_parallelism(self) -> int | None:
        """Return the most subtasks this source can use, or ``None`` for no limit."""
        return None

    def side_ports(self) -> frozenset[int]:
        """Return the side output ports its readers emit on (:data:`~onceflow.operators.logic.DEAD_LETTERS`).

        A source with side ports builds readers that are :class:`SideOutputs`; by default it has none.
        """
        return frozenset()


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


@dataclass(frozen=True, slots=True)
class SplitCursor:
    """A reader's progress through one arithmetic sequence of splits.

    The sequence is splits ``start, start + stride, start + 2 * stride, ...``;
    those before ``next`` were read, and ``position`` is how much of split
    ``next`` was (rows of a row group, bytes of a file; 0 where a split is read
    in one go).

    Attributes:
        stride: the distance between the sequence's splits.
        start: its first split (it identifies the cursor).
        next: the next split to read.
        position: the progress inside ``next``.

    """

    stride: int
    start: int
    next: int
    position: int = 0

    def advanced(self) -> SplitCursor:
        """Return the cursor at the start of its following split."""
        return SplitCursor(self.stride, self.start, self.next + self.stride)

    def at(self, position: int) -> SplitCursor:
        """Return the cursor at ``position`` inside its current split."""
        return SplitCursor(self.stride, self.start, self.next, position)

    def split(self, parts: int) -> list[SplitCursor]:
        """Return ``parts`` cursors that together cover this one's remaining splits, each once.

        The first keeps the progress inside ``next``.
        """
        if parts == 1:
            return [self]
        stride = self.stride * parts
        return [SplitCursor(stride, self.next + i * self.stride, self.next + i * self.stride,
                            self.position if i == 0 else 0) for i in range(parts)]


def cursors_offset(cursors: Sequence[SplitCursor]) -> dict[str, list[list[int]]]:
    """Return a reader's offset for ``cursors``: ``{"cursors": [[stride, start, next, position], ...]}``."""
    return {"cursors": [[c.stride, c.start, c.next, c.position] for c in cursors]}


def deal_cursors(cursors: Sequence[SplitCursor], subtask: int, parallelism: int) -> list[SplitCursor]:
    """Return ``subtask``'s share when the readers at ``parallelism`` take over ``cursors``.

    Every reader computes the same deal from the same cursors. When the
    cursors do not divide evenly, each is split into as many parts as it
    takes for them to (so every reader gets the same number of cursors), then
    they are dealt round-robin in the order of their first split. The cursors
    of readers at parallelism *p* dealt again at *p* give each reader its own
    cursors back, and their number stays within the least common multiple of
    the parallelisms used.

    Args:
        cursors: every cursor of every old reader.
        subtask: the new reader's index.
        parallelism: how many new readers there are.

    Returns:
        The new reader's cursors.

    """
    parallelism = max(parallelism, 1)
    if not cursors:
        return []
    parts = parallelism // math.gcd(len(cursors), parallelism)
    every = sorted((part for c in cursors for part in c.split(parts)), key=lambda c: (c.start, c.stride))
    return every[subtask::parallelism]


def resume_cursors(ctx: SourceContext, resume_offset: Any, *, source: str,
                   fields: tuple[tuple[str, str], ...]) -> list[SplitCursor]:
    """Return the cursors a reader resumes from: its own, or its share of :class:`RescaledOffsets`.

    A fresh reader (``resume_offset`` ``None``) starts at split ``ctx.subtask``
    with stride ``ctx.parallelism``. Offsets of the form
    ``{"cursors": [...]}`` (:func:`cursors_offset`) and of the earlier form
    ``fields`` (the split index first, then the position inside it, for one
    reader of round-robin splits: :func:`parse_split_offset`) are both read.

    Args:
        ctx: where the reader runs.
        resume_offset: ``None``, this subtask's offset, or :class:`RescaledOffsets`.
        source: the source class, for messages (``"ParquetSource"``).
        fields: the earlier form's ``(key, placeholder)`` pairs, the split index first.

    Returns:
        The reader's cursors.

    Raises:
        PlanError: an offset is malformed, or (earlier form) belongs to another subtask.

    """
    if resume_offset is None:
        return [SplitCursor(max(ctx.parallelism, 1), ctx.subtask, ctx.subtask)]
    if isinstance(resume_offset, RescaledOffsets):
        count = len(resume_offset.offsets)
        every = [cursor for index, offset in enumerate(resume_offset.offsets)
                 for cursor in _parse_cursors(SourceContext(ctx.operator, index, count), offset, source, fields)]
        return deal_cursors(every, ctx.subtask, ctx.parallelism)
    return _parse_cursors(ctx, resume_offset, source, fields)


def _parse_cursors(ctx: SourceContext, offset: Any, source: str,
                   fields: tuple[tuple[str, str], ...]) -> list[SplitCursor]:
    if not (isinstance(offset, dict) and "cursors" in offset):
        split, *inside = parse_split_offset(ctx, offset, source=source, fields=fields)
        return [SplitCursor(max(ctx.parallelism, 1), ctx.subtask, split, inside[0] if inside else 0)]
    raw = offset["cursors"]
    cursors = []
    for item in raw if isinstance(raw, list | tuple) else [None]:
        values = list(item) if isinstance(item, list | tuple) else []
        if not (len(values) == 4 and all(isinstance(v, int) and v >= 0 for v in values)
                and values[0] >= 1 and values[2] >= values[1] and (values[2] - values[1]) % values[0] == 0):
            msg = (
                f"{source} {ctx.operator}: resume offset {offset!r} is not {{'cursors': [[stride, start, next, "
                f"position], ...]}} with next = start + a multiple of stride; resume from an offset() of a "
                f"{source} reader"
            )
            raise PlanError(msg)
        cursors.append(SplitCursor(*values))
    return cursors
