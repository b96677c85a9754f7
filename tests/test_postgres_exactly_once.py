"""Exactly-once into PostgreSQL through a crash at every step of the two-phase-commit protocol.

Every test ends with exactly the reference rows committed and no prepared
transaction left behind.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import psycopg
import pyarrow as pa
import pytest

import onceflow as of
from onceflow.checkpoint.storage import CheckpointStorage
from onceflow.testing import failpoints
from onceflow.testing.workload import feature_events, feature_window_reference
from tests.postgres_server import PostgresServer

pytestmark = pytest.mark.usefixtures("ray_session")

TOTAL = 200_000


def feature_flow(job: str, sink: of.sinks.TransactionalSink, rate: int = 100_000) -> of.Dataflow:
    flow = of.Dataflow(job)
    events = flow.source(of.sources.GeneratorSource(feature_events, total=TOTAL, batch_size=5_000,
                                                    max_events_per_s=rate),
                         watermark=of.BoundedOutOfOrderness("event_time"))
    (events.key_by("user_id").window(of.windows.Tumbling(size_ms=10_000))
     .aggregate(count=of.agg.count(), total=of.agg.sum("amount")).sink(sink))
    return flow


def committed(dsn: str, table: str) -> pa.Table:
    with psycopg.connect(dsn) as connection:
        cursor = connection.execute(
            f"SELECT user_id, window_start, window_end, count, total FROM {table} ORDER BY window_start, user_id")
        data = cursor.fetchall()
    columns = list(zip(*data, strict=True)) if data else [[]] * 5
    return pa.table({name: pa.array(values, type=kind) for name, values, kind in zip(
        ["user_id", "window_start", "window_end", "count", "total"], columns,
        [pa.int64(), pa.int64(), pa.int64(), pa.int64(), pa.float64()], strict=True)})


def assert_exactly_once(dsn: str, table: str) -> None:
    got = committed(dsn, table)
    expected = feature_window_reference(TOTAL).sort_by([("window_start", "ascending"), ("user_id", "ascending")])
    assert got.num_rows == expected.num_rows, f"{got.num_rows} rows committed, {expected.num_rows} expected"
    for column in ("user_id", "window_start", "window_end", "count"):
        assert got[column].equals(expected[column]), f"column {column} differs"
    np.testing.assert_allclose(got["total"].to_numpy(), expected["total"].to_numpy(), rtol=1e-9)
    with psycopg.connect(dsn) as connection:
        assert connection.execute("SELECT gid FROM pg_prepared_xacts").fetchall() == []


@pytest.mark.parametrize("point", [
    "sink.after_write",            # killed after writing, before the pre-commit
    "sink.after_pre_commit",       # prepared, before the checkpoint completes
    "coordinator.after_manifest",  # the checkpoint is durable, nobody was notified
    "sink.before_commit.1",        # subtask 0 commits, subtask 1 dies first
    "sink.mid_commit",             # dies right after its first COMMIT PREPARED
])
def test_a_crash_at_each_protocol_step(postgres: PostgresServer, tmp_path, point: str) -> None:
    job = "pg-" + point.replace(".", "-").replace("_", "-")
    table = job.replace("-", "_")
    failpoints.arm(job, point)
    try:
        result = of.run(feature_flow(job, of.sinks.PostgresSink(postgres.dsn, table, create=True)), parallelism=2,
                        checkpoint=of.CheckpointConfig(interval_s=0.3, storage=str(tmp_path)),
                        restart=of.RestartStrategy.fixed_delay(attempts=3, delay_s=0.1))
    finally:
        fired = not failpoints.armed(job, point)
        failpoints.disarm_all()
    assert fired, f"the failpoint {point} was never reached"
    assert result.metrics["restarts"] >= 1
    assert_exactly_once(postgres.dsn, table)


def test_upsert_into_a_feature_table_through_a_crash(postgres: PostgresServer, tmp_path) -> None:
    job, table = "pg-upsert", "pg_upsert"
    failpoints.arm(job, "sink.after_pre_commit")
    sink = of.sinks.PostgresSink(postgres.dsn, table, mode="upsert", key_columns=["user_id", "window_start"],
                                 create=True)
    try:
        result = of.run(feature_flow(job, sink), parallelism=2,
                        checkpoint=of.CheckpointConfig(interval_s=0.3, storage=str(tmp_path)))
    finally:
        failpoints.disarm_all()
    assert result.metrics["restarts"] == 1
    assert_exactly_once(postgres.dsn, table)


def test_the_database_restarts_while_transactions_are_prepared(postgres: PostgresServer, tmp_path) -> None:
    job, table = "pg-db-restart", "pg_db_restart"
    storage = str(tmp_path)
    handle = of.submit(feature_flow(job, of.sinks.PostgresSink(postgres.dsn, table, create=True), rate=50_000),
                       parallelism=2, checkpoint=of.CheckpointConfig(interval_s=0.3, storage=storage),
                       restart=of.RestartStrategy.fixed_delay(attempts=10, delay_s=0.3))
    restarted: list[float] = []

    def restart_database() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with psycopg.connect(postgres.dsn) as connection:
                if connection.execute("SELECT count(*) FROM pg_prepared_xacts").fetchone()[0] and \
                        CheckpointStorage(storage, job).completed_ids():
                    break
            time.sleep(0.01)
        postgres.restart()
        restarted.append(time.monotonic())

    thread = threading.Thread(target=restart_database, daemon=True)
    thread.start()
    result = handle.wait(timeout_s=180)
    thread.join(timeout=30)
    assert restarted, "the database was not restarted during the job"
    assert result.metrics["restarts"] >= 1
    assert_exactly_once(postgres.dsn, table)


def test_the_database_is_down_for_ten_seconds_mid_job(postgres: PostgresServer, tmp_path) -> None:
    """An outage longer than a commit's retries: attempts fail until it is back, then the output is exact."""
    job, table = "pg-db-outage", "pg_db_outage"
    storage = str(tmp_path)
    handle = of.submit(feature_flow(job, of.sinks.PostgresSink(postgres.dsn, table, create=True), rate=50_000),
                       parallelism=2, checkpoint=of.CheckpointConfig(interval_s=0.3, storage=storage),
                       restart=of.RestartStrategy.exponential_backoff(initial_s=0.2, max_s=2.0, attempts=30))
    down: list[float] = []

    def outage() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with psycopg.connect(postgres.dsn) as connection:
                exists = connection.execute(f"SELECT to_regclass('{table}') IS NOT NULL").fetchone()[0]
                if exists and CheckpointStorage(storage, job).completed_ids() and \
                        connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0]:
                    break
            time.sleep(0.01)
        postgres.stop()
        started = time.monotonic()
        time.sleep(10.0)  # the outage under test: the database is away this long, whatever the job does
        postgres.start()
        down.append(time.monotonic() - started)

    thread = threading.Thread(target=outage, daemon=True)
    thread.start()
    try:
        result = handle.wait(timeout_s=240)
    finally:
        thread.join(timeout=60)
    assert down and down[0] >= 10.0, "the database was not taken down during the job"
    assert result.metrics["restarts"] >= 1
    assert_exactly_once(postgres.dsn, table)
