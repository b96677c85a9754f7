"""A sink for tests that collects committed rows where the driver can read them.

Writers run in Ray worker processes, so committed rows cannot live in a plain
list. :meth:`TestingSink.prepare` (run once on the driver) starts a small Ray
actor, the *store*, whose handle travels with the pickled sink to every
writer's process. A writer buffers its batches; ``prepare_commit`` hands out
one committable holding them as Arrow IPC bytes and registers its id in the
store as pre-committed (under the job and operator); the committer sends
committables to the store, which keeps each id once, in commit order. The
driver then reads :meth:`TestingSink.table`, :meth:`TestingSink.rows` or
:meth:`TestingSink.committed_ids`.

The store models a transactional system: an aborted id is never committed
later (committing it raises :class:`SinkCommitError`, as a Parquet file
deleted by an abort does), ``abort_lingering`` aborts every pre-committed id
of the job's operator (all subtasks, runs and attempts) but the kept ones,
and :meth:`TestingSink.pending_ids` lists what is pre-committed and neither
committed nor aborted, so a test can check that a job left nothing behind.

``prepare`` called again keeps the same store (while the same Ray session
runs), so a job run again after a crash adds to the rows of the first run, as
Bytewax's ``TestingSink`` list does. Without Ray initialised, ``prepare``
keeps the store in this process instead (for unit tests; such a sink cannot be
sent to another process).

Committables are :class:`TestingCommittable` values, stored as (version 1)::

    {"v": 1, "id": "<operator>/<subtask>/<writer token>-<n>", "batches": <Arrow IPC stream bytes>}

The writer token (random, per writer) keeps the ids of a writer restarted
after a failure apart from the ids its predecessor already committed.

Example:
    >>> import pyarrow as pa
    >>> from onceflow.checkpoint.two_phase_commit import SinkContext
    >>> sink = TestingSink()
    >>> sink.prepare()  # Ray is not initialised here: an in-process store
    >>> ctx = SinkContext(job="demo", operator="sink_1")
    >>> writer = sink.create_writer(ctx)
    >>> writer.write(pa.record_batch({"x": [1, 2]}))
    >>> committables = writer.prepare_commit()
    >>> sink.rows(), len(sink.pending_ids())  # pre-committed, not committed
    ([], 1)
    >>> committer = sink.create_committer(ctx)
    >>> committer.commit(committables)
    >>> committer.commit(committables)  # idempotent
    >>> sink.rows(), sink.pending_ids()
    ([{'x': 1}, {'x': 2}], [])

"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import pyarrow as pa

from onceflow.checkpoint.two_phase_commit import (
    Committable,
    CommittableRecord,
    Committer,
    SinkContext,
    SinkWriter,
    TransactionalSink,
    unsupported_version,
)
from onceflow.errors import OnceflowError, SinkCommitError

__all__ = ["TestingCommittable", "TestingSink", "TestingSinkCommitter", "TestingSinkWriter"]


@dataclass(frozen=True, slots=True)
class TestingCommittable(Committable):
    """One writer's rows between two pre-commits, under an id unique to them.

    Attributes:
        id: ``<operator>/<subtask>/<writer token>-<n>``.
        batches: the rows, as Arrow IPC stream bytes.

    Example:
        >>> committable = TestingCommittable("sink_1/0/abc-0", b"")
        >>> committable.to_record().to_dict()
        {'v': 1, 'id': 'sink_1/0/abc-0', 'batches': b''}

    """

    __test__: ClassVar[bool] = False
    VERSION: ClassVar[int] = 1

    id: str
    batches: bytes

    def fields(self) -> dict[str, Any]:
        return {"id": self.id, "batches": self.batches}

    @classmethod
    def from_record(cls, record: CommittableRecord, *, operator: str = "") -> Self:
        if record.version != 1:
            raise unsupported_version(record, (1,), sink="testing sink", operator=operator)
        return cls(str(record.fields["id"]), bytes(record.fields["batches"]))


class _TestingStore:
    """Committed, pre-committed and aborted ids (run as a Ray actor or in-process)."""

    def __init__(self) -> None:
        self._committed: dict[str, bytes] = {}
        self._prepared: dict[str, tuple[str, str]] = {}  # id -> (job, operator)
        self._aborted: set[str] = set()

    def prepare(self, job: str, operator: str, ids: list[str]) -> None:
        for committable_id in ids:
            if committable_id not in self._committed and committable_id not in self._aborted:
                self._prepared[committable_id] = (job, operator)

    def commit(self, committables: list[TestingCommittable]) -> list[str]:
        """Commit each committable not aborted; return the ids of the aborted ones."""
        aborted = []
        for committable in committables:
            committable_id = committable.id
            if committable_id in self._aborted:
                aborted.append(committable_id)
                continue
            self._committed.setdefault(committable_id, committable.batches)
            self._prepared.pop(committable_id, None)
        return aborted

    def abort(self, ids: list[str]) -> None:
        for committable_id in ids:
            if committable_id not in self._committed:
                self._aborted.add(committable_id)
                self._prepared.pop(committable_id, None)

    def lingering(self, job: str, operator: str) -> list[str]:
        return sorted(i for i, owner in self._prepared.items() if owner == (job, operator))

    def abort_lingering(self, job: str, operator: str, keep: list[str]) -> None:
        kept = set(keep)
        self.abort([i for i in self.lingering(job, operator) if i not in kept])

    def pending(self) -> list[str]:
        return sorted(self._prepared)

    def committed(self) -> list[tuple[str, bytes]]:
        return list(self._committed.items())

    def committed_ids(self) -> list[str]:
        return list(self._committed)


def _call(store: Any, method: str, *args: Any) -> Any:
    """Call ``method`` of ``store``: in this process, or on the store actor (waiting for it)."""
    if isinstance(store, _LocalStore):
        return getattr(store.store, method)(*args)
    import ray

    return ray.get(getattr(store, method).remote(*args))


class _LocalStore:
    """An in-process store, used when ``prepare`` runs without Ray; cannot be pickled."""

    def __init__(self) -> None:
        self.store = _TestingStore()

    def __reduce__(self) -> Any:
        msg = (
            "testing sink: the sink was prepared without Ray, so its in-process store cannot be "
            "sent to a worker; call ray.init() before TestingSink.prepare()"
        )
        raise OnceflowError(msg)


class TestingSink(TransactionalSink[TestingCommittable]):
    """Collects committed rows for tests; read them with :meth:`table` or :meth:`rows`.

    Example:
        >>> import pyarrow as pa
        >>> from onceflow.checkpoint.two_phase_commit import SinkContext
        >>> sink = TestingSink()
        >>> sink.prepare()
        >>> writer = sink.create_writer(SinkContext(job="demo", operator="sink_1"))
        >>> writer.write(pa.record_batch({"x": [1]}))
        >>> committables = writer.prepare_commit()
        >>> sink.create_committer(SinkContext(job="demo", operator="sink_1")).commit(committables)
        >>> sink.table().to_pydict(), [i.rsplit("/", 1)[0] for i in sink.committed_ids()]
        ({'x': [1]}, ['sink_1/0'])

    """

    __test__ = False

    def __init__(self) -> None:
        self._store: Any = None
        self._session: str | None = None

    def prepare(self) -> None:
        """Create the store: a Ray actor if Ray is initialised, else in this process.

        The store of an earlier ``prepare`` in the same Ray session is kept.
        """
        import ray

        if not ray.is_initialized():
            if not isinstance(self._store, _LocalStore):
                self._store, self._session = _LocalStore(), None
            return
        session = ray.get_runtime_context().get_job_id()
        if self._store is None or self._session != session:
            actor = ray.remote(num_cpus=0)(_TestingStore)
            self._store, self._session = actor.remote(), session

    def create_writer(self, ctx: SinkContext) -> TestingSinkWriter:
        """Return a writer that buffers ``ctx.subtask``'s batches."""
        return TestingSinkWriter(ctx, self._store)

    def create_committer(self, ctx: SinkContext) -> TestingSinkCommitter:
        """Return a committer that sends committables to the store."""
        return TestingSinkCommitter(self._store, ctx)

    def read_committable(self, record: CommittableRecord, *, operator: str = "") -> TestingCommittable:
        """Read a committable of this sink from a checkpoint (version 1).

        Raises:
            SinkCommitError: the record's version is not 1.

        """
        return TestingCommittable.from_record(record, operator=operator)

    def table(self) -> pa.Table:
        """Return every committed row, in commit order (no columns if none)."""
        tables = [_decode(data) for _, data in self._committed()]
        tables = [table for table in tables if table.num_rows]
        if not tables:
            return pa.table({})
        return pa.concat_tables(tables, promote_options="permissive")

    def rows(self) -> list[dict[str, Any]]:
        """Return every committed row as a dict, in commit order."""
        return self.table().to_pylist()

    def committed_ids(self) -> list[str]:
        """Return the ids of the committed committables, in commit order."""
        return [committable_id for committable_id, _ in self._committed()]

    def pending_ids(self) -> list[str]:
        """Return the ids pre-committed and neither committed nor aborted (any job), sorted."""
        return [] if self._store is None else list(_call(self._store, "pending"))

    def _committed(self) -> list[tuple[str, bytes]]:
        return [] if self._store is None else list(_call(self._store, "committed"))


class TestingSinkWriter(SinkWriter[TestingCommittable]):
    """Buffers one subtask's batches until ``prepare_commit``.

    Args:
        ctx: where the writer runs.
        store: the store that learns of each pre-commit (``None``: an unprepared sink).

    Attributes:
        rows_written: the rows this writer received, committed or not.

    """

    __test__ = False

    def __init__(self, ctx: SinkContext, store: Any = None) -> None:
        self._ctx = ctx
        self._store = store
        self._token = uuid.uuid4().hex[:12]
        self._sequence = 0
        self._batches: list[pa.RecordBatch] = []
        self.rows_written = 0

    def write(self, batch: pa.RecordBatch) -> None:
        """Buffer ``batch`` (an empty one is skipped)."""
        if batch.num_rows:
            self._batches.append(batch)
            self.rows_written += batch.num_rows

    def prepare_commit(self, checkpoint_id: int | None = None) -> list[TestingCommittable]:
        """Return one committable holding the buffered rows, or ``[]`` if none."""
        if not self._batches:
            return []
        table = pa.concat_tables(
            [pa.Table.from_batches([batch]) for batch in self._batches], promote_options="permissive"
        )
        self._batches = []
        committable_id = f"{self._ctx.operator}/{self._ctx.subtask}/{self._token}-{self._sequence}"
        self._sequence += 1
        if self._store is not None:
            _call(self._store, "prepare", self._ctx.job, self._ctx.operator, [committable_id])
        return [TestingCommittable(committable_id, _encode(table))]

    def abort(self) -> None:
        """Discard the buffered rows."""
        self._batches = []


class TestingSinkCommitter(Committer[TestingCommittable]):
    """Sends committables to the store, which keeps each id once.

    Args:
        store: the store (a Ray actor handle or an in-process store), or
            ``None`` if the sink was never prepared.
        ctx: where the committer runs.

    """

    __test__ = False

    def __init__(self, store: Any, ctx: SinkContext) -> None:
        self._store = store
        self._ctx = ctx

    def commit(self, committables: list[TestingCommittable]) -> None:
        """Publish ``committables`` in the store; an id already there is skipped.

        Raises:
            SinkCommitError: the sink was never prepared, or a committable was
                aborted (the others are committed).

        """
        if not committables:
            return
        if self._store is None:
            msg = (
                f"testing sink {self._ctx.operator}: the sink has no store; call "
                "TestingSink.prepare() on the driver (after ray.init()) before the writers start"
            )
            raise SinkCommitError(msg)
        aborted = _call(self._store, "commit", committables)
        if aborted:
            msg = (
                f"testing sink {self._ctx.operator}: cannot commit {len(aborted)} transaction(s) that were "
                f"aborted (first: {aborted[0]!r}); the output misses their rows: a checkpoint named a "
                "transaction that recovery aborted"
            )
            raise SinkCommitError(msg)

    def abort(self, committables: list[TestingCommittable]) -> None:
        """Mark ``committables`` aborted (committed ones stay): they can never commit afterwards."""
        ids = [committable.id for committable in committables]
        if ids and self._store is not None:
            _call(self._store, "abort", ids)

    def abort_lingering(self, keep: list[TestingCommittable]) -> None:
        """Abort every pre-committed id of this job's sink operator (all subtasks, runs, attempts) but ``keep``."""
        if self._store is not None:
            _call(self._store, "abort_lingering", self._ctx.job, self._ctx.operator, [c.id for c in keep])

    def lingering(self) -> list[str]:
        """Return the ids of this job's sink operator pre-committed and neither committed nor aborted."""
        return [] if self._store is None else list(_call(self._store, "lingering", self._ctx.job,
                                                         self._ctx.operator))


def _encode(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as stream:
        stream.write_table(table)
    return sink.getvalue().to_pybytes()


def _decode(data: bytes) -> pa.Table:
    with pa.ipc.open_stream(data) as stream:
        return stream.read_all()
