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

A line that does not decode (invalid JSON, not an object, a field that does
not convert to the schema's type) fails the job with a
:class:`~onceflow.errors.DataError` naming its file and line, or with
``dead_letter=True`` leaves its batch for the source's dead-letter side
output (port :data:`~onceflow.operators.logic.DEAD_LETTERS`, columns
:data:`JSON_LINES_DEAD_LETTER_SCHEMA`; the reader is
:class:`~onceflow.operators.sources.base.SideOutputs`). A batch is decoded by
one Arrow parse; only when that fails is it bisected to find the lines that
do not decode (:mod:`onceflow.operators.json_decoder`). The byte offsets
cover both outputs, so a resumed reader emits each row and each dead letter
once.

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
import json
import os
from itertools import accumulate
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.json as pajson

from onceflow.errors import DataError, PlanError
from onceflow.operators.fs import absolute_path, list_data_files, resolve_filesystem
from onceflow.operators.json_decoder import JsonObjectDecoder, has_null_line
from onceflow.operators.logic import DEAD_LETTERS, Emitted
from onceflow.operators.sources.base import (
    SideOutputs,
    Source,
    SourceContext,
    SourceReader,
    SplitCursor,
    cursors_offset,
    resume_cursors,
)

__all__ = ["JSON_LINES_DEAD_LETTER_SCHEMA", "JsonLinesSource", "JsonLinesSourceReader"]

JSON_LINES_DEAD_LETTER_SCHEMA = pa.schema([
    ("file", pa.string()), ("line", pa.int64()), ("offset", pa.int64()), ("value", pa.binary()),
    ("error", pa.string()),
])
"""The columns of a :class:`JsonLinesSource`'s dead letters: the file, the line's number (from 1) and byte
offset, the line without its newline, and ``error``, why it did not decode."""

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
        dead_letter: what a line that does not decode (invalid JSON, not an
            object, a field that does not convert to the schema's type, with
            an inferred schema also a field it does not name) does:
            ``False`` (default) fails the job with a
            :class:`~onceflow.errors.DataError` naming its file and line;
            ``True`` takes it out of its batch (the other lines go on, in
            order) and emits it on the source's dead-letter side output,
            which ``flow.source(...).dead_letters()`` returns: columns
            :data:`JSON_LINES_DEAD_LETTER_SCHEMA`. The same offsets cover
            both outputs, so each dead letter is emitted exactly once across
            restarts too. A schema is then inferred from the first chunk's
            lines that are JSON objects.

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
        >>> with open(os.path.join(folder, "a.jsonl"), "a") as f:
        ...     _ = f.write('{"id": "two"}\n{"id": 3}\n')
        >>> reader = JsonLinesSource(folder, schema=source.schema, dead_letter=True).build(SourceContext("source_0"))
        >>> reader.read().to_pydict()
        {'id': [1, 3]}
        >>> [(_, letters)] = reader.take_side_outputs()
        >>> letters.column("line").to_pylist(), letters.column("value").to_pylist()
        ([2], [b'{"id": "two"}'])

    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        batch_size: int = 65_536,
        schema: pa.Schema | None = None,
        dead_letter: bool = False,
    ) -> None:
        if batch_size <= 0:
            msg = f"jsonl source: batch_size must be > 0, got {batch_size}; pass a positive line count"
            raise PlanError(msg)
        self.path = absolute_path(path)
        self.batch_size = batch_size
        self.schema = schema
        self.dead_letter = bool(dead_letter)

    def side_ports(self) -> frozenset[int]:
        """Return ``{DEAD_LETTERS}`` with ``dead_letter=True``, else no port."""
        return frozenset({DEAD_LETTERS}) if self.dead_letter else frozenset()

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
            schema = _infer_schema(fs, files, self.batch_size, ctx.operator, objects_only=self.dead_letter)
            options = pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="error")
        decoder = None
        if self.dead_letter:
            decoder = JsonObjectDecoder(options.explicit_schema or pa.schema([]), options.unexpected_field_behavior)
        return JsonLinesSourceReader(fs, files, ctx, self.batch_size, options, cursors, decoder)


class JsonLinesSourceReader(SourceReader, SideOutputs):
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
        decoder: with dead letters, what decodes a chunk's lines (those that
            do not decode are set aside); ``None`` makes a malformed line a
            :class:`~onceflow.errors.DataError`.

    """

    def __init__(
        self,
        fs: pafs.FileSystem,
        files: list[str],
        ctx: SourceContext,
        batch_size: int,
        options: pajson.ParseOptions,
        cursors: list[SplitCursor],
        decoder: JsonObjectDecoder | None = None,
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
        self._lines_before: int | None = None
        """The number of lines before the open file's cursor position, ``None`` until counted."""
        self._decoder = decoder
        self._set_aside: Emitted = []

    def read(self) -> pa.RecordBatch | None:
        """Return the next batch of this subtask's files, ``None`` at the end.

        Raises:
            DataError: without dead letters, a line is not a JSON object matching the schema.

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
            if self._decoder is None:
                try:
                    table = _parse(lines, self._options, self._fs, path, cursor.position, self._ctx.operator)
                except DataError:
                    self.close()  # a retry reads the same lines again
                    raise
                batch = _to_batch(table) if table.num_rows else None
            else:
                batch = self._decode(self._decoder, lines, path, cursor.position)
            if self._lines_before is not None:
                self._lines_before += len(lines)
            cursor = cursor.at(cursor.position + sum(len(line) for line in lines))
            self._cursors[current] = cursor
            if cursor.position >= self._size:
                self._next_file(current)
            if batch is not None:
                return batch
        return None

    def take_side_outputs(self) -> Emitted:
        """Return the dead letters set aside since the last call, on port ``DEAD_LETTERS``, and forget them."""
        taken, self._set_aside = self._set_aside, []
        return taken

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
        self._lines_before = 0 if cursor.position == 0 else None
        if cursor.position:
            self._stream.seek(cursor.position)

    def _decode(self, decoder: JsonObjectDecoder, lines: list[bytes], path: str,
                start: int) -> pa.RecordBatch | None:
        """Decode a chunk read at byte ``start`` of ``path``, setting its bad lines aside as dead letters.

        Returns:
            The rows of the lines that decode (perhaps none, when lines were set
            aside), ``None`` when the chunk has neither rows nor dead letters.
        """
        values = [_without_newline(line) for line in lines]
        kept = [i for i, value in enumerate(values) if value.strip(b" \t\r")]
        decoded = decoder.decode([values[i] for i in kept])
        if decoded.rejected:
            offsets = list(accumulate((len(line) for line in lines), initial=start))
            first_line = self._first_line(path, start)
            at = [kept[r.index] for r in decoded.rejected]
            self._set_aside.append((DEAD_LETTERS, pa.RecordBatch.from_arrays([
                pa.array([path] * len(at), pa.string()),
                pa.array([first_line + i for i in at], pa.int64()),
                pa.array([offsets[i] for i in at], pa.int64()),
                pa.array([values[i] for i in at], pa.binary()),
                pa.array([r.reason for r in decoded.rejected], pa.string()),
            ], schema=JSON_LINES_DEAD_LETTER_SCHEMA)))
        elif not decoded.batch.num_rows:
            return None
        return decoded.batch

    def _first_line(self, path: str, start: int) -> int:
        """Return the number (from 1) of the line at byte ``start`` of the open file ``path``."""
        if self._lines_before is None:
            self._lines_before = _count_lines(self._fs, path, start)
        return self._lines_before + 1

    def _next_file(self, index: int) -> None:
        self.close()
        self._cursors[index] = self._cursors[index].advanced()


def _without_newline(line: bytes) -> bytes:
    """Return ``line`` without its newline (LF or CRLF)."""
    if line.endswith(b"\r\n"):
        return line[:-2]
    return line[:-1] if line.endswith(b"\n") else line


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
        if has_null_line(data):
            msg = "a JSON null, not an object"
            raise pa.ArrowInvalid(msg)  # before Arrow sees it (see onceflow.operators.json_decoder)
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
            if has_null_line(line):
                msg = "a JSON null, not an object"
                raise pa.ArrowInvalid(msg)
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


def _infer_schema(fs: pafs.FileSystem, files: list[str], batch_size: int, operator: str, *,
                  objects_only: bool = False) -> pa.Schema | None:
    """Return the schema of the first chunk with rows, or ``None`` if no file has a row.

    With ``objects_only`` a chunk's lines that are not JSON objects are left
    out when the whole chunk does not parse (they are dead letters then).
    """
    options = pajson.ParseOptions()
    for path in files:
        start = 0
        with io.BufferedReader(fs.open_input_file(path), buffer_size=_READ_BUFFER) as stream:
            while lines := _read_lines(stream, batch_size):
                try:
                    table = _parse(lines, options, fs, path, start, operator)
                except DataError:
                    if not objects_only:
                        raise
                    table = _infer_from_objects(lines, options, path, operator)
                if table.num_rows:
                    return table.schema
                start += sum(len(line) for line in lines)
    return None


def _infer_from_objects(lines: list[bytes], options: pajson.ParseOptions, path: str, operator: str) -> pa.Table:
    """Return the table of the lines that are JSON objects (no rows when none is).

    Raises:
        DataError: those objects do not share one schema.
    """
    objects = b"".join(line.rstrip(b"\r\n") + b"\n" for line in lines if _is_object(line))
    if not objects:
        return pa.table({})
    try:
        return pajson.read_json(io.BytesIO(objects), parse_options=options,
                                read_options=pajson.ReadOptions(block_size=max(_MIN_BLOCK, len(objects))))
    except pa.ArrowInvalid as error:
        msg = (f"jsonl source {operator}: the JSON objects of the first chunk of '{path}' do not share one "
               f"schema to infer ({error}); pass schema= to JsonLinesSource")
        raise DataError(msg, operator=operator) from error


def _is_object(line: bytes) -> bool:
    """Whether ``line`` is one JSON object."""
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _to_batch(table: pa.Table) -> pa.RecordBatch:
    """Return ``table`` (with rows) as one record batch."""
    batches = table.combine_chunks().to_batches()
    if len(batches) == 1:
        return batches[0]
    return pa.RecordBatch.from_struct_array(pa.concat_arrays([b.to_struct_array() for b in batches]))


