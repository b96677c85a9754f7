"""A replayable source reading Parquet files, split by row group.

The input is one file or a directory searched recursively for ``*.parquet``
files (sorted by path; names or directories starting with ``_`` or ``.`` are
skipped, as :func:`pyarrow.dataset.dataset` does). Its *work units* are the
``(file, row group)`` pairs in that order; with parallelism *p*, subtask *i*
reads units ``i, i + p, i + 2p, ...``. A reader's offset lists its
:class:`~onceflow.operators.sources.base.SplitCursor` objects over unit indices,
``{"cursors": [[stride, start, unit, row], ...]}``: each sequence's current
unit and the rows of it already returned, so a resumed reader continues in the
middle of a row group, and readers at another parallelism take the units over
exactly (see :mod:`onceflow.operators.sources.base`). The earlier
``{"unit": u, "row": r}`` offsets are still read.

The input must not change between taking an offset and resuming from it.

Example:
    >>> import tempfile, os
    >>> import pyarrow as pa, pyarrow.parquet as pq
    >>> from onceflow.operators.sources.base import SourceContext
    >>> folder = tempfile.mkdtemp()
    >>> pq.write_table(pa.table({"id": [0, 1, 2]}), os.path.join(folder, "a.parquet"))
    >>> reader = ParquetSource(folder, batch_size=2).build(SourceContext("source_0"))
    >>> reader.read().column("id").to_pylist(), reader.offset()
    ([0, 1], {'cursors': [[1, 0, 0, 2]]})
    >>> reader.read().column("id").to_pylist(), reader.offset()
    ([2], {'cursors': [[1, 0, 1, 0]]})
    >>> reader.read() is None
    True

"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from onceflow.errors import DataError, PlanError
from onceflow.operators.fs import absolute_path, list_data_files, resolve_filesystem
from onceflow.operators.sources.base import (
    Source,
    SourceContext,
    SourceReader,
    SplitCursor,
    cursors_offset,
    resume_cursors,
)

__all__ = ["ParquetSource", "ParquetSourceReader"]


class ParquetSource(Source):
    """Reads Parquet files, split across subtasks by ``(file, row group)``.

    Args:
        path: a Parquet file, or a directory searched recursively (a plain path
            or a ``pyarrow.fs`` URI).
        batch_size: the most rows per batch.
        columns: the columns to read, or ``None`` for all.

    Raises:
        PlanError: ``batch_size`` is not positive.

    Example:
        >>> import tempfile, os
        >>> import pyarrow as pa, pyarrow.parquet as pq
        >>> from onceflow.operators.sources.base import SourceContext
        >>> folder = tempfile.mkdtemp()
        >>> table = pa.table({"id": list(range(6)), "x": ["a"] * 6})
        >>> pq.write_table(table, os.path.join(folder, "a.parquet"), row_group_size=3)
        >>> source = ParquetSource(folder, columns=["id"])
        >>> second = source.build(SourceContext("source_0", subtask=1, parallelism=2))
        >>> second.read().to_pydict()
        {'id': [3, 4, 5]}

    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        batch_size: int = 65_536,
        columns: Sequence[str] | None = None,
    ) -> None:
        if batch_size <= 0:
            msg = f"parquet source: batch_size must be > 0, got {batch_size}; pass a positive row count"
            raise PlanError(msg)
        self.path = absolute_path(path)
        self.batch_size = batch_size
        self.columns = None if columns is None else list(columns)

    def build(self, ctx: SourceContext, resume_offset: Any | None = None) -> ParquetSourceReader:
        """List the input and return the reader of ``ctx.subtask``'s units.

        Args:
            ctx: where the reader runs.
            resume_offset: ``None`` to start, an ``offset()`` of an earlier
                reader of the same subtask at the same parallelism, or
                :class:`~onceflow.operators.sources.base.RescaledOffsets` holding every
                earlier reader's offset (another parallelism).

        Returns:
            The reader.

        Raises:
            DataError: a file is not Parquet, lacks a requested column or has a
                schema different from the first file's.
            PlanError: the path does not exist, or ``resume_offset`` is malformed.

        """
        fs, path = resolve_filesystem(self.path)
        files = list_data_files(fs, path, (".parquet",), operator=ctx.operator, kind="parquet")
        units: list[_Unit] = []
        first: tuple[str, pa.Schema] | None = None
        for file in files:
            metadata = _read_metadata(fs, file, ctx.operator)
            schema = _project(metadata.schema.to_arrow_schema(), self.columns, file, ctx.operator)
            if first is None:
                first = (file, schema)
            elif not schema.equals(first[1], check_metadata=False):
                _raise_schema_mismatch(ctx.operator, file, schema, first[0], first[1])
            for group in range(metadata.num_row_groups):
                rows = metadata.row_group(group).num_rows
                if rows > 0:
                    units.append(_Unit(file, group, rows))
        cursors = resume_cursors(ctx, resume_offset, source="ParquetSource", fields=(("unit", "u"), ("row", "r")))
        return ParquetSourceReader(fs, units, ctx, self.batch_size, self.columns, cursors)


@dataclass(frozen=True, slots=True)
class _Unit:
    """One row group of one file."""

    file: str
    row_group: int
    num_rows: int


class ParquetSourceReader(SourceReader):
    """Reads one subtask's row groups of a :class:`ParquetSource`.

    Args:
        fs: the filesystem the files are in.
        units: every work unit of the source, in order.
        ctx: where the reader runs.
        batch_size: the most rows per batch.
        columns: the columns to read, or ``None`` for all.
        cursors: the unit sequences this reader reads (their current unit and
            its rows already returned); it reads the lowest pending unit first.

    """

    def __init__(
        self,
        fs: pafs.FileSystem,
        units: list[_Unit],
        ctx: SourceContext,
        batch_size: int,
        columns: list[str] | None,
        cursors: list[SplitCursor],
    ) -> None:
        self._fs = fs
        self._units = units
        self._ctx = ctx
        self._batch_size = batch_size
        self._columns = columns
        self._cursors = list(cursors)
        self._batches: Iterator[pa.RecordBatch] | None = None
        self._batches_unit: int | None = None
        self._handle: pa.NativeFile | None = None
        self._file: pq.ParquetFile | None = None
        self._file_path: str | None = None
        for index in range(len(self._cursors)):
            self._skip_finished_unit(index)

    def read(self) -> pa.RecordBatch | None:
        """Return the next batch of this subtask's row groups, ``None`` at the end."""
        while (current := self._current()) is not None:
            cursor = self._cursors[current]
            if self._batches is None or self._batches_unit != cursor.next:
                self._batches = self._open_unit(self._units[cursor.next], cursor.position)
                self._batches_unit = cursor.next
            batch = next(self._batches, None)
            if batch is None or batch.num_rows == 0:
                if batch is None:  # the row group had fewer rows than its metadata said
                    self._next_unit(current)
                continue
            self._cursors[current] = cursor.at(cursor.position + batch.num_rows)
            self._skip_finished_unit(current)
            return batch
        self.close()
        return None

    def offset(self) -> dict[str, list[list[int]]]:
        """Return ``{"cursors": [[stride, start, unit, row], ...]}``: each sequence's unit and rows returned."""
        return cursors_offset(self._cursors)

    def close(self) -> None:
        """Close the open file."""
        self._batches = None
        if self._file is not None:
            self._file.close()
        if self._handle is not None:
            self._handle.close()
        self._handle = None
        self._file = None
        self._file_path = None

    def _current(self) -> int | None:
        """Return the index of the cursor with the lowest pending unit, ``None`` when all are done."""
        pending = [i for i, c in enumerate(self._cursors) if c.next < len(self._units)]
        return min(pending, key=lambda i: self._cursors[i].next) if pending else None

    def _skip_finished_unit(self, index: int) -> None:
        """Move cursor ``index`` to its next unit once its current one is done."""
        cursor = self._cursors[index]
        if cursor.next < len(self._units) and cursor.position >= self._units[cursor.next].num_rows:
            self._next_unit(index)

    def _next_unit(self, index: int) -> None:
        self._cursors[index] = self._cursors[index].advanced()
        self._batches = None
        self._batches_unit = None

    def _open_unit(self, unit: _Unit, skip: int) -> Iterator[pa.RecordBatch]:
        """Return the batches of ``unit`` after its first ``skip`` rows (those already returned)."""
        if self._file_path != unit.file:
            self.close()
            try:
                self._handle = self._fs.open_input_file(unit.file)
                self._file = pq.ParquetFile(self._handle)
            except (OSError, pa.ArrowException) as error:
                raise _unreadable(self._ctx.operator, unit.file, error) from error
            self._file_path = unit.file
        assert self._file is not None
        batches = self._file.iter_batches(
            batch_size=self._batch_size, row_groups=[unit.row_group], columns=self._columns
        )
        return _skip_rows(batches, skip)


def _skip_rows(batches: Iterator[pa.RecordBatch], skip: int) -> Iterator[pa.RecordBatch]:
    """Yield ``batches`` without their first ``skip`` rows."""
    for batch in batches:
        if skip >= batch.num_rows:
            skip -= batch.num_rows
            continue
        yield batch.slice(skip) if skip else batch
        skip = 0


def _read_metadata(fs: pafs.FileSystem, file: str, operator: str) -> pq.FileMetaData:
    try:
        with fs.open_input_file(file) as handle:
            return pq.read_metadata(handle)
    except (OSError, pa.ArrowException) as error:
        raise _unreadable(operator, file, error) from error


def _unreadable(operator: str, file: str, error: Exception) -> DataError:
    msg = f"parquet source {operator}: cannot read '{file}' as parquet ({error}); remove or fix the file"
    return DataError(msg, operator=operator)


def _project(schema: pa.Schema, columns: list[str] | None, file: str, operator: str) -> pa.Schema:
    """Return ``schema`` narrowed to ``columns``, checking they exist in ``file``."""
    if columns is None:
        return schema
    for column in columns:
        if schema.get_field_index(column) < 0:
            msg = (
                f"parquet source {operator}: file '{file}' has no column '{column}' "
                f"(it has {schema.names}); pass columns that every file has"
            )
            raise DataError(msg, operator=operator, column=column)
    return pa.schema([schema.field(column) for column in columns])


def _raise_schema_mismatch(operator: str, file: str, schema: pa.Schema, first_file: str, first: pa.Schema) -> None:
    """Raise a :class:`DataError` that names ``file`` and the first differing column."""
    column, detail = "", f"columns {schema.names} instead of {first.names}"
    for field in first:
        index = schema.get_field_index(field.name)
        if index < 0:
            column, detail = field.name, "no column"
            break
        if not schema.field(index).type.equals(field.type):
            column, detail = field.name, f"column '{field.name}' as {schema.field(index).type}, not {field.type}"
            break
    else:
        for field in schema:
            if first.get_field_index(field.name) < 0:
                column, detail = field.name, f"an extra column '{field.name}'"
                break
    if detail == "no column":
        detail = f"no column '{column}'"
    msg = (
        f"parquet source {operator}: file '{file}' has {detail}, unlike the schema of "
        f"'{first_file}'; give every file the same schema or pass columns= to read common columns"
    )
    raise DataError(msg, operator=operator, column=column or None)


