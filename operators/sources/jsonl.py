r"""A replayable source reading JSON Lines files, split by file.

The input is one file or a directory searched recursively for ``*.jsonl`` and
``*.json`` files holding one JSON object per line (sorted by path; names or
directories starting with ``_`` or ``.`` are skipped). With parallelism *p*,
subtask *i* reads files ``i, i + p, i + 2p, ...``, ``batch_size`` lines at a
time, parsed by :mod:`pyarrow.json`. A reader's offset lists its
:class:`~onceflow.operators.sources.base.SplitCursor` objects over file indices,
``{"cursors": [[stride, start, file, byte], ...]}``: each sequence's current
file and the byte offset of its next unread line, so a resumed reader seeks
straight there, and readers at another parallelism take the files over
exactly (see :mod:`onceflow.operators.sources.base`). The earlier
``{"file": f, "byte": b}`` offsets are still read.

Every chunk is parsed with one explicit schema, so column types stay stable:
the ``schema`` given, or the one inferred from the first chunk of the first
non-empty file (the same for every subtask and every restart). With an
inferred schema a line with another field or type is an error (pass
``schema=`` then); with a given schema, fields it does not name are ignored
and missing ones are null.

Example:
    >>> import tempfile, os
    >>> from onceflow.operators.sources.base import SourceContext
    >>> folder = tempfile.mkdtemp()
    >>> with open(os.path.join(folder, "a.jsonl"), "w") as f:
    ...     _ = f.write('{"id": 0}\n{"id": 1}\n{"id": 2}\n')
    >>> reader = JsonLinesSource(folder, batch_size=2).build(SourceContext("source_0"))
    >>> reader.read().to_pydict(), reader.offset()
    ({'id': [0, 1]}, {'cursors': [[1, 0, 0, 20]]})
    >>> reader.read().to_pydict(), reader.offset()
    ({'id': [2]}, {'cursors': [[1, 0, 1, 0]]})

"""

from __future__ import annotations

import io
import os
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.json as pajson

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

__all__ = ["JsonLinesSource", "JsonLinesSourceReader"]

_READ_BUFFER = 1 << 20
_MIN_BLOCK = 1 << 20


class JsonLinesSource(Source):
    r"""Reads JSON Lines files, split across subtasks by file.

    Args:
        path: a JSON Lines file, or a directory searched recursively for
            ``*.jsonl`` / ``*.json`` (a plain path or a ``pyarrow.fs`` URI).
        batch_size: lines per batch (blank lines count, but give no row).
        schema: the columns and types to parse, or ``None`` to infer them
            from the first chunk.

    Raises:
        PlanError: ``batch_size`` is not positive.

    Example:
        >>> import tempfile, os
        >>> import pyarrow as pa
        >>> from onceflow.operators.sources.base import SourceContext
        >>> folder = tempfile.mkdtemp()
        >>> with open(os.path.join(folder, "a.jsonl"), "w") as f:
        ...     _ = f.write('{"id": 1, "name": "x"}\n')
        >>> source = JsonLinesSource(folder, schema=pa.schema([("id", pa.int32())]))
        >>> batch = source.build(SourceContext("source_0")).read()
        >>> batch.schema.field("id").type, batch.to_pydict()
        (DataType(int32), {'id': [1]})

    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        batch_size: int = 65_536,
        schema: pa.Schema | None = None,
    ) -> None:
        if batch_size <= 0:
            msg = f"jsonl source: batch_size must be > 0, got {batch_size}; pass a positive line count"
            raise PlanError(msg)
        self.path = absolute_path(path)
        self.batch_size = batch_size
        self.schema = schema

    def build(self, ctx: SourceContext, resume_offset: Any | None = None) -> JsonLinesSourceReader:
        """List the input and return the reader of ``ctx.subtask``'s files.

        Args:
            ctx: where the reader runs.
            resume_offset: ``None`` to start, an ``offset()`` of an earlier
                reader of the same subtask at the same parallelism, or
                :class:`~onceflow.operators.sources.base.RescaledOffsets` holding every
                earlier reader's offset (another parallelism).

        Returns:
            The reader.

        Raises:
            DataError: the first chunk (read to infer the schema) has a malformed line.
            PlanError: the path does not exist, or ``resume_offset`` is malformed.

        """
        fs, path = resolve_filesystem(self.path)
        files = list_data_files(fs, path, (".jsonl", ".json"), operator=ctx.operator, kind="jsonl")
        cursors = resume_cursors(ctx, resume_offset, source="JsonLinesSource", fields=(("file", "f"), ("byte", "b")))
        if self.schema is not None:
            options = pajson.ParseOptions(explicit_schema=self.schema, unexpected_field_behavior="ignore")
        else:
            schema = _infer_schema(fs, files, self.batch_size, ctx.operator)
            options = pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="error")
        return JsonLinesSourceReader(fs, files, ctx, self.batch_size, options, cursors)


class JsonLinesSourceReader(SourceReader):
    """Reads one subtask's files of a :class:`JsonLinesSource`.

    Args:
        fs: the filesystem the files are in.
        files: every file of the source, in order.
        ctx: where the reader runs.
        batch_size: lines per batch.
        options: how to parse a chunk (its explicit schema included).
        cursors: the file sequences this reader reads (their current file and
            the byte offset of its next unread line); it reads the lowest
            pending file first.

    """

    def __init__(
        self,
        fs: pafs.FileSystem,
        files: list[str],
        ctx: SourceContext,
        batch_size: int,
        options: pajson.ParseOptions,
        cursors: list[SplitCursor],
    ) -> None:
        self._fs = fs
        self._files = files
        self._ctx = ctx
        self._batch_size = batch_size
        self._options = options
        self._cursors = list(cursors)
        self._stream: io.BufferedReader | None = None
        self._stream_file: int | None = None
        self._size = 0

    def read(self) -> pa.RecordBatch | None:
        """Return the next batch of this subtask's files, ``None`` at the end.

        Raises:
            DataError: a line is not a JSON object matching the schema.

        """
        while (current := self._current()) is not None:
            cursor = self._cursors[current]
            if self._stream is None or self._stream_file != cursor.next:
                self._open(cursor)
            assert self._stream is not None
            path = self._files[cursor.next]
            lines = _read_lines(self._stream, self._batch_size)
            if not lines:
                self._next_file(current)
                continue
            try:
                table = _parse(lines, self._options, self._fs, path, cursor.position, self._ctx.operator)
            except DataError:
                self.close()  # a retry reads the same lines again
                raise
            cursor = cursor.at(cursor.position + sum(len(line) for line in lines))
            self._cursors[current] = cursor
            if cursor.position >= self._size:
                self._next_file(current)
            if table.num_rows:
                return _to_batch(table)
        return None

    def offset(self) -> dict[str, list[list[int]]]:
        """Return ``{"cursors": [[stride, start, file, byte], ...]}``: each sequence's file and next line's byte."""
        return cursors_offset(self._cursors)

    def close(self) -> None:
        """Close the open file."""
        if self._stream is not None:
            self._stream.close()
            self._stream = None
            self._stream_file = None

    def _current(self) -> int | None:
        """Return the index of the cursor with the lowest pending file, ``None`` when all are done."""
        pending = [i for i, c in enumerate(self._cursors) if c.next < len(self._files)]
        return min(pending, key=lambda i: self._cursors[i].next) if pending else None

    def _open(self, cursor: SplitCursor) -> None:
        self.close()
        path = self._files[cursor.next]
        self._stream = io.BufferedReader(self._fs.open_input_file(path), buffer_size=_READ_BUFFER)
        self._stream_file = cursor.next
        self._size = self._fs.get_file_info(path).size or 0
        if cursor.position:
            self._stream.seek(cursor.position)

    def _next_file(self, index: int) -> None:
        self.close()
        self._cursors[index] = self._cursors[index].advanced()


def _read_lines(stream: io.BufferedReader, count: int) -> list[bytes]:
    """Return up to ``count`` lines of ``stream``, each with its newline if it had one."""
    lines = []
    for _ in range(count):
        line = stream.readline()
        if not line:
            break
        lines.append(line)
    return lines


def _parse(
    lines: list[bytes],
    options: pajson.ParseOptions,
    fs: pafs.FileSystem,
    path: str,
    start: int,
    operator: str,
) -> pa.Table:
    """Parse ``lines`` (read from ``path`` at byte ``start``) into a table.

    Raises:
        DataError: naming the first line of the chunk that does not parse.

    """
    data = b"".join(lines)
    if not data.endswith(b"\n"):
        data += b"\n"
    block_size = max(_MIN_BLOCK, max(len(line) for line in lines) + 2)
    read_options = pajson.ReadOptions(block_size=block_size)
    try:
        return pajson.read_json(io.BytesIO(data), read_options=read_options, parse_options=options)
    except pa.ArrowInvalid as error:
        first_line = _count_lines(fs, path, start) + 1
        raise _malformed(lines, options, path, first_line, operator, error) from error


def _malformed(
    lines: list[bytes],
    options: pajson.ParseOptions,
    path: str,
    first_line: int,
    operator: str,
    error: pa.ArrowInvalid,
) -> DataError:
    """Return the error naming the first line that does not parse on its own."""
    hint = (
        "fix or remove the line"
        if options.explicit_schema is None or options.unexpected_field_behavior == "ignore"
        else "fix or remove the line, or pass schema= to JsonLinesSource if other fields or "
        "types are valid (the schema was inferred from the first chunk)"
    )
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            pajson.read_json(io.BytesIO(line.rstrip(b"\r\n") + b"\n"), parse_options=options)
        except pa.ArrowInvalid as line_error:
            msg = f"jsonl source {operator}: malformed line {first_line + index} in '{path}' ({line_error}); {hint}"
            return DataError(msg, operator=operator)
    last = first_line + len(lines) - 1
    msg = f"jsonl source {operator}: malformed lines {first_line}-{last} in '{path}' ({error}); {hint}"
    return DataError(msg, operator=operator)


def _count_lines(fs: pafs.FileSystem, path: str, end: int) -> int:
    """Return the number of newlines in the first ``end`` bytes of ``path``."""
    count = 0
    with fs.open_input_file(path) as handle:
        remaining = end
        while remaining > 0:
            block = handle.read(min(remaining, _READ_BUFFER))
            if not block:
                break
            count += block.count(b"\n")
            remaining -= len(block)
    return count


def _infer_schema(fs: pafs.FileSystem, files: list[str], batch_size: int, operator: str) -> pa.Schema | None:
    """Return the schema of the first chunk with rows, or ``None`` if no file has a row."""
    options = pajson.ParseOptions()
    for path in files:
        start = 0
        with io.BufferedReader(fs.open_input_file(path), buffer_size=_READ_BUFFER) as stream:
            while lines := _read_lines(stream, batch_size):
                table = _parse(lines, options, fs, path, start, operator)
                if table.num_rows:
                    return table.schema
                start += sum(len(line) for line in lines)
    return None


def _to_batch(table: pa.Table) -> pa.RecordBatch:
    """Return ``table`` (with rows) as one record batch."""
    batches = table.combine_chunks().to_batches()
    if len(batches) == 1:
        return batches[0]
    return pa.RecordBatch.from_struct_array(pa.concat_arrays([b.to_struct_array() for b in batches]))


