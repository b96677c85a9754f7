"""A sink for tests that collects committed rows where the driver can read them.

Writers run in Ray worker processes, so committed rows cannot live in a plain
list. :meth:`TestingSink.prepare` (run once on the driver) starts a small Ray
actor, the *store*, whose handle travels with the pickled sink to every
writer's process. A writer buffers its batches; ``prepare_commit`` hands out
one committable holding them as Arrow IPC bytes; the committer sends
committables to the store, which keeps each id once, in commit order. The
driver then reads :meth:`TestingSink.table`, :meth:`TestingSink.rows` or
:meth:`TestingSink.committed_ids`.

``prepare`` called again keeps the same store (while the same Ray session
runs), so a job run again after a crash adds to the rows of the first run, as
Bytewax's ``TestingSink`` list does. Without Ray initialised, ``prepare``
keeps the store in this process instead (for unit tests; such a sink cannot be
sent to another process).

Committable (version 1)::

    {"v": 1, "id": "<operator>/<subtask>/<writer token>-<n>", "batches": <Arrow IPC stream bytes>}

The writer token (random, per writer) keeps the ids of a writer restarted
after a failure apart from the ids its predecessor already committed.

Example:
    >>> import pyarrow as pa
    >>> from checkpoint.two_phase_commit import SinkContext
    >>> sink = TestingSink()
    >>> sink.prepare()  # Ray is not initialised here: an in-process store
    >>> ctx = SinkContext(job="demo", operator="sink_1")
    >>> writer = sink.create_writer(ctx)
    >>> writer.write(pa.record_batch({"x": [1, 2]}))
    >>> committables = writer.prepare_commit()
    >>> sink.rows()  # pre-committed, not committed
    []
    >>> committer = sink.create_committer(ctx)
    >>> committer.commit(committables)
    >>> committer.commit(committables)  # idempotent
    >>> sink.rows()
    [{'x': 1}, {'x': 2}]

"""

from __future__ import annotations

import uuid
from typing import Any

import pyarrow as pa

from checkpoint.errors import OnceflowError, SinkCommitError
from checkpoint.two_phase_commit import Committable, Committer, SinkContext, SinkWriter, TransactionalSink

__all__ = ["TestingSink", "TestingSinkCommitter", "TestingSinkWriter"]

COMMITTABLE_VERSION = 1
"""The version of the committables this module writes and reads."""


class _TestingStore:
    """Committed committables by id, in commit order (run as a Ray actor or in-process)."""

    def __init__(self) -> None:
        self._committed: dict[str, bytes] = {}

    def commit(self, committables: list[Committable]) -> None:
        for committable in committables:
            self._committed.setdefault(committable["id"], committable["batches"])

    def committed(self) -> list[tuple[str, bytes]]:
        return list(self._committed.items())

    def committed_ids(self) -> list[str]:
        return list(self._committed)


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


class TestingSink(TransactionalSink):
    """Collects committed rows for tests; read them with :meth:`table` or :meth:`rows`.

    Example:
        >>> import pyarrow as pa
        >>> from checkpoint.two_phase_commit import SinkContext
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
        return TestingSinkWriter(ctx)

    def create_committer(self, ctx: SinkContext) -> TestingSinkCommitter:
        """Return a committer that sends committables to the store."""
        return TestingSinkCommitter(self._store, ctx)

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

    def _committed(self) -> list[tuple[str, bytes]]:
        store = self._store
        if store is None:
            return []
        if isinstance(store, _LocalStore):
            return store.store.committed()
        import ray

        return ray.get(store.committed.remote())


class TestingSinkWriter(SinkWriter):
    """Buffers one subtask's batches until ``prepare_commit``.

    Args:
        ctx: where the writer runs.

    Attributes:
        rows_written: the rows this writer received, committed or not.

    """

    __test__ = False

    def __init__(self, ctx: SinkContext) -> None:
        self._ctx = ctx
        self._token = uuid.uuid4().hex[:12]
        self._sequence = 0
        self._batches: list[pa.RecordBatch] = []
        self.rows_written = 0

    def write(self, batch: pa.RecordBatch) -> None:
        """Buffer ``batch`` (an empty one is skipped)."""
        if batch.num_rows:
            self._batches.append(batch)
            self.rows_written += batch.num_rows

    def prepare_commit(self, checkpoint_id: int | None = None) -> list[Committable]:
        """Return one committable holding the buffered rows, or ``[]`` if none."""
        if not self._batches:
            return []
        table = pa.concat_tables(
            [pa.Table.from_batches([batch]) for batch in self._batches], promote_options="permissive"
        )
        self._batches = []
        committable_id = f"{self._ctx.operator}/{self._ctx.subtask}/{self._token}-{self._sequence}"
        self._sequence += 1
        return [{"v": COMMITTABLE_VERSION, "id": committable_id, "batches": _encode(table)}]

    def abort(self) -> None:
        """Discard the buffered rows."""
        self._batches = []


class TestingSinkCommitter(Committer):
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

    def commit(self, committables: list[Committable]) -> None:
        """Publish ``committables`` in the store; an id already there is skipped.

        Raises:
            SinkCommitError: the sink was never prepared, or a committable has
                an unknown version.

        """
        for committable in committables:
            if committable.get("v") != COMMITTABLE_VERSION:
                msg = (
                    f"testing sink {self._ctx.operator}: committable version {committable.get('v')!r} "
                    f"is not supported (this onceflow reads version {COMMITTABLE_VERSION}); "
                    "resolve the checkpoint with the onceflow version that wrote it"
                )
                raise SinkCommitError(msg)
        if not committables:
            return
        if self._store is None:
            msg = (
                f"testing sink {self._ctx.operator}: the sink has no store; call "
                "TestingSink.prepare() on the driver (after ray.init()) before the writers start"
            )
            raise SinkCommitError(msg)
        if isinstance(self._store, _LocalStore):
            self._store.store.commit(committables)
            return
        import ray

        ray.get(self._store.commit.remote(committables))

    def abort(self, committables: list[Committable]) -> None:
        """Discard ``committables``: they never reached the store, so nothing to do."""


def _encode(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as stream:
        stream.write_table(table)
    return sink.getvalue().to_pybytes()


def _decode(data: bytes) -> pa.Table:
    with pa.ipc.open_stream(data) as stream:
        return stream.read_all()
