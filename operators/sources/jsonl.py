r"""A replayable source reading JSON Lines files, split by file.

The input is one file or a directory searched recursively for ``*.jsonl`` and
``*.json`` files holding one JSON object per line (sorted by path; names or
directories starting with ``_`` or ``.`` are skipped). With parallelism *p*,
subtask *i* reads files ``i, i + p, i + 2p, ...``, ``batch_size`` lines at a
time, parsed by :mod:`pyarrow.json`. A reader's offset is
``{"file": f, "byte": b}``: the file it is in and the byte offset of its next
unread line, so a resumed reader seeks straight there.

Every chunk is parsed with one explicit schema, so column types stay stable:
the ``schema`` given, or the one inferred from the first chunk of the first
non-empty file (the same for every subtask and every restart). With an
inferred schema a line with another field or type is an error (pass
``schema=`` then); with a given schema, fields it does not name are ignored
and missing ones are null.

Example:
    >>> import tempfile, os
    >>> from operators.sources.base import SourceContext
    >>> folder = tempfile.mkdtemp()
    >>> with open(os.path.join(folder, "a.jsonl"), "w") as f:
    ...     _ = f.write('{"id": 0}\n{"id": 1}\n{"id": 2}\n')
    >>> reader = JsonLinesSource(folder, batch_size=2).build(SourceContext("source_0"))
    >>> reader.read().to_pydict(), reader.offset()
    ({'id': [0, 1]}, {'file': 0, 'byte': 20})
    >>> reader.read().to_pydict(), reader.offset()
    ({'id': [2]}, {'file': 1, 'byte': 0})

"""

from __future__ import annotations

import io
import os
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.json as pajson

from checkpoint.errors import DataError, PlanError
from operators.sources.base import Source, SourceContext, SourceReader, parse_split_offset
from operators.sources.parquet import absolute_path, list_data_files, resolve_filesystem

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
        >>> from operators.sources.base import SourceContext
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
            resume_offset: an ``offset()`` of an earlier reader of the same
                subtask at the same parallelism, or ``None`` to start.

        Returns:
            The reader.

        Raises:
            DataError: the first chunk (read to infer the schema) has a malformed line.
            PlanError: the path does not exist, or ``resume_offset`` is malformed.

        """
        fs, path = resolve_filesystem(self.path)
        files = list_data_files(fs, path, (".jsonl", ".json"), operator=ctx.operator, kind="jsonl")
        file, byte = (ctx.subtask, 0) if resume_offset is None else parse_split_offset(
            ctx, resume_offset, source="JsonLinesSource", fields=(("file", "f"), ("byte", "b")))
        if self.schema is not None:
            options = pajson.ParseOptions(explicit_schema=self.schema, unexpected_field_behavior="ignore")
        else:
            schema = _infer_schema(fs, files, self.batch_size, ctx.operator)
            options = pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="error")
        return JsonLinesSourceReader(fs, files, ctx, self.batch_size, options, file, byte)


class JsonLinesSourceReader(SourceReader):
    """Reads one subtask's files of a :class:`JsonLinesSource`.

    Args:
        fs: the filesystem the files are in.
        files: every file of the source, in order.
        ctx: where the reader runs.
        batch_size: lines per batch.
        options: how to parse a chunk (its explicit schema included).
        file: the index of the file to start in.
        byte: the byte offset of the next unread line in that file.

    """

    def __init__(
        self,
        fs: pafs.FileSystem,
        files: list[str],
        ctx: SourceContext,
        batch_size: int,
        options: pajson.ParseOptions,
        file: int,
        byte: int,
    ) -> None:
        self._fs = fs
        self._files = files
        self._ctx = ctx
        self._step = max(ctx.parallelism, 1)
        self._batch_size = batch_size
        self._options = options
        self._file = file
        self._byte = byte
        self._stream: io.BufferedReader | None = None
        self._size = 0

    def read(self) -> pa.RecordBatch | None:
        """Return the next batch of this subtask's files, ``None`` at the end.

        Raises:
            DataError: a line is not a JSON object matching the schema.

        """
        while self._file < len(self._files):
            if self._stream is None:
                self._open()
            assert self._stream is not None
            path = self._files[self._file]
            lines = _read_lines(self._stream, self._batch_size)
            if not lines:
                self._next_file()
                continue
            try:
                table = _parse(lines, self._options, self._fs, path, self._byte, self._ctx.operator)
            except DataError:
                self.close()  # a retry reads the same lines again
                raise
            self._byte += sum(len(line) for line in lines)
            if self._byte >= self._size:
                self._next_file()
            if table.num_rows:
                return _to_batch(table)
        return None

    def offset(self) -> dict[str, int]:
        """Return ``{"file": f, "byte": b}``: the current file and the byte offset of its next line."""
        return {"file": self._file, "byte": self._byte}

    def close(self) -> None:
        """Close the open file."""
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def _open(self) -> None:
        path = self._files[self._file]
        self._stream = io.BufferedReader(self._fs.open_input_file(path), buffer_size=_READ_BUFFER)
        self._size = self._fs.get_file_info(path).size or 0
        if self._byte:
            self._stream.seek(self._byte)

    def _next_file(self) -> None:
        self.close()
        self._file += self._step
        self._byte = 0


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


