"""A PostgreSQL sink that commits in two phases and never waits on its own uncommitted rows.

Append mode: prepared transactions. Each sink subtask ``COPY``s a
checkpoint's rows into one open transaction on the target table and runs
``PREPARE TRANSACTION '<name>'`` on the checkpoint barrier: the rows are
durable in the server but invisible. When the checkpoint is complete the
committer runs ``COMMIT PREPARED`` from any connection; a transaction no longer
prepared was resolved before, so committing twice is a no-op. An append
inserts new rows only, so it never waits for a row lock of a prepared
transaction (unless the user's table has a unique key the stream repeats:
then ``lock_timeout_s`` turns the wait into an error and the job restarts).

Upsert mode: staged transactions. A prepared ``INSERT ... ON CONFLICT DO
UPDATE`` would hold row locks on the target's keys until the checkpoint
commits; if that checkpoint is aborted its transaction stays prepared, the
next upsert of a hot key waits for it while the subtask cannot process the
barrier that would commit it, and the job stalls until checkpoints expire.
So no writer ever touches the target table before the commit decision:

* a writer ``COPY``s rows into a *staging table* beside the target (named
  ``onceflow_stage_<table>_<hash>``; plain inserts, no unique index, so they
  wait for nobody), each row tagged with the transaction's name and a
  sequence number, and on the barrier it ``COMMIT``s that ordinary
  transaction: the rows are durable and invisible to readers of the target;
* the committer runs one ordinary statement per transaction,
  ``WITH staged AS (DELETE FROM staging WHERE txn = X RETURNING ...) INSERT
  INTO target SELECT DISTINCT ON (keys) ... ORDER BY keys, seq DESC ON
  CONFLICT (keys) DO UPDATE ...``: atomic, last write per key wins, and
  idempotent (a second run finds no staged rows). It holds row locks only for
  the duration of that statement, taken in key order, and runs outside the
  subtask's processing;
* aborting deletes the staged rows.

The server then needs no prepared transactions in upsert mode.

Names. Every transaction is named
``onceflow:<job>:<operator>:<subtask>:<transaction>:<run>:<attempt>`` (at most
199 bytes), where ``<transaction>`` is the checkpoint id (``end`` for the end
of a job without checkpoints) for a prepared transaction, and
``w<writer token>.<n>`` for a staged one (its rows are tagged when written,
before the barrier names the checkpoint). Text fields are escaped so that
they hold no ``:`` or quote (:mod:`onceflow.operators.sinks.naming`), so ``gid LIKE
'onceflow:%'`` finds every prepared transaction, and the lingering
transactions of a job's operator are matched field by field: other
operators, jobs, runs and attempts sharing the database never collide.

``exactly_once=False`` writes with plain autocommit ``COPY`` instead
(at-least-once after a failure: rows written since the last checkpoint are
written again); it is the baseline of the sink benchmark.

Committables: a :class:`PreparedTransaction` (append mode), stored as version 1
``{"v": 1, "gid": <prepared transaction>}``; a :class:`StagedTransaction`
(upsert mode), stored as version 2 ``{"v": 2, "txn": <name>, "checkpoint":
<id or None>, "table": <target>, "staging": <staging table>, "columns": [...],
"keys": [...]}``.

Example:
    >>> sink = PostgresSink("host=127.0.0.1 dbname=features", "user_windows",
    ...                     mode="upsert", key_columns=["user_id", "window_start"], create=True)
    >>> ctx = SinkContext("features", "sink_3", subtask=1, run="r1", attempt=2)
    >>> sink.transaction_name(ctx, 7)
    'onceflow:features:sink_3:1:7:r1:2'
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv

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
from onceflow.operators.sinks.naming import escape_field, split_fields
from onceflow.redaction import dsn_secrets, redact_dsn, scrub
from onceflow.testing.failpoints import crash_point

__all__ = [
    "PostgresCommittable",
    "PostgresSink",
    "PostgresSinkCommitter",
    "PostgresSinkWriter",
    "PreparedTransaction",
    "StagedTransaction",
]

log = logging.getLogger("onceflow")


_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_COMMIT_ATTEMPTS = 6
_NAME_FIELDS = 7
_LEGACY_NAME_FIELDS = 4
_TXN_COLUMN = "_onceflow_txn"
_SEQ_COLUMN = "_onceflow_seq"
_STAGING_PREFIX = "onceflow_stage_"


def _psycopg(table: str) -> Any:
    """The ``psycopg`` module, which the ``postgres`` extra installs.

    Raises:
        PlanError: psycopg is not installed.

    """
    try:
        import psycopg
    except ImportError as error:
        msg = (
            f"postgres sink {table}: psycopg is not installed; install onceflow with its postgres extra: "
            "pip install 'onceflow[postgres]'"
        )
        raise PlanError(msg) from error
    return psycopg


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _checked_table(name: str, *, operator: str) -> str:
    """``name`` if it is ``[schema.]table`` of plain identifiers (it goes into SQL text unquoted)."""
    if not all(_IDENTIFIER.match(part) for part in name.split(".")) or name.count(".") > 1:
        msg = (
            f"postgres sink {operator}: a committable names table {name!r}, which is not [schema.]name of "
            "letters, digits and '_'; the checkpoint is damaged: restore an earlier one"
        )
        raise SinkCommitError(msg)
    return name


def _first_line(error: BaseException) -> str:
    """The server's message without its DETAIL and HINT lines."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _postgres_type(kind: pa.DataType, *, operator: str, column: str) -> str:
    if pa.types.is_boolean(kind):
        return "boolean"
    if pa.types.is_int8(kind) or pa.types.is_int16(kind) or pa.types.is_uint8(kind):
        return "smallint"
    if pa.types.is_int32(kind) or pa.types.is_uint16(kind):
        return "integer"
    if pa.types.is_integer(kind):
        return "bigint"
    if pa.types.is_float16(kind) or pa.types.is_float32(kind):
        return "real"
    if pa.types.is_floating(kind):
        return "double precision"
    if pa.types.is_decimal(kind):
        return f"numeric({kind.precision}, {kind.scale})"
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return "text"
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return "bytea"
    if pa.types.is_timestamp(kind):
        return "timestamptz" if kind.tz else "timestamp"
    if pa.types.is_date(kind):
        return "date"
    msg = (
        f"postgres sink {operator}: column {column!r} has type {kind}, which has no PostgreSQL "
        "column type here; cast it to a number, string, binary, boolean, date or timestamp first"
    )
    raise DataError(msg, operator=operator, column=column)


def _csv(batch: pa.RecordBatch) -> bytes:
    """``batch`` as CSV for ``COPY ... (FORMAT csv)``; binary columns as bytea hex text."""
    for index, field in enumerate(batch.schema):
        if pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type):
            hexed = pa.array([None if value is None else "\\x" + value.hex()
                              for value in batch.column(index).to_pylist()], pa.string())
            batch = batch.set_column(index, field.name, hexed)
    buffer = io.BytesIO()
    pcsv.write_csv(batch, buffer, pcsv.WriteOptions(include_header=False, quoting_style="needed"))
    return buffer.getvalue()


def _copy(connection: Any, table: str, batch: pa.RecordBatch) -> None:
    columns = ", ".join(_quote(c) for c in batch.schema.names)
    with connection.cursor() as cursor, cursor.copy(f"COPY {table} ({columns}) FROM STDIN (FORMAT csv)") as copy:
        copy.write(_csv(batch))


@dataclass(frozen=True, slots=True)
class PreparedTransaction(Committable):
    """A prepared transaction (append mode), resolved by ``COMMIT PREPARED`` or ``ROLLBACK PREPARED``.

    Attributes:
        gid: the transaction's name.

    Example:
        >>> PreparedTransaction("onceflow:job:sink_1:0:7::0").to_record().to_dict()
        {'v': 1, 'gid': 'onceflow:job:sink_1:0:7::0'}

    """

    VERSION: ClassVar[int] = 1

    gid: str

    @property
    def name(self) -> str:
        return self.gid

    def fields(self) -> dict[str, Any]:
        return {"gid": self.gid}

    @classmethod
    def from_record(cls, record: CommittableRecord, *, operator: str = "") -> Self:
        if record.version != cls.VERSION:
            raise unsupported_version(record, (cls.VERSION,), sink="postgres sink", operator=operator)
        return cls(str(record.fields["gid"]))


@dataclass(frozen=True, slots=True)
class StagedTransaction(Committable):
    """Rows staged under one transaction name (upsert mode), merged into the target or deleted.

    Attributes:
        txn: the transaction's name, which tags its staged rows.
        staging: the staging table.
        table: the target table.
        columns: the stream's columns.
        keys: the key columns of the upsert.
        checkpoint: the checkpoint whose barrier pre-committed it, or ``None``
            (the end of a job without checkpoints, or found lingering).

    Example:
        >>> staged = StagedTransaction("t", "s", "target", ("id", "x"), ("id",), checkpoint=3)
        >>> staged.to_record().to_dict()
        {'v': 2, 'txn': 't', 'checkpoint': 3, 'table': 'target', 'staging': 's', 'columns': ['id', 'x'], 'keys': ['id']}

    """

    VERSION: ClassVar[int] = 2

    txn: str
    staging: str
    table: str = ""
    columns: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()
    checkpoint: int | None = None

    @property
    def name(self) -> str:
        return self.txn

    def fields(self) -> dict[str, Any]:
        return {"txn": self.txn, "checkpoint": self.checkpoint, "table": self.table, "staging": self.staging,
                "columns": list(self.columns), "keys": list(self.keys)}

    @classmethod
    def from_record(cls, record: CommittableRecord, *, operator: str = "") -> Self:
        if record.version != cls.VERSION:
            raise unsupported_version(record, (cls.VERSION,), sink="postgres sink", operator=operator)
        fields = record.fields
        return cls(str(fields["txn"]), _checked_table(fields["staging"], operator=operator),
                   _checked_table(fields["table"], operator=operator), tuple(fields["columns"]),
                   tuple(fields["keys"]), fields.get("checkpoint"))

    def merge_statement(self) -> str:
        """Move the staged rows into the target, the last one per key winning; takes ``txn`` as its parameter."""
        columns = ", ".join(_quote(c) for c in self.columns)
        keys = ", ".join(_quote(k) for k in self.keys)
        updates = ", ".join(f"{_quote(c)} = EXCLUDED.{_quote(c)}" for c in self.columns if c not in self.keys)
        action = f"DO UPDATE SET {updates}" if updates else "DO NOTHING"
        return (
            f"WITH staged AS (DELETE FROM {self.staging} WHERE {_TXN_COLUMN} = %s "  # noqa: S608 - checked names
            f"RETURNING {_SEQ_COLUMN}, {columns}) "
            f"INSERT INTO {self.table} ({columns}) SELECT DISTINCT ON ({keys}) {columns} FROM staged "
            f"ORDER BY {keys}, {_SEQ_COLUMN} DESC ON CONFLICT ({keys}) {action}"
        )


PostgresCommittable = PreparedTransaction | StagedTransaction
"""A committable of :class:`PostgresSink`: its version tells which (1: prepared, 2: staged)."""


class PostgresSink(TransactionalSink[PostgresCommittable]):
    """Write a stream into a PostgreSQL table, exactly once.

    It needs psycopg, which the ``postgres`` extra installs (``pip install 'onceflow[postgres]'``);
    without it the job fails before it starts, with a :class:`PlanError` that says so.

    Args:
        dsn: a libpq connection string or URI.
        table: the table name (letters, digits and ``_``; optionally ``schema.table``).
        mode: ``"append"`` (bulk ``COPY`` in prepared transactions) or
            ``"upsert"`` (insert or update on ``key_columns``, staged until
            the commit: an online feature table).
        key_columns: the unique key of an upsert.
        create: create the table from the first batch's Arrow schema (with a
            primary key on ``key_columns`` in upsert mode) if it does not exist.
        exactly_once: two-phase commit (the default); ``False`` writes with
            autocommit ``COPY`` (at-least-once), for comparison.
        lock_timeout_s: the longest a writer waits for a lock before its
            write fails (and the job restarts) instead of stalling the
            subtask; ``None`` waits forever.
    """

    def __init__(self, dsn: str, table: str, *, mode: str = "append", key_columns: Sequence[str] | None = None,
                 create: bool = False, exactly_once: bool = True, lock_timeout_s: float | None = 60.0) -> None:
        if mode not in ("append", "upsert"):
            msg = f"postgres sink: mode must be 'append' or 'upsert', got {mode!r}"
            raise PlanError(msg)
        if mode == "upsert" and not key_columns:
            msg = "postgres sink: upsert mode needs key_columns=[...] naming the table's unique key"
            raise PlanError(msg)
        if not all(_IDENTIFIER.match(part) for part in table.split(".")) or table.count(".") > 1:
            msg = f"postgres sink: table name {table!r} must be [schema.]name of letters, digits and '_'"
            raise PlanError(msg)
        if mode == "upsert" and not exactly_once:
            msg = "postgres sink: exactly_once=False is only for append mode"
            raise PlanError(msg)
        if lock_timeout_s is not None and lock_timeout_s <= 0:
            msg = f"postgres sink: lock_timeout_s must be > 0 or None, got {lock_timeout_s}; pass seconds"
            raise PlanError(msg)
        self.dsn = dsn
        self.table = table
        self.mode = mode
        self.key_columns = tuple(key_columns or ())
        self.create = create
        self.exactly_once = exactly_once
        self.lock_timeout_s = lock_timeout_s

    def __repr__(self) -> str:
        return (f"PostgresSink({redact_dsn(self.dsn)!r}, {self.table!r}, mode={self.mode!r}, "
                f"key_columns={list(self.key_columns)!r})")

    def scrubbed(self, error: BaseException) -> str:
        """``error``'s message without the DSN's secrets (a driver error may quote the connection string)."""
        return scrub(str(error), dsn_secrets(self.dsn))

    @staticmethod
    def transaction_name(ctx: SinkContext, transaction: int | str) -> str:
        """Name a transaction: ``onceflow:<job>:<operator>:<subtask>:<transaction>:<run>:<attempt>``.

        Args:
            ctx: where the writer runs.
            transaction: the checkpoint id, ``"end"``, or a staged transaction's ``w<token>.<n>``.

        Returns:
            The name, at most 199 bytes, each text field escaped (no ``:`` or quote inside a field).

        """
        return ":".join([
            "onceflow",
            escape_field(ctx.job, delimiter=":", limit=48),
            escape_field(ctx.operator, delimiter=":", limit=48),
            str(ctx.subtask),
            escape_field(str(transaction), delimiter=":", limit=24),
            escape_field(ctx.run, delimiter=":", limit=40),
            str(ctx.attempt),
        ])

    def staging_table(self, schema: pa.Schema) -> str:
        """The staging table of upsert mode for a stream of ``schema``, beside the target.

        The name ends with a hash of the target and the column definitions, so
        a job whose columns change stages into a new table and no table is
        ever altered while writers use it.
        """
        definitions = [f"{f.name} {_postgres_type(f.type, operator='', column=f.name)}" for f in schema]
        digest = hashlib.blake2b("\n".join([self.table, *definitions]).encode(), digest_size=5).hexdigest()
        schema_name, _, table = self.table.rpartition(".")
        name = f"{_STAGING_PREFIX}{table[:28]}_{digest}"
        return f"{schema_name}.{name}" if schema_name else name

    def prepare(self) -> None:
        """Check on the driver, before any writer starts, that the server can run two-phase commit.

        Raises:
            PlanError: psycopg is not installed, the server is unreachable, or it has
                ``max_prepared_transactions = 0`` and the sink appends exactly once (upsert mode
                needs no prepared transactions).
        """
        psycopg = _psycopg(self.table)
        try:
            with psycopg.connect(self.dsn, autocommit=True) as connection:
                setting = int(connection.execute("SHOW max_prepared_transactions").fetchone()[0])
        except psycopg.Error as error:
            msg = (f"postgres sink {self.table}: cannot connect to {redact_dsn(self.dsn)!r}: "
                   f"{scrub(str(error), dsn_secrets(self.dsn))}; check the dsn")
            raise PlanError(msg) from error
        if self.exactly_once and self.mode == "append" and setting == 0:
            msg = (
                f"postgres sink {self.table}: the server has max_prepared_transactions = 0, so it cannot "
                "pre-commit transactions; set max_prepared_transactions to at least the sink parallelism "
                "times 2 in postgresql.conf and restart it (or pass exactly_once=False for at-least-once)"
            )
            raise PlanError(msg)

    def create_writer(self, ctx: SinkContext) -> PostgresSinkWriter:
        """Return the writer of ``ctx.subtask`` (one connection, one open transaction)."""
        return PostgresSinkWriter(self, ctx)

    def create_committer(self, ctx: SinkContext) -> PostgresSinkCommitter:
        """Return a committer (it connects when it has something to do)."""
        return PostgresSinkCommitter(self, ctx)

    def read_committable(self, record: CommittableRecord, *, operator: str = "") -> PostgresCommittable:
        """Read a committable of this sink from a checkpoint: version 1 (prepared) or 2 (staged).

        Raises:
            SinkCommitError: another version, or a staged one naming a table that is no plain identifier.

        """
        if record.version == PreparedTransaction.VERSION:
            return PreparedTransaction.from_record(record, operator=operator)
        if record.version == StagedTransaction.VERSION:
            return StagedTransaction.from_record(record, operator=operator)
        readable = (PreparedTransaction.VERSION, StagedTransaction.VERSION)
        raise unsupported_version(record, readable, sink="postgres sink", operator=operator)


class _Transactions(ABC):
    """How one writer's rows reach the server and get pre-committed: one strategy per mode."""

    autocommit = False

    def start(self, connection: Any, schema: pa.Schema) -> None:  # noqa: B027 - optional hook
        """Prepare for a stream of ``schema`` (first batch, before any write; autocommit connection)."""

    @abstractmethod
    def write(self, connection: Any, batch: pa.RecordBatch) -> None:
        """Add ``batch`` to the open transaction."""

    @abstractmethod
    def pre_commit(self, connection: Any, checkpoint_id: int | None) -> list[PostgresCommittable]:
        """Make the open transaction durable and invisible; return its committables."""

    def reset(self) -> None:  # noqa: B027 - optional hook
        """Forget the open transaction (it was rolled back)."""


class _Autocommit(_Transactions):
    """At-least-once: every ``COPY`` commits at once; nothing is pre-committed."""

    autocommit = True

    def __init__(self, sink: PostgresSink) -> None:
        self._sink = sink

    def write(self, connection: Any, batch: pa.RecordBatch) -> None:
        _copy(connection, self._sink.table, batch)

    def pre_commit(self, connection: Any, checkpoint_id: int | None) -> list[PostgresCommittable]:
        return []


class _PreparedAppend(_Transactions):
    """Append mode: ``COPY`` into the target in one transaction, ``PREPARE TRANSACTION`` on the barrier."""

    def __init__(self, sink: PostgresSink, ctx: SinkContext) -> None:
        self._sink = sink
        self._ctx = ctx

    def write(self, connection: Any, batch: pa.RecordBatch) -> None:
        _copy(connection, self._sink.table, batch)

    def pre_commit(self, connection: Any, checkpoint_id: int | None) -> list[PostgresCommittable]:
        name = PostgresSink.transaction_name(self._ctx, checkpoint_id if checkpoint_id is not None else "end")
        connection.execute(f"PREPARE TRANSACTION '{name}'")
        return [PreparedTransaction(name)]


class _StagedUpsert(_Transactions):
    """Upsert mode: ``COPY`` into the staging table, ``COMMIT`` on the barrier; the committer merges.

    Guarded by the writer's caller (one thread at a time): ``_name``, ``_number``, ``_sequence``.
    """

    def __init__(self, sink: PostgresSink, ctx: SinkContext, token: str) -> None:
        self._sink = sink
        self._ctx = ctx
        self._token = token
        self._staging = ""
        self._columns: list[str] = []
        self._number = 0
        self._name = ""
        self._sequence = 0

    def start(self, connection: Any, schema: pa.Schema) -> None:
        operator = self._ctx.operator
        reserved = [name for name in schema.names if name in (_TXN_COLUMN, _SEQ_COLUMN)]
        if reserved:
            msg = (
                f"postgres sink {operator}: column {reserved[0]!r} is reserved for the staging table of "
                "upsert mode; rename it before the sink"
            )
            raise DataError(msg, operator=operator, column=reserved[0])
        psycopg = _psycopg(self._sink.table)
        columns = ", ".join(
            f"{_quote(f.name)} {_postgres_type(f.type, operator=operator, column=f.name)}" for f in schema)
        self._staging = self._sink.staging_table(schema)
        self._columns = list(schema.names)
        with connection.transaction():
            connection.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"onceflow:create:{self._staging}",))
            if connection.execute("SELECT to_regclass(%s)", (self._staging,)).fetchone()[0] is None:
                connection.execute(
                    f"CREATE TABLE {self._staging} ({_TXN_COLUMN} text NOT NULL, {_SEQ_COLUMN} bigint NOT NULL, "
                    f"{columns})")
                connection.execute(f"CREATE INDEX ON {self._staging} ({_TXN_COLUMN})")
                comment = f"onceflow: upsert rows for {self._sink.table}, staged until their checkpoint commits"
                connection.execute(psycopg.sql.SQL("COMMENT ON TABLE {} IS {}").format(
                    psycopg.sql.SQL(self._staging), psycopg.sql.Literal(comment)))
        # A merge of nothing checks, before any row is written, that the target
        # exists, has these columns and a unique key on key_columns.
        probe = StagedTransaction("", self._staging, self._sink.table, tuple(self._columns),
                                   self._sink.key_columns)
        try:
            connection.execute(probe.merge_statement(), (probe.txn,))
        except psycopg.errors.UndefinedTable as error:
            msg = f"postgres sink {operator}: table {self._sink.table} does not exist; create it or pass create=True"
            raise PlanError(msg) from error
        except psycopg.ProgrammingError as error:
            msg = (
                f"postgres sink {operator}: cannot upsert into {self._sink.table} on key "
                f"({', '.join(self._sink.key_columns)}): {_first_line(error)}; give the table a primary key or "
                "unique index on exactly key_columns, and the stream's columns"
            )
            raise PlanError(msg) from error

    def write(self, connection: Any, batch: pa.RecordBatch) -> None:
        if not self._name:
            self._name = PostgresSink.transaction_name(self._ctx, f"w{self._token}.{self._number}")
            self._number += 1
            self._sequence = 0
        rows = batch.num_rows
        tagged = pa.RecordBatch.from_arrays(
            [pa.repeat(self._name, rows),
             pa.array(np.arange(self._sequence, self._sequence + rows, dtype=np.int64)),
             *batch.columns],
            names=[_TXN_COLUMN, _SEQ_COLUMN, *batch.schema.names])
        _copy(connection, self._staging, tagged)
        self._sequence += rows

    def pre_commit(self, connection: Any, checkpoint_id: int | None) -> list[PostgresCommittable]:
        connection.commit()
        name, self._name = self._name, ""
        return [StagedTransaction(name, self._staging, self._sink.table, tuple(self._columns),
                                  tuple(self._sink.key_columns), checkpoint_id)]

    def reset(self) -> None:
        self._name = ""


class PostgresSinkWriter(SinkWriter[PostgresCommittable]):
    """Writes one subtask's rows into its open transaction.

    Attributes:
        rows_written: the rows this writer received, committed or not.
    """

    def __init__(self, sink: PostgresSink, ctx: SinkContext) -> None:
        self._sink = sink
        self._ctx = ctx
        self._transactions: _Transactions
        if not sink.exactly_once:
            self._transactions = _Autocommit(sink)
        elif sink.mode == "upsert":
            self._transactions = _StagedUpsert(sink, ctx, uuid.uuid4().hex[:8])
        else:
            self._transactions = _PreparedAppend(sink, ctx)
        self._connection: Any = None
        self._columns: list[str] | None = None
        self._dirty = False
        self.rows_written = 0

    def _connect(self) -> Any:
        """The writer's connection, opened with its lock timeout; not in autocommit unless at-least-once."""
        if self._connection is None or self._connection.closed:
            connection = _psycopg(self._sink.table).connect(self._sink.dsn, autocommit=True)
            timeout = self._sink.lock_timeout_s
            connection.execute("SELECT set_config('lock_timeout', %s, false)",
                                (f"{round(timeout * 1000)}ms" if timeout is not None else "0",))
            connection.autocommit = self._transactions.autocommit
            self._connection = connection
        return self._connection

    def _ensure_table(self, schema: pa.Schema) -> None:
        psycopg = _psycopg(self._sink.table)
        sink = self._sink
        definitions = [f"{_quote(f.name)} {_postgres_type(f.type, operator=self._ctx.operator, column=f.name)}"
                       for f in schema]
        if sink.mode == "upsert":
            definitions.append(f"PRIMARY KEY ({', '.join(_quote(k) for k in sink.key_columns)})")
        statement = f"CREATE TABLE IF NOT EXISTS {sink.table} ({', '.join(definitions)})"
        # Outside the sink's transaction: DDL inside a prepared transaction would hold
        # catalog locks that block every other subtask until the checkpoint commits.
        # Subtasks create it at the same moment, and two concurrent CREATE TABLE IF NOT
        # EXISTS race on the catalog (DuplicateObject on the row type), so they take a
        # transaction-scoped advisory lock on the table name first.
        with psycopg.connect(sink.dsn) as connection, connection.transaction():
            connection.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"onceflow:create:{sink.table}",))
            connection.execute(statement)

    def _start(self, schema: pa.Schema) -> None:
        """Check the first batch's columns, create the table where asked, set up the mode."""
        missing = [k for k in self._sink.key_columns if k not in schema.names]
        if missing:
            msg = (
                f"postgres sink {self._ctx.operator}: key column {missing[0]!r} is not in the stream "
                f"(columns: {', '.join(schema.names)}); name key_columns the stream has"
            )
            raise DataError(msg, operator=self._ctx.operator, column=missing[0])
        if self._sink.create:
            self._ensure_table(schema)
        with _psycopg(self._sink.table).connect(self._sink.dsn, autocommit=True) as connection:
            self._transactions.start(connection, schema)
        self._columns = schema.names

    def write(self, batch: pa.RecordBatch) -> None:
        """Add ``batch`` to the open transaction.

        Raises:
            DataError: the batch lacks a key column or has other columns than the first batch.
            PlanError: the table does not exist (and ``create`` is off), or cannot take upserts on the key.
            SinkCommitError: the write waited longer than ``lock_timeout_s`` for a lock.

        """
        if batch.num_rows == 0:
            return
        if self._columns is None:
            self._start(batch.schema)
        elif batch.schema.names != self._columns:
            msg = (
                f"postgres sink {self._ctx.operator}: a batch has columns {batch.schema.names}, earlier ones "
                f"{self._columns}; give every batch the same columns"
            )
            raise DataError(msg, operator=self._ctx.operator)
        psycopg = _psycopg(self._sink.table)
        connection = self._connect()
        try:
            self._transactions.write(connection, batch)
        except psycopg.errors.UndefinedTable as error:
            msg = (
                f"postgres sink {self._ctx.operator}: table {self._sink.table} does not exist; "
                "create it or pass create=True"
            )
            raise PlanError(msg) from error
        except psycopg.errors.LockNotAvailable as error:
            msg = (
                f"postgres sink {self._ctx.operator}: a write into {self._sink.table} waited more than "
                f"{self._sink.lock_timeout_s} s for a lock ({_first_line(error)}); find the session holding it "
                "in pg_locks (a table with a unique key the stream repeats waits for earlier transactions); "
                "the job restarts from its last checkpoint"
            )
            raise SinkCommitError(msg) from error
        self._dirty = True
        self.rows_written += batch.num_rows

    def flush(self, end_of_input: bool) -> None:
        """Nothing is buffered: every batch went to the server when written."""

    def prepare_commit(self, checkpoint_id: int | None = None) -> list[PostgresCommittable]:
        """Pre-commit the rows written since the last call; return their committable (none if no rows)."""
        if not self._dirty:
            return []
        committables = self._transactions.pre_commit(self._connect(), checkpoint_id)
        self._dirty = False
        return committables

    def abort(self) -> None:
        """Roll back the open transaction."""
        if self._connection is not None and not self._connection.closed:
            try:
                self._connection.rollback()
            finally:
                self._connection.close()
        self._transactions.reset()
        self._dirty = False


class PostgresSinkCommitter(Committer[PostgresCommittable]):
    """Commits and aborts prepared and staged transactions by name, idempotently, with retries."""

    def __init__(self, sink: PostgresSink, ctx: SinkContext) -> None:
        self._sink = sink
        self._ctx = ctx

    def _resolve(self, transactions: Sequence[PostgresCommittable], commit: bool) -> None:
        """Commit (or abort) ``transactions`` in order, each once; retry lost connections and deadlocks."""
        if not transactions:
            return
        psycopg = _psycopg(self._sink.table)
        verb = "commit" if commit else "abort"
        delay = 0.1
        for attempt in range(1, _COMMIT_ATTEMPTS + 1):
            try:
                with psycopg.connect(self._sink.dsn, autocommit=True) as connection:
                    prepared = {row[0] for row in connection.execute(
                        "SELECT gid FROM pg_prepared_xacts WHERE database = current_database()")}
                    done = 0
                    for transaction in transactions:
                        if isinstance(transaction, PreparedTransaction):
                            if transaction.gid not in prepared:  # resolved before
                                continue
                            connection.execute(f"{'COMMIT' if commit else 'ROLLBACK'} PREPARED '{transaction.gid}'")
                        elif commit:
                            connection.execute(transaction.merge_statement(), (transaction.txn,))
                        else:
                            connection.execute(
                                f"DELETE FROM {transaction.staging} WHERE {_TXN_COLUMN} = %s",  # noqa: S608
                                (transaction.txn,))
                        done += 1
                        if commit and done == 1:
                            crash_point(self._ctx.job, "sink.mid_commit", self._ctx.subtask)
                return
            except psycopg.OperationalError as error:
                if attempt == _COMMIT_ATTEMPTS:
                    msg = (
                        f"postgres sink {self._ctx.operator}: {verb} of {len(transactions)} transaction(s) "
                        f"failed {attempt} times ({self._sink.scrubbed(error)}); they stay pre-committed and will "
                        "be resolved when the job restarts from its last checkpoint"
                    )
                    raise SinkCommitError(msg) from error
                log.warning("postgres sink %s: %s failed (%s); retrying in %.1f s", self._ctx.operator,
                            verb, self._sink.scrubbed(error), delay)
                time.sleep(delay)
                delay *= 2
            except psycopg.Error as error:
                msg = (
                    f"postgres sink {self._ctx.operator}: the server refused to {verb} a transaction of "
                    f"{self._sink.table} ({_first_line(error)}); it stays pre-committed: fix the table (its "
                    "constraints or column types) and resume the job from its last checkpoint"
                )
                raise SinkCommitError(msg) from error

    def commit(self, committables: list[PostgresCommittable]) -> None:
        """Publish each transaction, in order; one resolved before is skipped."""
        self._resolve(committables, commit=True)

    def abort(self, committables: list[PostgresCommittable]) -> None:
        """Discard each transaction still pre-committed (committed ones stay)."""
        self._resolve(committables, commit=False)

    def abort_lingering(self, keep: list[PostgresCommittable]) -> None:
        """Discard every prepared and staged transaction of this job's sink operator except ``keep``.

        Every subtask, run and attempt of the operator is included; names are
        matched by their job and operator fields, so other jobs and operators
        in the database are never touched.
        """
        kept = {c.name for c in keep}
        lingering = [t for t in self._lingering() if t.name not in kept]
        if lingering:
            log.info("postgres sink %s: aborting %d lingering transaction(s)", self._ctx.operator, len(lingering))
        self._resolve(lingering, commit=False)

    def lingering(self) -> list[str]:
        """Name every prepared or staged transaction of this job's sink operator, sorted."""
        return sorted(t.name for t in self._lingering())

    def _lingering(self) -> list[PostgresCommittable]:
        prefix = ":".join(PostgresSink.transaction_name(self._ctx, "").split(":")[:3]) + ":"
        legacy_prefix = f"onceflow:{self._ctx.job}:"
        schema, _, _ = self._sink.table.rpartition(".")
        found: list[PostgresCommittable] = []
        with _psycopg(self._sink.table).connect(self._sink.dsn, autocommit=True) as connection:
            for (gid,) in connection.execute(
                    "SELECT gid FROM pg_prepared_xacts WHERE database = current_database() "
                    "AND (starts_with(gid, %s) OR starts_with(gid, %s))", (prefix, legacy_prefix)):
                found.append(PreparedTransaction(gid))
            stagings = connection.execute(
                "SELECT schemaname, tablename FROM pg_tables WHERE schemaname = coalesce(%s, current_schema()) "
                "AND starts_with(tablename, %s)", (schema or None, _STAGING_PREFIX)).fetchall()
            for schema_name, table in stagings:
                staging = f"{_quote(schema_name)}.{_quote(table)}"
                for (txn,) in connection.execute(
                        f"SELECT DISTINCT {_TXN_COLUMN} FROM {staging} "  # noqa: S608 - names from the catalog
                        f"WHERE starts_with({_TXN_COLUMN}, %s)", (prefix,)):
                    found.append(StagedTransaction(txn, staging))
        return [t for t in found if self._owns(t.name)]

    def _owns(self, name: str) -> bool:
        """Whether ``name`` is a transaction of this job's sink operator, field by field.

        Names of earlier onceflow versions, ``onceflow:<job>:<subtask>:<checkpoint>``,
        carried no operator: those of this job count as the operator's.
        """
        fields = split_fields(name, delimiter=":", count=_NAME_FIELDS)
        if fields is None:
            legacy = split_fields(name, delimiter=":", count=_LEGACY_NAME_FIELDS)
            return (legacy is not None and legacy[0] == "onceflow" and legacy[1] == self._ctx.job
                    and legacy[2].isdigit() and (legacy[3].isdigit() or legacy[3] == "end"))
        mine = PostgresSink.transaction_name(self._ctx, "").split(":")
        return fields[:3] == mine[:3] and fields[3].isdigit() and fields[6].isdigit()
