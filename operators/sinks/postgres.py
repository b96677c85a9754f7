"""A PostgreSQL sink that commits in two phases with prepared transactions.

Each sink subtask writes a checkpoint's rows into one open transaction (bulk
``COPY`` in CSV, or an ``INSERT ... ON CONFLICT DO UPDATE`` per batch in upsert
mode). On the checkpoint barrier it runs ``PREPARE TRANSACTION
'onceflow:<job>:<subtask>:<checkpoint>'``: the rows are durable in the server
but invisible. When the checkpoint is complete the committer runs ``COMMIT
PREPARED``, from any connection; a transaction that is no longer prepared was
committed before, so committing twice is a no-op. On recovery, the
transactions recorded in the restored checkpoint are committed again and every
other prepared transaction of this job's subtask is rolled back
(``ROLLBACK PREPARED``).

The server must allow prepared transactions (``max_prepared_transactions`` at
least the sink's parallelism, times the checkpoints in flight); a server that
does not is reported when the job starts.

``exactly_once=False`` writes with plain autocommit ``COPY`` instead
(at-least-once after a failure: rows written since the last checkpoint are
written again); it is the baseline of the sink benchmark.

Example:
    >>> sink = PostgresSink("host=127.0.0.1 dbname=features", "user_windows",
    ...                     mode="upsert", key_columns=["user_id", "window_start"], create=True)
    >>> sink.transaction_name("features", 1, 7)
    'onceflow:features:1:7'
"""

from __future__ import annotations

import io
import logging
import re
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv

from checkpoint.errors import DataError, PlanError, SinkCommitError
from checkpoint.failpoints import crash_point
from checkpoint.two_phase_commit import Committable, Committer, SinkContext, SinkWriter, TransactionalSink

__all__ = ["PostgresSink", "PostgresSinkCommitter", "PostgresSinkWriter"]

log = logging.getLogger("onceflow")

COMMITTABLE_VERSION = 1
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_COMMIT_ATTEMPTS = 6


def _psycopg() -> Any:
    import psycopg

    return psycopg


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


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


class PostgresSink(TransactionalSink):
    """Write a stream into a PostgreSQL table, exactly once.

    Args:
        dsn: a libpq connection string or URI.
        table: the table name (letters, digits and ``_``; optionally ``schema.table``).
        mode: ``"append"`` (bulk ``COPY``) or ``"upsert"`` (insert or update on
            ``key_columns``: an online feature table).
        key_columns: the unique key of an upsert.
        create: create the table from the first batch's Arrow schema (with a
            primary key on ``key_columns`` in upsert mode) if it does not exist.
        exactly_once: two-phase commit (the default); ``False`` writes with
            autocommit ``COPY`` (at-least-once), for comparison.
    """

    def __init__(self, dsn: str, table: str, *, mode: str = "append", key_columns: Sequence[str] | None = None,
                 create: bool = False, exactly_once: bool = True) -> None:
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
        self.dsn = dsn
        self.table = table
        self.mode = mode
        self.key_columns = tuple(key_columns or ())
        self.create = create
        self.exactly_once = exactly_once

    @staticmethod
    def transaction_name(job: str, subtask: int, checkpoint_id: int | str) -> str:
        """The prepared transaction's global id: ``onceflow:<job>:<subtask>:<checkpoint>``."""
        return f"onceflow:{job}:{subtask}:{checkpoint_id}"

    def prepare(self) -> None:
        """Check on the driver, before any writer starts, that the server can run two-phase commit.

        Raises:
            PlanError: the server is unreachable or has ``max_prepared_transactions = 0``.
        """
        psycopg = _psycopg()
        try:
            with psycopg.connect(self.dsn, autocommit=True) as connection:
                setting = int(connection.execute("SHOW max_prepared_transactions").fetchone()[0])
        except psycopg.Error as error:
            msg = f"postgres sink {self.table}: cannot connect to {self.dsn!r}: {error}; check the dsn"
            raise PlanError(msg) from error
        if self.exactly_once and setting == 0:
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


class PostgresSinkWriter(SinkWriter):
    """Writes one subtask's rows into its open transaction."""

    def __init__(self, sink: PostgresSink, ctx: SinkContext) -> None:
        self._sink = sink
        self._ctx = ctx
        self._connection: Any = None
        self._columns: list[str] | None = None
        self._schema: pa.Schema | None = None
        self._dirty = False
        self.rows_written = 0

    def _connect(self) -> Any:
        if self._connection is None or self._connection.closed:
            self._connection = _psycopg().connect(self._sink.dsn, autocommit=not self._sink.exactly_once)
        return self._connection

    def _ensure_table(self, schema: pa.Schema) -> None:
        psycopg = _psycopg()
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

    def write(self, batch: pa.RecordBatch) -> None:
        """Add ``batch`` to the open transaction."""
        if batch.num_rows == 0:
            return
        if self._schema is None:
            missing = [k for k in self._sink.key_columns if k not in batch.schema.names]
            if missing:
                msg = (
                    f"postgres sink {self._ctx.operator}: key column {missing[0]!r} is not in the stream "
                    f"(columns: {', '.join(batch.schema.names)}); name key_columns the stream has"
                )
                raise DataError(msg, operator=self._ctx.operator, column=missing[0])
            if self._sink.create:
                self._ensure_table(batch.schema)
            self._schema = batch.schema
            self._columns = batch.schema.names
        elif batch.schema.names != self._columns:
            msg = (
                f"postgres sink {self._ctx.operator}: a batch has columns {batch.schema.names}, earlier ones "
                f"{self._columns}; give every batch the same columns"
            )
            raise DataError(msg, operator=self._ctx.operator)
        connection = self._connect()
        try:
            if self._sink.mode == "upsert":
                self._upsert(connection, batch)
            else:
                self._copy(connection, batch)
        except _psycopg().errors.UndefinedTable as error:
            msg = (
                f"postgres sink {self._ctx.operator}: table {self._sink.table} does not exist; "
                "create it or pass create=True"
            )
            raise PlanError(msg) from error
        self._dirty = True
        self.rows_written += batch.num_rows

    def _copy(self, connection: Any, batch: pa.RecordBatch) -> None:
        buffer = io.BytesIO()
        pcsv.write_csv(batch, buffer, pcsv.WriteOptions(include_header=False, quoting_style="needed"))
        columns = ", ".join(_quote(c) for c in batch.schema.names)
        with connection.cursor() as cursor, cursor.copy(
                f"COPY {self._sink.table} ({columns}) FROM STDIN (FORMAT csv)") as copy:
            copy.write(buffer.getvalue())

    def _upsert(self, connection: Any, batch: pa.RecordBatch) -> None:
        keys = list(self._sink.key_columns)
        table = pa.Table.from_batches([batch])
        # ON CONFLICT cannot touch a row twice in one statement: keep each key's last row.
        numbered = table.append_column("__row", pa.array(range(table.num_rows), pa.int64()))
        last = numbered.group_by(keys, use_threads=False).aggregate([("__row", "max")])["__row_max"]
        if len(last) != table.num_rows:
            table = table.take(np.sort(last.to_numpy()))
        names = table.schema.names
        types = [_postgres_type(f.type, operator=self._ctx.operator, column=f.name) for f in table.schema]
        arrays = ", ".join(f"%s::{t}[]" for t in types)
        updates = ", ".join(f"{_quote(c)} = EXCLUDED.{_quote(c)}" for c in names if c not in keys)
        action = f"DO UPDATE SET {updates}" if updates else "DO NOTHING"
        statement = (
            f"INSERT INTO {self._sink.table} ({', '.join(_quote(c) for c in names)}) "  # noqa: S608 - checked names
            f"SELECT * FROM unnest({arrays}) ON CONFLICT ({', '.join(_quote(k) for k in keys)}) {action}"
        )
        connection.execute(statement, [table.column(c).to_pylist() for c in names])

    def flush(self, end_of_input: bool) -> None:
        """Nothing is buffered: every batch went to the server when written."""

    def prepare_commit(self, checkpoint_id: int | None = None) -> list[Committable]:
        """``PREPARE TRANSACTION`` the rows written since the last call; return its name."""
        if not self._sink.exactly_once or not self._dirty:
            return []
        name = PostgresSink.transaction_name(self._ctx.job, self._ctx.subtask,
                                             checkpoint_id if checkpoint_id is not None else "end")
        connection = self._connect()
        connection.execute(f"PREPARE TRANSACTION '{name}'")
        self._dirty = False
        return [{"v": COMMITTABLE_VERSION, "gid": name}]

    def abort(self) -> None:
        """Roll back the open transaction."""
        if self._connection is not None and not self._connection.closed:
            try:
                self._connection.rollback()
            finally:
                self._connection.close()
        self._dirty = False


class PostgresSinkCommitter(Committer):
    """Commits and rolls back prepared transactions by name, idempotently, with retries."""

    def __init__(self, sink: PostgresSink, ctx: SinkContext) -> None:
        self._sink = sink
        self._ctx = ctx

    def _names(self, committables: list[Committable]) -> list[str]:
        names = []
        for committable in committables:
            if committable.get("v") != COMMITTABLE_VERSION:
                msg = (
                    f"postgres sink {self._ctx.operator}: committable version {committable.get('v')!r} is not "
                    f"supported (this onceflow reads version {COMMITTABLE_VERSION}); resolve the checkpoint "
                    "with the onceflow version that wrote it"
                )
                raise SinkCommitError(msg)
            names.append(str(committable["gid"]))
        return names

    def _resolve(self, names: list[str], verb: str) -> None:
        """Run ``<verb> PREPARED`` for every name still prepared, retrying lost connections."""
        if not names:
            return
        psycopg = _psycopg()
        delay = 0.1
        for attempt in range(1, _COMMIT_ATTEMPTS + 1):
            try:
                with psycopg.connect(self._sink.dsn, autocommit=True) as connection:
                    prepared = {row[0] for row in connection.execute(
                        "SELECT gid FROM pg_prepared_xacts WHERE database = current_database()")}
                    done = 0
                    for name in names:
                        if name in prepared:  # not prepared any more: resolved before
                            connection.execute(f"{verb} PREPARED '{name}'")
                            done += 1
                            if verb == "COMMIT" and done == 1:
                                crash_point(self._ctx.job, "sink.mid_commit", self._ctx.subtask)
                return
            except psycopg.OperationalError as error:
                if attempt == _COMMIT_ATTEMPTS:
                    msg = (
                        f"postgres sink {self._ctx.operator}: {verb.lower()} of {len(names)} prepared "
                        f"transaction(s) failed {attempt} times ({error}); they stay prepared and will be "
                        "resolved when the job restarts from its last checkpoint"
                    )
                    raise SinkCommitError(msg) from error
                log.warning("postgres sink %s: %s failed (%s); retrying in %.1f s", self._ctx.operator,
                            verb, error, delay)
                time.sleep(delay)
                delay *= 2

    def commit(self, committables: list[Committable]) -> None:
        """``COMMIT PREPARED`` each transaction; one no longer prepared was committed already."""
        self._resolve(self._names(committables), "COMMIT")

    def abort(self, committables: list[Committable]) -> None:
        """``ROLLBACK PREPARED`` each transaction still prepared."""
        self._resolve(self._names(committables), "ROLLBACK")

    def abort_lingering(self, keep: list[Committable]) -> None:
        """Roll back every prepared transaction of this job's subtask except ``keep``."""
        if not self._sink.exactly_once:
            return
        kept = set(self._names(keep))
        prefix = PostgresSink.transaction_name(self._ctx.job, self._ctx.subtask, "")
        psycopg = _psycopg()
        with psycopg.connect(self._sink.dsn, autocommit=True) as connection:
            rows = connection.execute(
                "SELECT gid FROM pg_prepared_xacts WHERE database = current_database() AND starts_with(gid, %s)",
                [prefix]).fetchall()
        lingering = [gid for (gid,) in rows if gid not in kept]
        if lingering:
            log.info("postgres sink %s: rolling back %d lingering transaction(s) of an earlier attempt",
                     self._ctx.operator, len(lingering))
        self._resolve(lingering, "ROLLBACK")
