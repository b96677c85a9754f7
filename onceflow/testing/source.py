"""An in-memory source for tests, with in-band crash and end markers.

``TestingSource(items, batch_size)`` replays a list of items: dict rows
(consecutive ones are grouped into record batches of up to ``batch_size``
rows), ``pyarrow.RecordBatch`` / ``pyarrow.Table`` items (each one batch), and
two markers:

- ``TestingSource.EOF()``: the reader returns ``None`` there and the run
  ends; a reader resumed from the offset continues after the marker.
- ``TestingSource.ABORT()``: the reader raises :class:`TestingSourceAbort`
  the first time it reaches the marker. A reader resumed from an offset past
  it does not raise again (the offset records that it fired), and neither
  does any later reader on this machine: a fired marker leaves a small flag
  file named after the marker's token in the temporary directory, because a
  job restarted after the crash resumes from a checkpoint taken *before* the
  marker. That is Bytewax's ``ABORT`` semantics (it fires once per marker
  object); put a fresh ``ABORT()`` in every run that should crash.

Only subtask 0 reads; other subtasks end at once (``max_parallelism()`` is 1).

Example:
    >>> from onceflow.operators.sources.base import SourceContext
    >>> source = TestingSource([{"x": 1}, {"x": 2}, {"x": 3}, TestingSource.EOF(), {"x": 4}],
    ...                        batch_size=2)
    >>> reader = source.build(SourceContext("source_0"))
    >>> reader.read().to_pylist(), reader.read().to_pylist(), reader.read()
    ([{'x': 1}, {'x': 2}], [{'x': 3}], None)
    >>> resumed = source.build(SourceContext("source_0"), reader.offset())
    >>> resumed.read().to_pylist(), resumed.read()
    ([{'x': 4}], None)

"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeAlias

import pyarrow as pa

from onceflow.errors import OnceflowError, PlanError
from onceflow.operators.sources.base import RescaledOffsets, Source, SourceContext, SourceReader

__all__ = ["TestingSource", "TestingSourceAbort", "TestingSourceReader"]

_FLAG_DIR = "onceflow-testing-source-aborts"


class TestingSourceAbort(OnceflowError):
    """Raised by a :class:`TestingSource` reader at an ``ABORT()`` marker (an injected crash).

    Attributes:
        index: the marker's position in the items.

    """

    __test__ = False

    def __init__(self, message: str, *, index: int) -> None:
        super().__init__(message)
        self.index = index


@dataclass(frozen=True, slots=True)
class _EndOfInput:
    """The ``TestingSource.EOF()`` marker: the run ends here."""


def _token() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class _Abort:
    """The ``TestingSource.ABORT()`` marker: crash here, once.

    Attributes:
        token: identifies the marker across processes (its flag file's name).

    """

    token: str = field(default_factory=_token)


_Item: TypeAlias = "dict[str, Any] | pa.RecordBatch | pa.Table | _EndOfInput | _Abort"


class TestingSource(Source):
    """Replays in-memory rows and batches, with ``EOF()`` and ``ABORT()`` markers.

    Args:
        items: dict rows, record batches or tables, and markers.
        batch_size: the most dict rows grouped into one batch.
        schema: the schema for batches built from dict rows, or ``None`` to
            infer it per batch.

    Raises:
        PlanError: an item has an unsupported type, or ``batch_size`` is not positive.

    Example:
        >>> import pytest
        >>> from onceflow.operators.sources.base import SourceContext
        >>> source = TestingSource([{"x": 1}, TestingSource.ABORT(), {"x": 2}])
        >>> reader = source.build(SourceContext("source_0"))
        >>> reader.read().to_pylist()
        [{'x': 1}]
        >>> with pytest.raises(TestingSourceAbort):
        ...     reader.read()
        >>> reader.offset()
        {'index': 2, 'aborted': [1]}
        >>> reader.read().to_pylist()
        [{'x': 2}]

    """

    __test__ = False
    EOF: ClassVar[type[_EndOfInput]] = _EndOfInput
    ABORT: ClassVar[type[_Abort]] = _Abort

    def __init__(self, items: Iterable[_Item], batch_size: int = 1, *, schema: pa.Schema | None = None) -> None:
        if batch_size <= 0:
            msg = f"testing source: batch_size must be > 0, got {batch_size}; pass a positive row count"
            raise PlanError(msg)
        self.items = list(items)
        for index, item in enumerate(self.items):
            if not isinstance(item, dict | pa.RecordBatch | pa.Table | _EndOfInput | _Abort):
                msg = (
                    f"testing source: item {index} is a {type(item).__name__}; pass dict rows, "
                    "pyarrow record batches or tables, TestingSource.EOF() or TestingSource.ABORT()"
                )
                raise PlanError(msg)
        self.batch_size = batch_size
        self.schema = schema

    def build(self, ctx: SourceContext, resume_offset: Any | None = None) -> TestingSourceReader:
        """Return the reader (subtask 0 reads everything; others read nothing).

        Args:
            ctx: where the reader runs.
            resume_offset: an ``offset()`` of an earlier reader, ``None`` to
                start, or :class:`~onceflow.operators.sources.base.RescaledOffsets`
                (subtask 0 takes over the old subtask 0's position: no other
                subtask ever reads).

        Returns:
            The reader.

        Raises:
            PlanError: ``resume_offset`` is malformed.

        """
        if isinstance(resume_offset, RescaledOffsets):
            resume_offset = resume_offset.offsets[0] if resume_offset.offsets else None
        if resume_offset is None:
            return TestingSourceReader(self, ctx, 0, [])
        index = resume_offset.get("index") if isinstance(resume_offset, dict) else None
        aborted = resume_offset.get("aborted", []) if isinstance(resume_offset, dict) else None
        if not isinstance(index, int) or index < 0 or not isinstance(aborted, list | tuple):
            msg = (
                f"testing source {ctx.operator}: resume offset {resume_offset!r} is not "
                "{'index': i, 'aborted': [...]}; resume from an offset() of a TestingSource reader"
            )
            raise PlanError(msg)
        return TestingSourceReader(self, ctx, index, [int(i) for i in aborted])

    def max_parallelism(self) -> int:
        """Return 1: only one subtask reads a testing source."""
        return 1


class TestingSourceReader(SourceReader):
    """Replays the items of a :class:`TestingSource` from an index.

    Args:
        source: the source config.
        ctx: where the reader runs.
        index: the position of the next item.
        aborted: the positions of ``ABORT()`` markers that already fired.

    """

    __test__ = False

    def __init__(self, source: TestingSource, ctx: SourceContext, index: int, aborted: list[int]) -> None:
        self._source = source
        self._ctx = ctx
        self._index = index
        self._aborted = sorted(set(aborted))
        self._ended = ctx.subtask != 0

    def read(self) -> pa.RecordBatch | None:
        """Return the next batch, ``None`` at ``EOF()`` or the end of the items.

        Raises:
            TestingSourceAbort: at an ``ABORT()`` marker that has not fired yet.

        """
        items = self._source.items
        while not self._ended and self._index < len(items):
            item = items[self._index]
            if isinstance(item, _EndOfInput):
                self._index += 1
                self._ended = True
                return None
            if isinstance(item, _Abort):
                index = self._index
                self._index += 1
                if index in self._aborted or _has_fired(item):
                    continue
                self._aborted.append(index)
                _mark_fired(item)
                msg = (
                    f"testing source {self._ctx.operator}: injected crash at ABORT() item {index}; "
                    "this is expected in a recovery test, a restarted job resumes past it"
                )
                raise TestingSourceAbort(msg, index=index)
            if isinstance(item, dict):
                batch = self._dict_batch()
            else:
                self._index += 1
                batch = _to_batch(item)
            if batch.num_rows:
                return batch
        self._ended = True
        return None

    def offset(self) -> dict[str, Any]:
        """Return ``{"index": i, "aborted": [...]}``: the next item and the fired ``ABORT()`` items."""
        return {"index": self._index, "aborted": list(self._aborted)}

    def _dict_batch(self) -> pa.RecordBatch:
        """Group the dict rows from the current index into one batch."""
        items = self._source.items
        rows: list[dict[str, Any]] = []
        while self._index < len(items) and len(rows) < self._source.batch_size:
            item = items[self._index]
            if not isinstance(item, dict):
                break
            rows.append(item)
            self._index += 1
        return pa.RecordBatch.from_pylist(rows, schema=self._source.schema)


def _to_batch(item: pa.RecordBatch | pa.Table) -> pa.RecordBatch:
    """Return a batch or table item as one record batch."""
    if isinstance(item, pa.RecordBatch):
        return item
    batches = item.combine_chunks().to_batches()
    if len(batches) == 1:
        return batches[0]
    return pa.RecordBatch.from_pylist([], schema=item.schema)


def _flag_path(marker: _Abort) -> str:
    return os.path.join(tempfile.gettempdir(), _FLAG_DIR, marker.token)


def _has_fired(marker: _Abort) -> bool:
    return os.path.exists(_flag_path(marker))


def _mark_fired(marker: _Abort) -> None:
    path = _flag_path(marker)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w"):
        pass
