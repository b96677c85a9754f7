"""A replayable source that calls a deterministic user function for each batch.

``make_batch(offset, n)`` returns rows ``offset .. offset + n - 1`` of a
(possibly endless) stream as a :class:`pyarrow.RecordBatch`. Because it is
deterministic, the source can be replayed from any batch: its reader offset is
just the index of the next batch to produce.

Batch *k* covers offsets ``[k * batch_size, min((k + 1) * batch_size, total))``.
With parallelism *p*, subtask *i* produces batches ``i, i + p, i + 2p, ...``.
A reader's offset lists its :class:`~onceflow.operators.sources.base.SplitCursor`
objects over batch indices (``[stride, start, next, 0]``), so readers at
another parallelism take the batches over exactly (see
:mod:`onceflow.operators.sources.base`); the earlier ``{"next_batch": k}`` offsets are
still read.

Example:
    >>> import pyarrow as pa
    >>> from onceflow.operators.sources.base import SourceContext
    >>> def make_batch(offset: int, n: int) -> pa.RecordBatch:
    ...     return pa.record_batch({"id": list(range(offset, offset + n))})
    >>> source = GeneratorSource(make_batch, total=5, batch_size=2)
    >>> reader = source.build(SourceContext("source_0"))
    >>> reader.read().column("id").to_pylist()
    [0, 1]
    >>> reader.offset()
    {'cursors': [[1, 0, 1, 0]]}
    >>> resumed = source.build(SourceContext("source_0"), {"cursors": [[1, 0, 2, 0]]})
    >>> resumed.read().column("id").to_pylist(), resumed.read()
    ([4], None)

"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from onceflow.errors import DataError, PlanError
from onceflow.operators.sources.base import (
    Idle,
    Source,
    SourceContext,
    SourceReader,
    SplitCursor,
    cursors_offset,
    resume_cursors,
)

__all__ = ["GeneratorSource", "GeneratorSourceReader", "MakeBatch"]

MakeBatch = Callable[[int, int], "pa.RecordBatch | pa.Table"]
"""The user function: ``make_batch(offset, n)`` returns rows ``offset .. offset + n - 1``."""

MAX_IDLE_S = 1.0
"""The longest :class:`Idle` the rate limiter asks for, so the runtime stays responsive."""


class GeneratorSource(Source):
    """A source whose rows come from a deterministic ``make_batch(offset, n)``.

    Args:
        make_batch: a picklable, deterministic function returning exactly ``n``
            rows (a ``RecordBatch``, or a ``Table`` that is combined into one
            batch) with the same schema on every call. Seed any randomness
            from ``offset``.
        total: the number of rows, or ``None`` for an endless stream.
        batch_size: rows per batch (the unit of splitting and replay).
        max_events_per_s: a rate limit for the whole source (each of *p*
            subtasks takes ``1/p`` of it), or ``None`` for no limit.
        clock: a monotonic clock in seconds (tests pass a fake one).

    Raises:
        PlanError: an option is out of range.

    Example:
        >>> import numpy as np
        >>> import pyarrow as pa
        >>> from onceflow.operators.sources.base import SourceContext
        >>> def make_batch(offset: int, n: int) -> pa.RecordBatch:
        ...     rng = np.random.default_rng(offset)  # seeded from the offset
        ...     return pa.record_batch({"id": np.arange(offset, offset + n),
        ...                             "x": rng.integers(0, 10, n)})
        >>> source = GeneratorSource(make_batch, total=10, batch_size=4)
        >>> second = source.build(SourceContext("source_0", subtask=1, parallelism=2))
        >>> second.read().column("id").to_pylist(), second.read()
        ([4, 5, 6, 7], None)

    """

    def __init__(
        self,
        make_batch: MakeBatch,
        total: int | None = None,
        batch_size: int = 10_000,
        max_events_per_s: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not callable(make_batch):
            msg = (
                f"generator source: make_batch must be callable, got {type(make_batch).__name__}; "
                "pass a function make_batch(offset, n) -> pyarrow.RecordBatch"
            )
            raise PlanError(msg)
        if total is not None and total < 0:
            msg = f"generator source: total must be >= 0 or None, got {total}; pass the number of rows"
            raise PlanError(msg)
        if batch_size <= 0:
            msg = f"generator source: batch_size must be > 0, got {batch_size}; pass a positive row count"
            raise PlanError(msg)
        if max_events_per_s is not None and max_events_per_s <= 0:
            msg = (
                f"generator source: max_events_per_s must be > 0 or None, got {max_events_per_s}; "
                "pass None for no rate limit"
            )
            raise PlanError(msg)
        self.make_batch = make_batch
        self.total = total
        self.batch_size = batch_size
        self.max_events_per_s = max_events_per_s
        self.clock = clock

    def build(self, ctx: SourceContext, resume_offset: Any | None = None) -> GeneratorSourceReader:
        """Return the reader of ``ctx.subtask``'s batches, positioned at ``resume_offset``.

        Args:
            ctx: where the reader runs.
            resume_offset: ``None`` to start, an ``offset()`` of an earlier
                reader of the same subtask at the same parallelism, or
                :class:`~onceflow.operators.sources.base.RescaledOffsets` holding every
                earlier reader's offset (another parallelism).

        Returns:
            The reader.

        Raises:
            PlanError: ``resume_offset`` is malformed or belongs to another subtask.

        """
        cursors = resume_cursors(ctx, resume_offset, source="GeneratorSource", fields=(("next_batch", "k"),))
        return GeneratorSourceReader(self, ctx, cursors)


class GeneratorSourceReader(SourceReader):
    """Produces one subtask's batches of a :class:`GeneratorSource`.

    Args:
        source: the source config.
        ctx: where the reader runs.
        cursors: the batch sequences this reader produces; it produces the
            lowest pending batch of them first.

    """

    def __init__(self, source: GeneratorSource, ctx: SourceContext, cursors: list[SplitCursor]) -> None:
        self._source = source
        self._ctx = ctx
        self._cursors = list(cursors)
        self._check_determinism = any(c.next == 0 for c in cursors)
        self._schema: pa.Schema | None = None
        rate = source.max_events_per_s
        self._rate = None if rate is None else rate / max(ctx.parallelism, 1)
        self._started_at: float | None = None
        self._emitted = 0

    def read(self) -> pa.RecordBatch | Idle | None:
        """Return the next batch, ``Idle`` while rate-limited, ``None`` at the end.

        Raises:
            DataError: ``make_batch`` returned something other than ``n`` rows
                with the first batch's schema, or is not deterministic.

        """
        source = self._source
        pending = [i for i, c in enumerate(self._cursors)
                   if source.total is None or c.next * source.batch_size < source.total]
        if not pending:
            return None
        current = min(pending, key=lambda i: self._cursors[i].next)
        start = self._cursors[current].next * source.batch_size
        n = source.batch_size if source.total is None else min(source.batch_size, source.total - start)
        if self._rate is not None:
            now = source.clock()
            if self._started_at is None:
                self._started_at = now
            due = self._started_at + self._emitted / self._rate
            if now < due:
                return Idle(min(due - now, MAX_IDLE_S))
        batch = self._make(start, n)
        if self._check_determinism:
            self._check_determinism = False
            if not _same_rows(batch, self._make(start, n)):
                msg = (
                    f"generator source {self._ctx.operator}: make_batch({start}, {n}) returned "
                    "different rows when called twice, so the generator is not deterministic and "
                    "cannot be replayed; seed any randomness from the offset "
                    "(numpy.random.default_rng(offset)) and do not read clocks or global state"
                )
                raise DataError(msg, operator=self._ctx.operator)
        self._cursors[current] = self._cursors[current].advanced()
        self._emitted += n
        return batch

    def offset(self) -> dict[str, list[list[int]]]:
        """Return ``{"cursors": [[stride, start, next, 0], ...]}``: the batch sequences and their next batches."""
        return cursors_offset(self._cursors)

    def _make(self, start: int, n: int) -> pa.RecordBatch:
        """Call ``make_batch`` and check what it returned."""
        operator = self._ctx.operator
        out = self._source.make_batch(start, n)
        if isinstance(out, pa.Table):
            out = _table_to_batch(out)
        if not isinstance(out, pa.RecordBatch):
            msg = (
                f"generator source {operator}: make_batch({start}, {n}) returned "
                f"{type(out).__name__}, not a pyarrow.RecordBatch; return pyarrow.RecordBatch "
                "(or pyarrow.Table) holding the rows offset .. offset + n - 1"
            )
            raise DataError(msg, operator=operator)
        if out.num_rows != n:
            msg = (
                f"generator source {operator}: make_batch({start}, {n}) returned {out.num_rows} rows, "
                f"expected {n}; return exactly n rows, the rows offset .. offset + n - 1"
            )
            raise DataError(msg, operator=operator)
        if self._schema is None:
            self._schema = out.schema
        elif not out.schema.equals(self._schema, check_metadata=False):
            column, detail = _schema_difference(self._schema, out.schema)
            msg = (
                f"generator source {operator}: make_batch({start}, {n}) returned column "
                f"'{column}' {detail}; return the same schema from every call (cast the column)"
            )
            raise DataError(msg, operator=operator, column=column)
        return out


def _table_to_batch(table: pa.Table) -> pa.RecordBatch:
    """Combine ``table`` into one record batch."""
    batches = table.combine_chunks().to_batches()
    if len(batches) == 1:
        return batches[0]
    if not batches:
        return pa.RecordBatch.from_pylist([], schema=table.schema)
    return pa.RecordBatch.from_struct_array(pa.concat_arrays([b.to_struct_array() for b in batches]))


def _schema_difference(expected: pa.Schema, actual: pa.Schema) -> tuple[str, str]:
    """Return the first differing column of two schemas and how it differs."""
    for field in actual:
        index = expected.get_field_index(field.name)
        if index < 0:
            return field.name, "that the first batch did not have"
        want = expected.field(index)
        if not field.type.equals(want.type):
            return field.name, f"as {field.type}, but the first batch had {want.type}"
        if field.nullable != want.nullable:
            return field.name, f"with nullable={field.nullable}, but the first batch had {want.nullable}"
    for field in expected:
        if actual.get_field_index(field.name) < 0:
            return field.name, "missing, but the first batch had it"
    first = expected.names[0] if expected.names else ""
    return first, f"in column order {actual.names}, but the first batch had {expected.names}"


def _same_rows(a: pa.RecordBatch, b: pa.RecordBatch) -> bool:
    """Return whether two batches hold the same rows, NaN equal to NaN."""
    if a.equals(b):
        return True
    if not a.schema.equals(b.schema, check_metadata=False) or a.num_rows != b.num_rows:
        return False
    for left, right in zip(a.columns, b.columns, strict=True):
        if left.equals(right):
            continue
        if not pa.types.is_floating(left.type):
            return False
        nan_left, nan_right = pc.is_nan(left), pc.is_nan(right)
        if not nan_left.equals(nan_right):
            return False
        zero = pa.scalar(0, left.type)
        if not pc.if_else(nan_left, zero, left).equals(pc.if_else(nan_right, zero, right)):
            return False
    return True
