"""PostgresSink against a real PostgreSQL server: prepare, commit, abort, recover, upsert."""

from __future__ import annotations

import concurrent.futures
import itertools
import threading

import psycopg
import pyarrow as pa
import pytest

from checkpoint.errors import DataError, PlanError
from checkpoint.two_phase_commit import SinkContext
from operators.sinks.postgres import PostgresSink
from tests.postgres_server import PostgresServer

_names = itertools.count()


def table_name() -> str:
    return f"t_{next(_names)}"


def rows(dsn: str, table: str, order: str = "1") -> list[tuple]:
    with psycopg.connect(dsn) as connection:
        return connection.execute(f"SELECT * FROM {table} ORDER BY {order}").fetchall()


def prepared(dsn: str) -> list[str]:
    with psycopg.connect(dsn) as connection:
        return sorted(r[0] for r in connection.execute("SELECT gid FROM pg_prepared_xacts"))


BATCH = pa.record_batch({"user_id": [1, 2, 3], "amount": [1.5, 2.5, None], "name": ["a", "b,c", ""]})


def test_append_is_invisible_until_commit_and_commit_is_idempotent(postgres: PostgresServer) -> None:
    table = table_name()
    sink = PostgresSink(postgres.dsn, table, create=True)
    sink.prepare()
    ctx = SinkContext("job1", "sink_1", subtask=0, parallelism=1)
    writer = sink.create_writer(ctx)
    writer.write(BATCH)
    writer.write(BATCH.slice(0, 1))
    committables = writer.prepare_commit(7)
    assert committables == [{"v": 1, "gid": "onceflow:job1:0:7"}]
    assert rows(postgres.dsn, table) == []
    assert prepared(postgres.dsn) == ["onceflow:job1:0:7"]
    committer = sink.create_committer(ctx)
    committer.commit(committables)
    committer.commit(committables)  # idempotent
    assert rows(postgres.dsn, table, "user_id, amount") == [
        (1, 1.5, "a"), (1, 1.5, "a"), (2, 2.5, "b,c"), (3, None, "")]
    assert prepared(postgres.dsn) == []
    assert writer.prepare_commit(8) == []  # nothing written since


def test_abort_and_abort_lingering_roll_back(postgres: PostgresServer) -> None:
    table = table_name()
    sink = PostgresSink(postgres.dsn, table, create=True)
    ctx = SinkContext("job2", "sink_1", subtask=1, parallelism=2)
    writer = sink.create_writer(ctx)
    first, second, third = [], [], []
    for checkpoint, bucket in ((1, first), (2, second), (3, third)):
        writer.write(BATCH.slice(checkpoint - 1, 1))
        bucket += writer.prepare_commit(checkpoint)
    other = sink.create_writer(SinkContext("job2", "sink_1", subtask=0, parallelism=2))
    other.write(BATCH)
    kept_elsewhere = other.prepare_commit(3)
    committer = sink.create_committer(ctx)
    committer.abort(third)
    committer.abort_lingering(keep=first)  # checkpoint 1 was restored; 2 lingers
    assert prepared(postgres.dsn) == ["onceflow:job2:0:3", "onceflow:job2:1:1"]
    committer.commit(first)
    sink.create_committer(SinkContext("job2", "sink_1", 0, 2)).commit(kept_elsewhere)
    assert [r[0] for r in rows(postgres.dsn, table)] == [1, 1, 2, 3]
    assert prepared(postgres.dsn) == []


def test_upsert_keeps_the_last_value_per_key(postgres: PostgresServer) -> None:
    table = table_name()
    sink = PostgresSink(postgres.dsn, table, mode="upsert", key_columns=["user_id"], create=True)
    ctx = SinkContext("job3", "sink_1")
    writer = sink.create_writer(ctx)
    writer.write(pa.record_batch({"user_id": [1, 2, 1], "total": [10.0, 20.0, 11.0]}))
    committer = sink.create_committer(ctx)
    committer.commit(writer.prepare_commit(1))
    writer.write(pa.record_batch({"user_id": [2, 3], "total": [21.0, 30.0]}))
    committer.commit(writer.prepare_commit(2))
    assert rows(postgres.dsn, table) == [(1, 11.0), (2, 21.0), (3, 30.0)]


def test_subtasks_creating_the_table_at_once_do_not_collide(postgres: PostgresServer) -> None:
    # Concurrent CREATE TABLE IF NOT EXISTS races on the catalog in PostgreSQL
    # (DuplicateObject on the row type); every subtask creates it on its first batch.
    subtasks = 8
    for _ in range(4):
        table = table_name()
        sink = PostgresSink(postgres.dsn, table, mode="upsert", key_columns=["user_id"], create=True)
        start = threading.Barrier(subtasks)

        def first_batch(subtask: int, sink: PostgresSink = sink, start: threading.Barrier = start) -> list:
            writer = sink.create_writer(SinkContext("race", "sink_1", subtask=subtask, parallelism=subtasks))
            start.wait()
            writer.write(pa.record_batch({"user_id": [subtask], "total": [float(subtask)]}))
            return writer.prepare_commit(1)

        with concurrent.futures.ThreadPoolExecutor(subtasks) as pool:
            committables = [c for result in pool.map(first_batch, range(subtasks)) for c in result]
        sink.create_committer(SinkContext("race", "sink_1")).commit(committables)
        assert rows(postgres.dsn, table) == [(s, float(s)) for s in range(subtasks)]


def test_errors_are_clear(postgres: PostgresServer) -> None:
    with pytest.raises(PlanError, match="upsert mode needs key_columns"):
        PostgresSink(postgres.dsn, "t", mode="upsert")
    with pytest.raises(PlanError, match="table name"):
        PostgresSink(postgres.dsn, "t; drop table x")
    writer = PostgresSink(postgres.dsn, "t_missing").create_writer(SinkContext("job4", "sink_9"))
    with pytest.raises(PlanError, match="table t_missing does not exist; create it or pass create=True"):
        writer.write(BATCH)
    upsert = PostgresSink(postgres.dsn, table_name(), mode="upsert", key_columns=["account"], create=True)
    with pytest.raises(DataError, match="sink_9: key column 'account' is not in the stream"):
        upsert.create_writer(SinkContext("job4", "sink_9")).write(BATCH)
    with pytest.raises(PlanError, match="cannot connect"):
        PostgresSink("host=127.0.0.1 port=1 connect_timeout=2", "t").prepare()


def test_a_server_without_prepared_transactions_is_refused_at_start_up() -> None:
    server = PostgresServer(max_prepared_transactions=0).start()
    try:
        with pytest.raises(PlanError, match="max_prepared_transactions = 0.*set max_prepared_transactions"):
            PostgresSink(server.dsn, "t").prepare()
        PostgresSink(server.dsn, "t", exactly_once=False).prepare()  # at-least-once needs no 2PC
    finally:
        server.destroy()
