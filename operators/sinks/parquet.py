"""A two-phase-commit sink writing Parquet files into a directory.

Each sink subtask's writer writes into a hidden *in-progress* file
``.{stem}-{n}.parquet.inprogress``. A file rolls (closes) past
``rolling_bytes`` of written batches or ``rolling_interval_s``; a closed file
is renamed to a hidden *pending* name ``_{stem}-{n}.parquet.pending``.
``prepare_commit()`` closes the open file into pending too and hands out the
pending files as committables; the committer renames each to its visible name
``part-{stem}-{n}.parquet``. Renames are atomic, and committing again is a
no-op, so ``pyarrow.dataset.dataset(path, format="parquet")`` (which skips
names that start with ``_`` or ``.``) shows exactly the committed rows.

The stem is ``{job}-{operator}-{subtask}-{run}-{attempt}-{token}``, ``token``
random per writer; each text field is escaped so that it holds no ``-``
(``feature-window`` is written ``feature%2Dwindow``, see
:mod:`onceflow.operators.sinks.naming`). :meth:`ParquetSinkCommitter.abort_lingering`
splits a hidden name back into its fields and compares the job and operator
fields exactly, so sinks of other jobs or operators writing into the same
directory (``sink`` and ``sink-1``, say) never remove each other's files.

Committables are :class:`ParquetCommittable` values, stored as (version 1)::

    {"v": 1, "pending": "<path of the pending file>", "final": "<path of the part file>"}

Example:
    >>> import tempfile
    >>> import pyarrow as pa, pyarrow.dataset as ds
    >>> from onceflow.checkpoint.two_phase_commit import SinkContext
    >>> folder = tempfile.mkdtemp()
    >>> sink = ParquetSink(folder)
    >>> ctx = SinkContext(job="demo", operator="sink_1")
    >>> writer = sink.create_writer(ctx)
    >>> writer.write(pa.record_batch({"x": [1, 2]}))
    >>> committables = writer.prepare_commit()
    >>> ds.dataset(folder, format="parquet").to_table().num_rows  # pre-committed, invisible
    0
    >>> sink.create_committer(ctx).commit(committables)
    >>> ds.dataset(folder, format="parquet").to_table().to_pydict()
    {'x': [1, 2]}

"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from onceflow.checkpoint.two_phase_commit import (
    Committable,
    CommittableRecord,
    Committer,
    SinkContext,
    SinkWriter,
    TransactionalSink,
    unsupported_version,
)
from onceflow.errors import DataError, PlanError, SinkCommitError
from onceflow.operators.fs import (
    absolute_path,
    delete_file,
    exists,
    fsync_directory,
    fsync_file,
    resolve_filesystem,
)
from onceflow.operators.sinks.naming import escape_field, split_fields

__all__ = ["ParquetCommittable", "ParquetSink", "ParquetSinkCommitter", "ParquetSinkWriter"]

_FIELDS = 7
"""Fields of a file name: job, operator, subtask, run, attempt, writer token, file sequence."""
_IN_PROGRESS = (".", ".parquet.inprogress")
_PENDING = ("_", ".parquet.pending")


def _stem(ctx: SinkContext, token: str) -> str:
    """The name stem of one writer's files: its escaped fields joined by ``-``."""
    return "-".join([
        escape_field(ctx.job, delimiter="-", limit=64),
        escape_field(ctx.operator, delimiter="-", limit=64),
        str(ctx.subtask),
        escape_field(ctx.run, delimiter="-", limit=40),
        str(ctx.attempt),
        token,
    ])


def _uncommitted_fields(name: str) -> list[str] | None:
    """The fields of an in-progress or pending file name; ``None`` for any other name."""
    for prefix, suffix in (_IN_PROGRESS, _PENDING):
        if name.startswith(prefix) and name.endswith(suffix) and len(name) > len(prefix) + len(suffix):
            fields = split_fields(name[len(prefix):-len(suffix)], delimiter="-", count=_FIELDS)
            if fields is not None and all(fields[i].isdigit() for i in (2, 4, 6)):
                return fields
    return None


@dataclass(frozen=True, slots=True)
class ParquetCommittable(Committable):
    """A pending file, committed by renaming it to its part file.

    Attributes:
        pending: the path of the hidden pending file.
        final: the path of the visible part file it becomes.

    Example:
        >>> committable = ParquetCommittable("/out/_a.parquet.pending", "/out/part-a.parquet")
        >>> committable.to_record().to_dict()
        {'v': 1, 'pending': '/out/_a.parquet.pending', 'final': '/out/part-a.parquet'}
        >>> ParquetCommittable.from_record(committable.to_record()) == committable
        True

    """

    VERSION: ClassVar[int] = 1

    pending: str
    final: str

    def fields(self) -> dict[str, Any]:
        return {"pending": self.pending, "final": self.final}

    @classmethod
    def from_record(cls, record: CommittableRecord, *, operator: str = "") -> Self:
        if record.version != 1:
            raise unsupported_version(record, (1,), sink="parquet sink", operator=operator)
        return cls(str(record.fields["pending"]), str(record.fields["final"]))


class ParquetSink(TransactionalSink[ParquetCommittable]):
    """Writes committed rows as Parquet files into a directory, exactly once.

    Args:
        path: the output directory (a plain path or a ``pyarrow.fs`` URI such
            as ``file:///data/out``); created if missing.
        rolling_bytes: roll to a new file once this many bytes of batches
            (Arrow size, approximate) were written into the open one.
        rolling_interval_s: also roll a file open this long, or ``None``.
        compression: the Parquet compression codec (``"snappy"``, ``"zstd"``, ``"none"``).
        clock: a monotonic clock in seconds (tests pass a fake one).

    Raises:
        PlanError: an option is out of range.

    Example:
        >>> import tempfile, os
        >>> import pyarrow as pa
        >>> from onceflow.checkpoint.two_phase_commit import SinkContext
        >>> folder = tempfile.mkdtemp()
        >>> sink = ParquetSink(folder, rolling_bytes=1)  # one file per batch
        >>> writer = sink.create_writer(SinkContext(job="demo", operator="sink_1"))
        >>> writer.write(pa.record_batch({"x": [1]}))
        >>> writer.write(pa.record_batch({"x": [2]}))
        >>> len(writer.prepare_commit())
        2
        >>> writer.abort()  # nothing was open, the handed-out files stay
        >>> sorted(name.split("-")[0] for name in os.listdir(folder))
        ['_demo', '_demo']

    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        rolling_bytes: int = 128 * 1024 * 1024,
        rolling_interval_s: float | None = None,
        compression: str = "snappy",
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rolling_bytes <= 0:
            msg = f"parquet sink: rolling_bytes must be > 0, got {rolling_bytes}; pass a file size in bytes"
            raise PlanError(msg)
        if rolling_interval_s is not None and rolling_interval_s <= 0:
            msg = (
                f"parquet sink: rolling_interval_s must be > 0 or None, got {rolling_interval_s}; "
                "pass None to roll by size only"
            )
            raise PlanError(msg)
        self.path = absolute_path(path)
        self.rolling_bytes = rolling_bytes
        self.rolling_interval_s = rolling_interval_s
        self.compression = compression
        self.clock = clock

    def prepare(self) -> None:
        """Create the output directory."""
        fs, path = resolve_filesystem(self.path)
        fs.create_dir(path, recursive=True)

    def create_writer(self, ctx: SinkContext) -> ParquetSinkWriter:
        """Return the writer for ``ctx.subtask``.

        Args:
            ctx: where the writer runs.

        Returns:
            A writer with a fresh unique file-name stem.

        """
        fs, path = resolve_filesystem(self.path)
        fs.create_dir(path, recursive=True)
        return ParquetSinkWriter(self, fs, path, ctx)

    def create_committer(self, ctx: SinkContext) -> ParquetSinkCommitter:
        """Return the committer for this sink's committables.

        Args:
            ctx: where the committer runs.

        Returns:
            The committer.

        """
        fs, path = resolve_filesystem(self.path)
        return ParquetSinkCommitter(fs, ctx, path)

    def read_committable(self, record: CommittableRecord, *, operator: str = "") -> ParquetCommittable:
        """Read a committable of this sink from a checkpoint (version 1).

        Raises:
            SinkCommitError: the record's version is not 1.

        """
        return ParquetCommittable.from_record(record, operator=operator)


class ParquetSinkWriter(SinkWriter[ParquetCommittable]):
    """Writes one sink subtask's batches into in-progress and pending files.

    Args:
        sink: the sink config.
        fs: the filesystem of the output directory.
        directory: the output directory in ``fs``.
        ctx: where the writer runs.

    """

    def __init__(self, sink: ParquetSink, fs: pafs.FileSystem, directory: str, ctx: SinkContext) -> None:
        self._sink = sink
        self._fs = fs
        self._directory = directory.rstrip("/")
        self._ctx = ctx
        self._stem = _stem(ctx, uuid.uuid4().hex[:12])
        self._sequence = 0
        self._schema: pa.Schema | None = None
        self._writer: pq.ParquetWriter | None = None
        self._name = ""
        self._bytes = 0
        self._opened_at = 0.0
        self._pending: list[ParquetCommittable] = []

    def write(self, batch: pa.RecordBatch) -> None:
        """Write ``batch`` into the open file, rolling first or after where due.

        Raises:
            DataError: ``batch`` has a schema different from the first batch's.

        """
        if batch.num_rows == 0:
            return
        if self._schema is None:
            self._schema = batch.schema
        elif not batch.schema.equals(self._schema, check_metadata=False):
            raise self._schema_error(batch.schema)
        if self._writer is not None and self._interval_due():
            self._roll()
        if self._writer is None:
            self._open()
        assert self._writer is not None
        if batch.schema.metadata != self._schema.metadata:
            batch = batch.replace_schema_metadata(self._schema.metadata)
        self._writer.write_batch(batch)
        self._bytes += batch.nbytes
        if self._bytes >= self._sink.rolling_bytes:
            self._roll()

    def flush(self, end_of_input: bool) -> None:
        """Roll the open file if its interval is over."""
        if self._writer is not None and self._interval_due():
            self._roll()

    def prepare_commit(self, checkpoint_id: int | None = None) -> list[ParquetCommittable]:
        """Close the open file into pending and hand out every pending file.

        Returns:
            One committable per pending file since the last ``prepare_commit``.

        """
        if self._writer is not None:
            self._roll()
        committables, self._pending = self._pending, []
        return committables

    def abort(self) -> None:
        """Delete the open file and the pending files not handed out yet."""
        if self._writer is not None:
            try:
                self._writer.close()
            finally:
                self._writer = None
                delete_file(self._fs, self._path(f".{self._name}.inprogress"))
        for committable in self._pending:
            delete_file(self._fs, committable.pending)
        self._pending = []

    def _path(self, name: str) -> str:
        return f"{self._directory}/{name}"

    def _open(self) -> None:
        self._name = f"{self._stem}-{self._sequence}.parquet"
        self._sequence += 1
        self._writer = pq.ParquetWriter(
            self._path(f".{self._name}.inprogress"),
            self._schema,
            filesystem=self._fs,
            compression=self._sink.compression,
        )
        self._bytes = 0
        self._opened_at = self._sink.clock()

    def _roll(self) -> None:
        """Close the open file and rename it to its pending name."""
        assert self._writer is not None
        self._writer.close()
        self._writer = None
        in_progress = self._path(f".{self._name}.inprogress")
        pending = self._path(f"_{self._name}.pending")
        fsync_file(self._fs, in_progress)
        self._fs.move(in_progress, pending)
        fsync_directory(self._fs, self._directory)
        self._pending.append(ParquetCommittable(pending, self._path(f"part-{self._name}")))

    def _interval_due(self) -> bool:
        interval = self._sink.rolling_interval_s
        return interval is not None and self._sink.clock() - self._opened_at >= interval

    def _schema_error(self, schema: pa.Schema) -> DataError:
        assert self._schema is not None
        operator = self._ctx.operator
        column, detail = "", f"columns {schema.names} instead of {self._schema.names}"
        for field in schema:
            index = self._schema.get_field_index(field.name)
            if index < 0:
                column, detail = field.name, f"a new column '{field.name}'"
                break
            if not self._schema.field(index).type.equals(field.type):
                column = field.name
                detail = f"column '{field.name}' as {field.type}, not {self._schema.field(index).type}"
                break
        else:
            for field in self._schema:
                if schema.get_field_index(field.name) < 0:
                    column, detail = field.name, f"no column '{field.name}'"
                    break
        msg = (
            f"parquet sink {operator}: a batch has {detail}, unlike the first batch; "
            "give every batch the sink receives the same schema (cast before the sink)"
        )
        return DataError(msg, operator=operator, column=column or None)


class ParquetSinkCommitter(Committer[ParquetCommittable]):
    """Renames pending files to their visible names, idempotently.

    Args:
        fs: the filesystem of the output directory.
        ctx: where the committer runs.

    """

    def __init__(self, fs: pafs.FileSystem, ctx: SinkContext, directory: str = "") -> None:
        self._fs = fs
        self._ctx = ctx
        self._directory = directory.rstrip("/")

    def commit(self, committables: list[ParquetCommittable]) -> None:
        """Rename each pending file to its final name; a committed one is skipped.

        Raises:
            SinkCommitError: neither the pending nor the final file of a
                committable exists (the rest are committed).

        """
        lost = []
        directories = set()
        for committable in committables:
            pending, final = committable.pending, committable.final
            if exists(self._fs, pending):
                self._fs.move(pending, final)
                directories.add(final.rsplit("/", 1)[0])
            elif not exists(self._fs, final):
                lost.append(pending)
        for directory in directories:
            fsync_directory(self._fs, directory)
        if lost:
            msg = (
                f"parquet sink {self._ctx.operator}: cannot commit {len(lost)} file(s), neither the "
                f"pending file nor its part file exists (first: '{lost[0]}'); they were aborted or "
                "deleted, so the output misses rows: rerun the job from an earlier checkpoint"
            )
            raise SinkCommitError(msg)

    def abort(self, committables: list[ParquetCommittable]) -> None:
        """Delete the pending files of ``committables`` (committed ones stay)."""
        for committable in committables:
            delete_file(self._fs, committable.pending)

    def abort_lingering(self, keep: list[ParquetCommittable]) -> None:
        """Delete every in-progress and pending file of this job's sink operator that ``keep`` does not name.

        Every subtask, run and attempt of the operator is included; files of
        other jobs and operators in the directory are left alone, whatever
        their names share (names are compared field by field). Run it with
        no writer of the operator alive: a live writer's files would go too.
        """
        kept = {c.pending.rsplit("/", 1)[-1] for c in keep}
        for path in self.lingering():
            if path.rsplit("/", 1)[-1] not in kept:
                delete_file(self._fs, path)

    def lingering(self) -> list[str]:
        """Return the paths of this job's sink operator's in-progress and pending files, sorted."""
        if not self._directory:
            return []
        job = escape_field(self._ctx.job, delimiter="-", limit=64)
        operator = escape_field(self._ctx.operator, delimiter="-", limit=64)
        selector = pafs.FileSelector(self._directory, allow_not_found=True)
        found = []
        for info in self._fs.get_file_info(selector):
            fields = _uncommitted_fields(info.base_name)
            if fields is not None and fields[0] == job and fields[1] == operator:
                found.append(info.path)
        return sorted(found)
