"""PostgresSink against a real PostgreSQL server: prepare, commit, abort, recover, upsert."""

from __future__ import annotations

import concurrent.futures
import itertools
import threading

import psycopg
import pyarrow as pa
import pytest

from onceflow.checkpoint.two_phase_commit import SinkContext
from onceflow.errors import DataError, PlanError, SinkCommitError
from onceflow.operators.sinks.postgres import PostgresSink, PreparedTransaction
from tests.helpers import wait_until
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
    assert committables == [PreparedTransaction("onceflow:job1:sink_1:0:7::0")]
    assert committables[0].to_record().to_dict() == {"v": 1, "gid": "onceflow:job1:sink_1:0:7::0"}
    assert rows(postgres.dsn, table) == []
    assert prepared(postgres.dsn) == ["onceflow:job1:sink_1:0:7::0"]
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
    ctx = SinkContext("job2", "sink_1", subtask=1, parallelism=2, run="r1", attempt=1)
    writer = sink.create_writer(ctx)
    first, second, third = [], [], []
    for checkpoint, bucket in ((1, first), (2, second), (3, third)):
        writer.write(BATCH.slice(checkpoint - 1, 1))
        bucket += writer.prepare_commit(checkpoint)
    other = sink.create_writer(SinkContext("job2", "sink_1", subtask=0, parallelism=2, run="r1", attempt=1))
    other.write(BATCH)
    other_first = other.prepare_commit(1)
    other.write(BATCH)
    other.prepare_commit(2)
    earlier = sink.create_writer(SinkContext("job2", "sink_1", subtask=0, parallelism=2, run="r1", attempt=0))
    earlier.write(BATCH)
    earlier.prepare_commit(2)  # an earlier attempt's transaction
    committer = sink.create_committer(SinkContext("job2", "sink_1", run="r1", attempt=2))
    committer.abort(third)
    committer.abort(third)  # idempotent
    assert len(committer.lingering()) == 5
    committer.abort_lingering(keep=first + other_first)  # checkpoint 1 was restored; the rest lingers
    assert prepared(postgres.dsn) == ["onceflow:job2:sink_1:0:1:r1:1", "onceflow:job2:sink_1:1:1:r1:1"]
    committer.abort_lingering(keep=first + other_first)  # idempotent
    committer.commit(first + other_first)
    assert [r[0] for r in rows(postgres.dsn, table)] == [1, 1, 2, 3]
    assert prepared(postgres.dsn) == []
    assert committer.lingering() == []


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
        PostgresSink(server.dsn, "t", mode="upsert", key_columns=["k"]).prepare()  # nor does a staged upsert
    finally:
        server.destroy()


def test_two_sink_operators_of_one_job_in_one_database_do_not_collide(postgres: PostgresServer) -> None:
    tables = [table_name(), table_name()]
    contexts = [SinkContext("job5", "sink_1"), SinkContext("job5", "sink_2")]
    sinks = [PostgresSink(postgres.dsn, table, create=True) for table in tables]
    committables = []
    for sink, ctx in zip(sinks, contexts, strict=True):
        writer = sink.create_writer(ctx)
        writer.write(BATCH)
        committables.append(writer.prepare_commit(1))  # same job, subtask and checkpoint
    sinks[0].create_committer(contexts[0]).abort_lingering(keep=[])
    sinks[1].create_committer(contexts[1]).commit(committables[1])
    assert rows(postgres.dsn, tables[0]) == []
    assert [r[0] for r in rows(postgres.dsn, tables[1])] == [1, 2, 3]
    assert prepared(postgres.dsn) == []


def lock_waits(dsn: str) -> int:
    with psycopg.connect(dsn) as connection:
        return connection.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'").fetchone()[0]


def test_an_upsert_never_waits_for_an_aborted_checkpoints_transaction(postgres: PostgresServer) -> None:
    table = table_name()
    sink = PostgresSink(postgres.dsn, table, mode="upsert", key_columns=["user_id"], create=True)
    ctx = SinkContext("job6", "sink_1")
    writer = sink.create_writer(ctx)
    writer.write(pa.record_batch({"user_id": [1, 2], "total": [10.0, 20.0]}))
    first = writer.prepare_commit(1)  # checkpoint 1 is then aborted: nobody commits it yet
    done = threading.Event()

    def hot_key_again() -> None:
        writer.write(pa.record_batch({"user_id": [1], "total": [11.0]}))
        done.set()

    thread = threading.Thread(target=hot_key_again, daemon=True)
    thread.start()
    wait_until(lambda: done.is_set() or lock_waits(postgres.dsn) > 0, what="the write to end or to wait on a lock")
    blocked = not done.is_set()
    if blocked:  # free the writer so that the test ends
        committer = sink.create_committer(ctx)
        committer.abort(first)
        thread.join(timeout=30)
    assert not blocked, "the upsert waited on a row lock of checkpoint 1's uncommitted transaction"
    second = writer.prepare_commit(2)
    sink.create_committer(ctx).commit(first + second)  # checkpoint 2 completes: both commit, in order
    assert rows(postgres.dsn, table) == [(1, 11.0), (2, 20.0)]
    assert prepared(postgres.dsn) == []


def test_names_carry_operator_run_and_attempt_and_fit_any_name(postgres: PostgresServer) -> None:
    table = table_name()
    sink = PostgresSink(postgres.dsn, table, create=True)
    odd = SinkContext("it's:a" + "j" * 300, "op:'x'" + "o" * 300, subtask=2, run="r" * 100, attempt=3)
    contexts = [SinkContext("job7", "sink_1", run="a"), SinkContext("job7", "sink_1", run="b"),
                SinkContext("job7", "sink_1", run="b", attempt=1), odd]
    committables = []
    for ctx in contexts:  # the same job, operator, subtask and checkpoint: only run or attempt differ
        writer = sink.create_writer(ctx)
        writer.write(BATCH)
        committables += writer.prepare_commit(5)
    names = [c.gid for c in committables]
    assert names[:3] == ["onceflow:job7:sink_1:0:5:a:0", "onceflow:job7:sink_1:0:5:b:0",
                         "onceflow:job7:sink_1:0:5:b:1"]
    assert len(names[3].encode()) < 200
    assert names[3].startswith("onceflow:it%27s%3Aajjj") and names[3].count(":") == 6
    assert sink.create_committer(odd).lingering() == [names[3]]
    with psycopg.connect(postgres.dsn) as connection:
        found = connection.execute("SELECT gid FROM pg_prepared_xacts WHERE gid LIKE 'onceflow:%'").fetchall()
    assert sorted(gid for (gid,) in found) == sorted(names)
    sink.create_committer(contexts[1]).abort_lingering(keep=committables[1:2])  # every run and attempt of job7
    assert prepared(postgres.dsn) == sorted([names[1], names[3]])
    sink.create_committer(contexts[0]).commit(committables)
    assert len(rows(postgres.dsn, table)) == 2 * BATCH.num_rows
    assert prepared(postgres.dsn) == []


UPSERT_TYPES = pa.record_batch({
    "id": pa.array([1, 2, 3], pa.int64()),
    "amount": [1.5, None, float("inf")],
    "name": ["a,\"b\"", "", None],
    "tag": pa.array([b"\x00\x01", None, b"x,y"], pa.binary()),
    "at": pa.array([0, 1_500, None], pa.timestamp("ms")),
    "flag": [True, False, None],
})


def test_upsert_stages_rows_until_the_commit_then_merges_them_in_order(postgres: PostgresServer) -> None:
    table = table_name()
    sink = PostgresSink(postgres.dsn, table, mode="upsert", key_columns=["id"], create=True)
    ctx = SinkContext("job8", "sink_1", run="r", attempt=0)
    writer = sink.create_writer(ctx)
    writer.write(UPSERT_TYPES)
    writer.write(pa.record_batch({**UPSERT_TYPES.to_pydict(), "amount": [9.0, 8.0, 7.0]}, schema=UPSERT_TYPES.schema)
                 .slice(0, 2))  # later rows of ids 1 and 2 in the same transaction win
    first = writer.prepare_commit(1)
    assert [(c.VERSION, c.checkpoint, c.staging) for c in first] == [(2, 1, sink.staging_table(UPSERT_TYPES.schema))]
    assert first[0].txn.startswith("onceflow:job8:sink_1:0:w") and first[0].txn.endswith(":r:0")
    assert rows(postgres.dsn, table) == []  # staged: invisible in the target
    assert prepared(postgres.dsn) == []  # and nothing prepared holds a lock
    writer.write(pa.record_batch({"id": [1], "amount": [10.0], "name": ["z"], "tag": [None], "at": [None],
                                  "flag": [None]}, schema=UPSERT_TYPES.schema))
    second = writer.prepare_commit(2)
    committer = sink.create_committer(ctx)
    assert committer.lingering() == [first[0].txn, second[0].txn]
    committer.commit(first + second)
    committer.commit(first + second)  # idempotent
    got = rows(postgres.dsn, table)
    assert [r[:3] for r in got] == [(1, 10.0, "z"), (2, 8.0, ""), (3, float("inf"), None)]
    assert [(bytes(r[3]) if r[3] is not None else None, r[5]) for r in got] == [
        (None, None), (None, False), (b"x,y", None)]
    assert str(got[1][4]) == "1970-01-01 00:00:01.500000"
    assert committer.lingering() == []


def test_upsert_abort_and_abort_lingering_delete_staged_rows_of_the_operator_only(postgres: PostgresServer) -> None:
    table = table_name()
    sink = PostgresSink(postgres.dsn, table, mode="upsert", key_columns=["user_id"], create=True)
    staged = {}
    for key, ctx in {"kept": SinkContext("job9", "sink_1", subtask=0, run="r", attempt=1),
                     "other subtask": SinkContext("job9", "sink_1", subtask=1, run="r", attempt=1),
                     "other attempt": SinkContext("job9", "sink_1", subtask=0, run="r", attempt=0),
                     "other run": SinkContext("job9", "sink_1", subtask=0, run="q", attempt=0),
                     "other operator": SinkContext("job9", "sink_10", subtask=0, run="r", attempt=1),
                     "other job": SinkContext("job9x", "sink_1", subtask=0, run="r", attempt=1)}.items():
        writer = sink.create_writer(ctx)
        writer.write(pa.record_batch({"user_id": [len(staged)], "total": [1.0]}))
        staged[key] = writer.prepare_commit(3)
    in_progress = sink.create_writer(SinkContext("job9", "sink_1", subtask=2, run="r", attempt=1))
    in_progress.write(pa.record_batch({"user_id": [99], "total": [1.0]}))
    in_progress.abort()  # rolled back: nothing staged
    ctx = SinkContext("job9", "sink_1", run="r", attempt=2)
    committer = sink.create_committer(ctx)
    committer.abort(staged["other subtask"])
    assert len(committer.lingering()) == 3
    committer.abort_lingering(keep=staged["kept"])
    assert committer.lingering() == [staged["kept"][0].txn]
    committer.commit(staged["kept"] + staged["other run"])  # aborted ones commit nothing
    for key in ("other operator", "other job"):
        sink.create_committer(ctx).commit(staged[key])
    assert rows(postgres.dsn, table) == [(0, 1.0), (4, 1.0), (5, 1.0)]


def test_upsert_into_a_table_without_a_unique_key_is_refused_before_writing(postgres: PostgresServer) -> None:
    table = table_name()
    with psycopg.connect(postgres.dsn) as connection:
        connection.execute(f"CREATE TABLE {table} (user_id bigint, total double precision)")
    sink = PostgresSink(postgres.dsn, table, mode="upsert", key_columns=["user_id"])
    writer = sink.create_writer(SinkContext("job10", "sink_4"))
    with pytest.raises(PlanError, match=rf"postgres sink sink_4: cannot upsert into {table} on key \(user_id\): .*"
                                        "give the table a primary key or unique index"):
        writer.write(pa.record_batch({"user_id": [1], "total": [1.0]}))
    missing = PostgresSink(postgres.dsn, "t_missing", mode="upsert", key_columns=["user_id"])
    with pytest.raises(PlanError, match="table t_missing does not exist; create it or pass create=True"):
        missing.create_writer(SinkContext("job10", "sink_4")).write(pa.record_batch({"user_id": [1]}))


def test_abort_lingering_also_rolls_back_the_jobs_transactions_named_the_old_way(postgres: PostgresServer) -> None:
    table = table_name()
    with psycopg.connect(postgres.dsn, autocommit=True) as connection:
        connection.execute(f"CREATE TABLE {table} (user_id bigint)")
    for gid in ("onceflow:job11:0:4", "onceflow:job11:1:end", "onceflow:job11x:0:4"):
        with psycopg.connect(postgres.dsn) as connection:
            connection.execute(f"INSERT INTO {table} VALUES (1)")
            connection.execute(f"PREPARE TRANSACTION '{gid}'")
    committer = PostgresSink(postgres.dsn, table).create_committer(SinkContext("job11", "sink_1"))
    assert committer.lingering() == ["onceflow:job11:0:4", "onceflow:job11:1:end"]
    committer.abort_lingering(keep=[])
    assert prepared(postgres.dsn) == ["onceflow:job11x:0:4"]
    PostgresSink(postgres.dsn, table).create_committer(SinkContext("job11x", "sink_1")).abort_lingering(keep=[])
    assert prepared(postgres.dsn) == []


def test_a_merge_the_table_refuses_is_a_sink_commit_error_and_stays_staged(postgres: PostgresServer) -> None:
    table = table_name()
    with psycopg.connect(postgres.dsn) as connection:
        connection.execute(f"CREATE TABLE {table} (user_id bigint PRIMARY KEY, total double precision NOT NULL)")
    ctx = SinkContext("job12", "sink_5")
    sink = PostgresSink(postgres.dsn, table, mode="upsert", key_columns=["user_id"])
    writer = sink.create_writer(ctx)
    writer.write(pa.record_batch({"user_id": [1], "total": pa.array([None], pa.float64())}))
    committables = writer.prepare_commit(1)
    committer = sink.create_committer(ctx)
    with pytest.raises(SinkCommitError, match=rf"postgres sink sink_5: the server refused to commit a transaction "
                                              rf"of {table} \(.*not-null.*\); it stays pre-committed"):
        committer.commit(committables)
    assert committer.lingering() == [committables[0].txn]
    committer.abort(committables)
    assert committer.lingering() == []
