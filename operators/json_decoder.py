"""Decoding JSON lines, one object each, into Arrow rows of a schema, and finding the lines that do not decode.

Used by the sources that send what does not decode to dead letters (Kafka
message values, JSON Lines files). A batch of lines is decoded by one Arrow
parse; only when that fails are the lines that do not decode sought: the
batch is bisected, each half parsed by Arrow again, down to the single lines
that fail; so ``k`` bad lines among ``n`` cost about ``2k log2(n / k)``
parses, and the rows of the others come out of those parses.

Two kinds of line are screened before Arrow sees them: a ``null`` line
(Arrow's JSON reader crashes the process on a buffer whose first row is
``null``, and reads a later one as a row of nulls) and a line that is not
UTF-8 (Arrow stores its bytes in a string column unchecked).

Example:
    >>> import pyarrow as pa
    >>> decoder = JsonObjectDecoder(pa.schema([("id", pa.int64())]))
    >>> decoded = decoder.decode([b'{"id": 1}', b'{"id": "x"}', b"null", b'{"id": 3}'])
    >>> decoded.batch.to_pydict(), decoded.decoded
    ({'id': [1, 3]}, [0, 3])
    >>> for rejected in decoded.rejected:
    ...     print(rejected.index, rejected.reason.split(" (")[0])
    1 field 'id' does not convert to int64
    2 a JSON null, not an object
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import pyarrow as pa
import pyarrow.json as pajson

__all__ = ["DecodedLines", "JsonObjectDecoder", "RejectedLine", "has_null_line"]

_NULL_LINE = re.compile(rb"^[ \t\r]*null[ \t\r]*$", re.MULTILINE)
_MIN_BLOCK = 1 << 20
_JSON_WHITESPACE = b" \t\r\n"


def has_null_line(data: bytes) -> bool:
    """Whether a line of ``data`` is a JSON ``null`` (which Arrow's JSON reader must not see; module docstring)."""
    return b"null" in data and _NULL_LINE.search(data) is not None


@dataclass(frozen=True, slots=True)
class RejectedLine:
    """A line that does not decode.

    Attributes:
        index: its index among the lines decoded.
        reason: why, naming the field when one does not convert.
    """

    index: int
    reason: str


@dataclass(frozen=True, slots=True)
class DecodedLines:
    """What a batch of lines decodes to.

    Attributes:
        batch: the rows of the lines that decode, in order, one each.
        decoded: the indices of those lines.
        rejected: the others, in order.
    """

    batch: pa.RecordBatch
    decoded: list[int]
    rejected: list[RejectedLine]


class JsonObjectDecoder:
    """Decodes lines, one JSON object each, into rows of ``schema`` (see the module docstring).

    Args:
        schema: the columns; a missing field is null.
        unexpected_fields: what a field the schema does not name does:
            ``"ignore"`` it, or make its line an ``"error"``.
    """

    def __init__(self, schema: pa.Schema, unexpected_fields: Literal["ignore", "error"] = "ignore") -> None:
        self.schema = schema
        self._options = pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior=unexpected_fields)
        self._strict = unexpected_fields == "error"

    def decode(self, lines: Sequence[bytes]) -> DecodedLines:
        """Decode ``lines`` (without newlines); one Arrow parse when all of them decode.

        Returns:
            The rows of the lines that decode and the lines that do not.
        """
        data = b"\n".join(lines)
        if lines and data.count(b"\n") == len(lines) - 1 and not has_null_line(data) and _is_utf8(data):
            batch = self._parse(lines, data)
            if batch is not None:
                return DecodedLines(batch, list(range(len(lines))), [])
        candidates = [i for i, line in enumerate(lines) if _may_decode(line)]
        parts: list[pa.RecordBatch] = []
        decoded: list[int] = []
        self._bisect(lines, candidates, parts, decoded)
        batch = pa.concat_batches(parts) if parts else pa.RecordBatch.from_pylist([], schema=self.schema)
        ok = set(decoded)
        rejected = [RejectedLine(i, self.why(line)) for i, line in enumerate(lines) if i not in ok]
        return DecodedLines(batch, decoded, rejected)

    def why(self, value: bytes) -> str:
        """Say why one value does not decode, naming the field that does not convert when one does not."""
        if not value:
            return "an empty value"
        try:
            row = json.loads(value)
        except ValueError as error:
            return f"invalid JSON ({error})"
        if not isinstance(row, dict):
            kind = "null" if row is None else type(row).__name__
            return f"a JSON {kind}, not an object"
        if self._strict and (extra := [name for name in row if name not in self.schema.names]):
            return f"field {extra[0]!r} is not in the schema {self.schema.names}"
        for field in self.schema:
            if field.name not in row:
                continue
            line = json.dumps({field.name: row[field.name]}).encode()
            alone = pajson.ParseOptions(explicit_schema=pa.schema([field]))
            try:
                pajson.read_json(pa.py_buffer(line), parse_options=alone)
            except pa.ArrowException as error:
                return f"field {field.name!r} does not convert to {field.type} ({error})"
        if b"\n" in value:
            return "an object spanning lines"
        return f"not one row of {self.schema}"

    def _parse(self, lines: Sequence[bytes], data: bytes) -> pa.RecordBatch | None:
        """Parse the joined lines with Arrow; ``None`` when they do not give one row of the schema each."""
        block_size = max(_MIN_BLOCK, max(len(line) for line in lines) + 2)
        try:
            table = pajson.read_json(pa.py_buffer(data), parse_options=self._options,
                                     read_options=pajson.ReadOptions(block_size=block_size))
        except pa.ArrowException:
            return None
        if table.num_rows != len(lines):
            return None
        return table.select(self.schema.names).combine_chunks().to_batches()[0]

    def _bisect(self, lines: Sequence[bytes], indices: list[int], parts: list[pa.RecordBatch],
                decoded: list[int]) -> None:
        """Append the rows of the halves of ``lines[indices]`` that parse to ``parts``, their indices to ``decoded``."""
        if not indices:
            return
        subset = [lines[i] for i in indices]
        batch = self._parse(subset, b"\n".join(subset))
        if batch is not None:
            parts.append(batch)
            decoded.extend(indices)
        elif len(indices) > 1:
            half = len(indices) // 2
            self._bisect(lines, indices[:half], parts, decoded)
            self._bisect(lines, indices[half:], parts, decoded)


def _may_decode(line: bytes) -> bool:
    """Whether Arrow may parse ``line`` (it passes the screens of the module docstring and is one line)."""
    return (bool(line.strip(_JSON_WHITESPACE)) and b"\n" not in line and not has_null_line(line)
            and _is_utf8(line))


def _is_utf8(data: bytes) -> bool:
    if data.isascii():
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
