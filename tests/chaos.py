"""Randomised chaos on real Ray: kill subtask actors and the coordinator in every phase of a job.

:func:`run_schedule` submits one job of a :class:`JobShape`, and a *chaos
thread* carries out a seeded list of :class:`Aim` moves against it: each move
waits until the job reaches the phase it aims at (start-up, just after
start-up, running, fencing, resolving, recovery, the final checkpoint), then
kills one or two random targets (a subtask actor ``<job>/<operator>/<subtask>``
or the coordinator ``<job>/coordinator``) with ``ray.kill``, with or without
``no_restart``. A :mod:`onceflow.testing.failpoints` crash point may also be armed
for moments a kill from outside cannot aim at (after a manifest is written,
between a sink's pre-commit and its commit...). Every kill is recorded with
the phase and attempt it landed in, so a failing schedule replays from its
seed and reads as a story.

After the job ends, :func:`verify` compares the committed output with the
shape's failure-free reference (computed in-process with numpy, once per
shape) as a multiset of rows, so a row twice and a row missing are both
counted, and looks for what must not be left behind: a prepared PostgreSQL
transaction (``gid LIKE 'onceflow:%'``), a staged upsert row, a Parquet file
whose name starts with ``_`` or ``.``, a named actor of the job.

Example (the figures of a schedule, without running one):
    >>> record = ChaosRecord("window-parquet", "chaos-w-1", seed=1)
    >>> record.kills.append(Kill(Aim.RUNNING, "chaos-w-1/window_1/0", "running", 1, True, 2.5))
    >>> record.phases_hit()
    ['running']
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import os
import random
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import ray

import onceflow as of
from onceflow.checkpoint.storage import SHARED_DIR, CheckpointStorage, state_handles
from onceflow.checkpoint.supervisor import JobPhase
from onceflow.runtime.ray_env import NAMESPACE
from onceflow.testing import failpoints
from onceflow.testing.workload import feature_events, retry_reference

__all__ = [
    "FAILPOINTS",
    "RESTART_FAILPOINTS",
    "SHAPES",
    "Aim",
    "ChaosRecord",
    "JobShape",
    "Kill",
    "Workspace",
    "build_flow",
    "kill_process_tree",
    "leftover_actors",
    "random_aims",
    "run_schedule",
    "verify",
]

USERS = 300
"""Distinct users in the generated events (small, so windows hold several rows per key)."""
WINDOW_MS = 2_000
"""The tumbling window of the window shapes."""
FAILPOINTS = ("sink.after_write", "sink.after_pre_commit", "sink.before_commit", "coordinator.after_manifest")
"""Crash points every sink passes through; PostgreSQL sinks also pass ``sink.mid_commit``."""
RESTART_FAILPOINTS = ("subtask.fence", "subtask.reset")
"""Crash points of a restart in place (a surviving actor dies while fenced, or while reset for the next
attempt): they fire only in a schedule whose kills make the job restart, with ``in_place``."""
_JOB_TIMEOUT_S = 240.0
_POLL_S = 0.002


# -- events (deterministic, replayable from any offset) ---------------------------------------------


def _events(offset: int, n: int, seed: int) -> pa.RecordBatch:
    base = feature_events(offset, n, users=USERS, seed=seed)
    amount = np.floor(base.column("amount").to_numpy() * 10).astype(np.int64)  # integers: sums are exact
    return pa.record_batch({"user_id": base.column("user_id"), "amount": amount,
                            "event_time": base.column("event_time")})


def window_events(offset: int, n: int) -> pa.RecordBatch:
    """Rows ``offset .. offset + n`` of the window shape's events."""
    return _events(offset, n, seed=7)


def union_left_events(offset: int, n: int) -> pa.RecordBatch:
    """Rows of the union shape's first source."""
    return _events(offset, n, seed=11)


def union_right_events(offset: int, n: int) -> pa.RecordBatch:
    """Rows of the union shape's second source."""
    return _events(offset, n, seed=13)


def keyed_events(offset: int, n: int) -> pa.RecordBatch:
    """Rows of the keyed-state shape: the window events plus ``n`` (always 1), which ``reduce`` sums."""
    batch = _events(offset, n, seed=17)
    return batch.append_column("n", pa.array(np.ones(n, np.int64)))


def resent_events(offset: int, n: int) -> pa.RecordBatch:
    """Every id is sent up to three times: row ``3i`` has id ``i``, rows ``3i+1``/``3i+2`` ids ``i-100``/``i-1000``."""
    rows = np.arange(offset, offset + n, dtype=np.int64)
    original, copy = rows // 3, rows % 3
    lag = np.where(copy == 1, 100, np.where(copy == 2, 1_000, 0))
    ids = np.where(original >= lag, original - lag, original)
    return pa.record_batch({"id": ids, "event_time": rows, "copy": copy})


def running_count(state: tuple[int, int] | None, row: dict[str, Any]) -> tuple[tuple[int, int], dict[str, Any]]:
    """Per user: how many events so far and their running amount, emitted with every event."""
    seen, total = state or (0, 0)
    seen, total = seen + 1, total + row["amount"]
    return (seen, total), {"user_id": row["user_id"], "event_time": row["event_time"], "seen": seen,
                           "running": total}


def add_up(accumulated: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    """Per user: the event count, the amount's sum and the newest event time."""
    return {"user_id": row["user_id"], "amount": accumulated["amount"] + row["amount"],
            "event_time": max(accumulated["event_time"], row["event_time"]), "n": accumulated["n"] + row["n"]}


# -- references (failure-free output, in-process) ----------------------------------------------------


def _window_reference(batches: Sequence[pa.RecordBatch], window_ms: int = WINDOW_MS) -> pa.Table:
    user = np.concatenate([b.column("user_id").to_numpy() for b in batches])
    amount = np.concatenate([b.column("amount").to_numpy() for b in batches])
    window = np.concatenate([b.column("event_time").to_numpy() for b in batches]) // window_ms
    unique, inverse = np.unique(window * USERS + user, return_inverse=True)
    start = (unique // USERS) * window_ms
    return pa.table({"user_id": (unique % USERS).astype(np.int64), "window_start": start.astype(np.int64),
                     "window_end": (start + window_ms).astype(np.int64),
                     "count": np.bincount(inverse).astype(np.int64),
                     "total": np.bincount(inverse, weights=amount).astype(np.int64)})


def _running_reference(batch: pa.RecordBatch) -> pa.Table:
    user, amount = batch.column("user_id").to_numpy(), batch.column("amount").to_numpy()
    time_ = batch.column("event_time").to_numpy()
    order = np.lexsort((time_, user))
    user, amount, time_ = user[order], amount[order], time_[order]
    first = np.r_[True, user[1:] != user[:-1]]
    group_start = np.maximum.accumulate(np.where(first, np.arange(len(user)), 0))
    cumulative = np.cumsum(amount)
    before = np.where(group_start > 0, cumulative[group_start - 1], 0)
    return pa.table({"user_id": user, "event_time": time_, "seen": np.arange(len(user)) - group_start + 1,
                     "running": cumulative - before})


def _totals_reference(batch: pa.RecordBatch) -> pa.Table:
    table = pa.Table.from_batches([batch]).group_by("user_id").aggregate(
        [("amount", "sum"), ("event_time", "max"), ("n", "sum")])
    return pa.table({"user_id": table["user_id"], "amount": table["amount_sum"],
                     "event_time": table["event_time_max"], "n": table["n_sum"]})


# -- shapes -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Workspace:
    """Where one schedule keeps its files, and the PostgreSQL server its sinks write to (if any).

    Attributes:
        root: a directory of its own.
        dsn: a libpq connection string, for shapes with PostgreSQL sinks.
        kafka: the ``bootstrap.servers`` of a Kafka broker, for shapes that read and write Kafka.
        checkpoints: the checkpoint storage as a ``pyarrow.fs`` URI (``s3://...``); ``None``: under ``root``.
    """

    root: Path
    dsn: str | None = None
    kafka: str | None = None
    checkpoints: str | None = None

    @property
    def storage(self) -> str:
        """The checkpoint storage."""
        return self.checkpoints or str(self.root / "checkpoints")

    @property
    def out(self) -> Path:
        """The Parquet sinks' output directory."""
        return self.root / "out"


@dataclass(frozen=True, slots=True)
class SinkOutput:
    """One sink's committed rows, as read back, and what it should hold.

    ``aborted``, where the sink writes rows that a failure can leave uncommitted
    but still stored (Kafka transactions), counts those rows: a reader that
    sees uncommitted data shows that the failures did reach the output.
    """

    label: str
    read: Callable[[str, Workspace], pa.Table]
    reference: Callable[[], pa.Table]
    aborted: Callable[[str, Workspace], int] | None = None


@dataclass(frozen=True, slots=True)
class JobShape:
    """A kind of job the chaos driver runs.

    Attributes:
        name: the shape's name (``window-parquet``...).
        build: ``build(job, workspace)`` returns a fresh dataflow named ``job`` with its sinks.
        outputs: each sink's committed output and reference.
        parallelism: the job's default parallelism.
        postgres: whether the job writes to PostgreSQL (needs ``Workspace.dsn``).
        kafka: whether the job reads and writes Kafka (needs ``Workspace.kafka``).
    """

    name: str
    build: Callable[[str, Workspace], of.Dataflow]
    outputs: tuple[SinkOutput, ...]
    parallelism: int = 2
    postgres: bool = False
    kafka: bool = False


def _table_name(job: str, suffix: str) -> str:
    return (job.replace("-", "_") + "_" + suffix).lower()


def _read_parquet(columns: Sequence[str]) -> Callable[[str, Workspace], pa.Table]:
    def read(job: str, workspace: Workspace) -> pa.Table:
        if not workspace.out.exists():
            return pa.table({c: pa.array([], pa.int64()) for c in columns})
        return ds.dataset(workspace.out, format="parquet").to_table(columns=list(columns))

    return read


def _read_postgres(suffix: str, columns: Sequence[str]) -> Callable[[str, Workspace], pa.Table]:
    def read(job: str, workspace: Workspace) -> pa.Table:
        import psycopg

        assert workspace.dsn is not None
        with psycopg.connect(workspace.dsn) as connection:
            exists = connection.execute("SELECT to_regclass(%s)", (_table_name(job, suffix),)).fetchone()
            rows = connection.execute(f"SELECT {', '.join(columns)} FROM {_table_name(job, suffix)}").fetchall() \
                if exists is not None and exists[0] else []
        return pa.table({c: pa.array([row[i] for row in rows], pa.int64()) for i, c in enumerate(columns)})

    return read


WINDOW_TOTAL = 40_000
KEYED_TOTAL = 16_000
DEDUPE_ROWS = 30_000
UNION_LEFT_TOTAL, UNION_RIGHT_TOTAL = 15_000, 24_000
WINDOW_COLUMNS = ("user_id", "window_start", "window_end", "count", "total")


def _window_flow(job: str, workspace: Workspace) -> of.Dataflow:
    flow = of.Dataflow(job)
    events = flow.source(of.sources.GeneratorSource(window_events, total=WINDOW_TOTAL, batch_size=1_000,
                                                    max_events_per_s=10_000),
                         watermark=of.BoundedOutOfOrderness("event_time"), name="events")
    (events.key_by("user_id").window(of.windows.Tumbling(size_ms=WINDOW_MS))
     .aggregate(count=of.agg.count(), total=of.agg.sum("amount"), name="window")
     .sink(of.sinks.ParquetSink(str(workspace.out)), name="parquet"))
    return flow


def _keyed_flow(job: str, workspace: Workspace) -> of.Dataflow:
    assert workspace.dsn is not None
    flow = of.Dataflow(job)
    # One source subtask: each user's events arrive in event-time order, so running counts are deterministic.
    keyed = flow.source(of.sources.GeneratorSource(keyed_events, total=KEYED_TOTAL, batch_size=500,
                                                   max_events_per_s=5_000),
                        watermark=of.BoundedOutOfOrderness("event_time"), name="events",
                        parallelism=1).key_by("user_id")
    keyed.process(running_count, name="running").sink(
        of.sinks.PostgresSink(workspace.dsn, _table_name(job, "running"), create=True), name="running_pg")
    keyed.reduce(add_up, name="totals").sink(
        of.sinks.PostgresSink(workspace.dsn, _table_name(job, "totals"), mode="upsert", key_columns=["user_id"],
                              create=True), name="totals_pg")
    return flow


def _dedupe_flow(job: str, workspace: Workspace) -> of.Dataflow:
    flow = of.Dataflow(job)
    events = flow.source(of.sources.GeneratorSource(resent_events, total=DEDUPE_ROWS, batch_size=1_000,
                                                    max_events_per_s=8_000),
                         watermark=of.BoundedOutOfOrderness("event_time"), name="events")
    events.dedupe("id", within_ms=10_000, mode="exact", name="dedupe").sink(
        of.sinks.ParquetSink(str(workspace.out)), name="parquet")
    return flow


LOOP_TOTAL = 20_000
LOOP_COLUMNS = ("user_id", "window_start", "window_end", "events", "attempts")


def _loop_flow(job: str, workspace: Workspace) -> of.Dataflow:
    from examples.retry_loop import build

    return build(job, str(workspace.out), LOOP_TOTAL, batch_size=500, max_events_per_s=5_000)


def _union_flow(job: str, workspace: Workspace) -> of.Dataflow:
    assert workspace.dsn is not None
    flow = of.Dataflow(job)
    left = flow.source(of.sources.GeneratorSource(union_left_events, total=UNION_LEFT_TOTAL, batch_size=500,
                                                  max_events_per_s=5_000),
                       watermark=of.BoundedOutOfOrderness("event_time"), name="left", parallelism=1)
    right = flow.source(of.sources.GeneratorSource(union_right_events, total=UNION_RIGHT_TOTAL, batch_size=1_000,
                                                   max_events_per_s=8_000),
                        watermark=of.BoundedOutOfOrderness("event_time"), name="right", parallelism=2)
    (left.union(right, name="both").key_by("user_id").window(of.windows.Tumbling(size_ms=WINDOW_MS))
     .aggregate(count=of.agg.count(), total=of.agg.sum("amount"), name="window")
     .sink(of.sinks.PostgresSink(workspace.dsn, _table_name(job, "windows"), create=True), name="windows_pg"))
    return flow


# -- Kafka -> windows -> Kafka --------------------------------------------------------------------------

KAFKA_PARTITIONS = 3
KAFKA_SCHEMA = pa.schema([("user_id", pa.int64()), ("amount", pa.int64()), ("event_time", pa.int64())])
KAFKA_WINDOW_MS = 500
"""Short windows: at the pace below one fires about every 50 ms, so a transaction open at a kill holds rows."""
KAFKA_PACE_PER_S = 5_000
"""Rows per second each source subtask passes on: the input is in the topic from the start, so without a
pace the job would end before a kill could land."""


def kafka_topics(job: str) -> tuple[str, str]:
    """The input and output topics of a Kafka schedule."""
    return f"{job}-in", f"{job}-out"


def _kafka_input(bootstrap_servers: str, topic: str) -> None:
    """Create ``topic`` holding the window shape's events, unless it exists (a resumed run reads it again).

    Event *i* goes to partition ``i % KAFKA_PARTITIONS``, so every partition is in event-time order.
    """
    from examples.kafka_features import produce
    from tests.kafka_server import topic_exists

    if not topic_exists(bootstrap_servers, topic):
        produce(bootstrap_servers, topic, WINDOW_TOTAL, partitions=KAFKA_PARTITIONS, rows=window_events)


def pace(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Hold each batch as long as :data:`KAFKA_PACE_PER_S` allows."""
    time.sleep(batch.num_rows / KAFKA_PACE_PER_S)
    return batch


def _kafka_flow(job: str, workspace: Workspace) -> of.Dataflow:
    from tests.kafka_server import create_topic, topic_exists

    assert workspace.kafka is not None
    source_topic, sink_topic = kafka_topics(job)
    _kafka_input(workspace.kafka, source_topic)
    if not topic_exists(workspace.kafka, sink_topic):
        create_topic(workspace.kafka, sink_topic, KAFKA_PARTITIONS)
    flow = of.Dataflow(job)
    events = flow.source(of.sources.KafkaSource(workspace.kafka, source_topic, KAFKA_SCHEMA, stop_at="end",
                                                batch_size=500, max_partition_skew_ms=KAFKA_WINDOW_MS),
                         watermark=of.BoundedOutOfOrderness("event_time"), name="events")
    (events.map_batches(pace, name="pace").key_by("user_id").window(of.windows.Tumbling(size_ms=KAFKA_WINDOW_MS))
     .aggregate(count=of.agg.count(), total=of.agg.sum("amount"), name="window")
     .sink(of.sinks.KafkaSink(workspace.kafka, sink_topic, key="user_id", timeout_s=20), name="kafka_out"))
    return flow


def _read_kafka(isolation: str) -> Callable[[str, Workspace], list[Any]]:
    def read(job: str, workspace: Workspace) -> list[Any]:
        from tests.kafka_server import read_messages

        assert workspace.kafka is not None
        return [json.loads(m.value()) for m in read_messages(workspace.kafka, kafka_topics(job)[1], isolation)]

    return read


def _read_kafka_table(job: str, workspace: Workspace) -> pa.Table:
    rows = _read_kafka("read_committed")(job, workspace)
    return pa.Table.from_pylist(rows, pa.schema([(c, pa.int64()) for c in WINDOW_COLUMNS]))


def _kafka_aborted(job: str, workspace: Workspace) -> int:
    return len(_read_kafka("read_uncommitted")(job, workspace)) - len(_read_kafka("read_committed")(job, workspace))


def _kafka_leftovers(job: str, workspace: Workspace) -> list[str]:
    from tests.kafka_server import open_transactions

    assert workspace.kafka is not None
    topic = kafka_topics(job)[1]
    found = []
    for name in (topic, topic + ".onceflow-commits"):
        held = open_transactions(workspace.kafka, name)
        if held:
            found.append(f"open Kafka transactions hold back partitions {held} of {name}")
    return found


@functools.cache
def _reference(shape: str, output: str) -> pa.Table:
    if shape == "window-parquet":
        return _window_reference([window_events(0, WINDOW_TOTAL)])
    if shape == "kafka-kafka":
        return _window_reference([window_events(0, WINDOW_TOTAL)], KAFKA_WINDOW_MS)
    if shape == "keyed-postgres":
        batch = keyed_events(0, KEYED_TOTAL)
        return _running_reference(batch) if output == "running" else _totals_reference(batch)
    if shape == "dedupe-parquet":
        return pa.table({"id": np.arange(DEDUPE_ROWS // 3, dtype=np.int64)})
    if shape == "union-postgres":
        return _window_reference([union_left_events(0, UNION_LEFT_TOTAL), union_right_events(0, UNION_RIGHT_TOTAL)])
    if shape == "loop-parquet":
        from examples.retry_loop import WINDOW_MS as LOOP_WINDOW_MS

        return retry_reference(LOOP_TOTAL, window_ms=LOOP_WINDOW_MS)
    msg = f"unknown chaos shape {shape!r}"
    raise ValueError(msg)


SHAPES: dict[str, JobShape] = {
    "window-parquet": JobShape("window-parquet", _window_flow, (
        SinkOutput("parquet", _read_parquet(WINDOW_COLUMNS), functools.partial(_reference, "window-parquet", "")),)),
    "keyed-postgres": JobShape("keyed-postgres", _keyed_flow, (
        SinkOutput("running (process, append)", _read_postgres("running", ("user_id", "event_time", "seen", "running")),
                   functools.partial(_reference, "keyed-postgres", "running")),
        SinkOutput("totals (reduce, upsert)", _read_postgres("totals", ("user_id", "amount", "event_time", "n")),
                   functools.partial(_reference, "keyed-postgres", "totals")),
    ), postgres=True),
    "dedupe-parquet": JobShape("dedupe-parquet", _dedupe_flow, (
        SinkOutput("parquet", _read_parquet(("id",)), functools.partial(_reference, "dedupe-parquet", "")),)),
    "union-postgres": JobShape("union-postgres", _union_flow, (
        SinkOutput("windows", _read_postgres("windows", WINDOW_COLUMNS),
                   functools.partial(_reference, "union-postgres", "")),), postgres=True),
    "loop-parquet": JobShape("loop-parquet", _loop_flow, (
        SinkOutput("parquet", _read_parquet(LOOP_COLUMNS), functools.partial(_reference, "loop-parquet", "")),)),
    "kafka-kafka": JobShape("kafka-kafka", _kafka_flow, (
        SinkOutput("kafka", _read_kafka_table, functools.partial(_reference, "kafka-kafka", ""), _kafka_aborted),),
        kafka=True),
}
"""The job shapes: keyed windows to Parquet; process/reduce state to PostgreSQL (append and upsert);
exact dedupe over resent events to Parquet; a union of sources at parallelism 1 and 2 into windows to PostgreSQL;
the retry loop (``examples/retry_loop.py``: keyed state in a loop, windows after it) to Parquet; the window
shape's events read from a Kafka topic of three partitions into windows written to a Kafka topic in
transactions."""


def build_flow(shape: str, job: str, workspace: Workspace) -> of.Dataflow:
    """A fresh dataflow of ``shape`` named ``job`` (for job scripts run in another process)."""
    return SHAPES[shape].build(job, workspace)


# -- schedules ----------------------------------------------------------------------------------------


class Aim(Enum):
    """The moment a chaos move aims its kill at."""

    STARTUP = "startup"
    """While the first attempt's actors are created and wired (``of.submit`` has not returned)."""
    JUST_STARTED = "just-started"
    """Right after the first attempt runs, before its first checkpoint."""
    RUNNING = "running"
    """Running, just after a checkpoint completed."""
    TWO_AT_ONCE = "two-at-once"
    """Running: two targets killed back to back."""
    FENCING = "fencing"
    """Kill, then kill again while the failed attempt is being fenced."""
    RESOLVING = "resolving"
    """Kill, then kill the coordinator while sink transactions are resolved for the restart."""
    RECOVERY = "recovery"
    """Kill, then kill again while the restarted attempt deploys."""
    FINISHING = "finishing"
    """During the final checkpoint."""


@dataclass(frozen=True, slots=True)
class Kill:
    """One kill the chaos thread carried out (or tried to).

    Attributes:
        aim: the move it belongs to.
        target: the actor name.
        phase: the job's phase read just before the kill (``-`` if the actor did not exist).
        attempt: the job's attempt then.
        no_restart: the ``ray.kill`` flag.
        at_s: seconds since the job was submitted.
        landed: whether an actor of that name existed and was killed.
    """

    aim: Aim
    target: str
    phase: str
    attempt: int
    no_restart: bool
    at_s: float
    landed: bool = True

    def __str__(self) -> str:
        flag = "no_restart" if self.no_restart else "restartable"
        missed = "" if self.landed else " (missed: no such actor)"
        return f"{self.at_s:6.2f}s {self.aim.value:<12} {self.target} in {self.phase}#{self.attempt} {flag}{missed}"


@dataclass(slots=True)
class ChaosRecord:
    """What one schedule did and found.

    Attributes:
        shape: the job shape.
        job: the job name.
        seed: the schedule's seed (with ``aims`` and ``failpoint``, it replays the schedule).
        aims: the moves planned.
        failpoint: the crash point armed, if any.
        failpoint_fired: whether it fired, and the phase the job was in when it was seen gone.
        resume: whether the job resumed an earlier (killed) driver's checkpoints.
        mode: the checkpoint mode (see :data:`MODES`).
        in_place: whether restarts reset the surviving actors in place.
        kills: every kill, in order.
        restarts: the job's restarts.
        restored_from: the checkpoints restored.
        error: the job's error, if it did not finish.
        duration_s: submit to end.
        lost: per output, rows of the reference not committed (counted with multiplicity).
        duplicated: per output, committed rows beyond the reference's.
        aborted: per output that keeps them, rows written but never committed (aborted attempts).
        leftovers: prepared transactions, staged rows, hidden files, actors left behind.
        chaos_errors: errors of the chaos thread itself.
        timeline: the job's phases as they changed (``<seconds> <phase>#<attempt>``).
    """

    shape: str
    job: str
    seed: int
    aims: list[Aim] = field(default_factory=list)
    failpoint: str | None = None
    failpoint_fired: str | None = None
    resume: bool = False
    mode: str = "aligned"
    in_place: bool = True
    kills: list[Kill] = field(default_factory=list)
    restarts: int = 0
    restored_from: list[int] = field(default_factory=list)
    error: str | None = None
    duration_s: float = 0.0
    lost: dict[str, int] = field(default_factory=dict)
    duplicated: dict[str, int] = field(default_factory=dict)
    aborted: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    chaos_errors: list[str] = field(default_factory=list)
    timeline: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        """Everything that breaks exactly-once or leaves something behind; empty for a good schedule."""
        found = [f"job did not finish: {self.error}"] if self.error else []
        found += [f"{label}: {n} row(s) lost" for label, n in self.lost.items() if n]
        found += [f"{label}: {n} row(s) duplicated" for label, n in self.duplicated.items() if n]
        found += self.examples + self.leftovers + [f"chaos thread: {e}" for e in self.chaos_errors]
        return found

    def phases_hit(self) -> list[str]:
        """The phases the landed kills hit (``phase`` names, attempt 1's deploy as ``startup``)."""
        return sorted({k.phase for k in self.kills if k.landed})

    def describe(self) -> str:
        """The replayable story of the schedule: seed, moves, every kill with its phase, and the findings."""
        lines = [f"chaos schedule: shape={self.shape} job={self.job} seed={self.seed} "
                 f"aims={[a.value for a in self.aims]} failpoint={self.failpoint} resume={self.resume} "
                 f"mode={self.mode} in_place={self.in_place}",
                 f"  restarts={self.restarts} restored_from={self.restored_from} duration={self.duration_s:.1f}s "
                 f"failpoint_fired={self.failpoint_fired}"
                 + "".join(f" aborted[{label}]={n}" for label, n in self.aborted.items())]
        lines += [f"  kill {k}" for k in self.kills] or ["  no kill"]
        lines.append(f"  phases: {' '.join(self.timeline)}")
        lines += [f"  PROBLEM {p}" for p in self.problems]
        return "\n".join(lines)


def random_aims(rng: random.Random, budget: int) -> list[Aim]:
    """Between one and ``budget`` moves, start-up at most first, the final checkpoint at most last."""
    middle = [Aim.JUST_STARTED, Aim.RUNNING, Aim.TWO_AT_ONCE, Aim.FENCING, Aim.RESOLVING, Aim.RECOVERY]
    aims = [rng.choice(middle) for _ in range(rng.randint(1, budget))]
    if rng.random() < 0.25:
        aims[0] = Aim.STARTUP
    if rng.random() < 0.3:
        aims[-1] = Aim.FINISHING
    if Aim.JUST_STARTED in aims[1:]:
        aims = [a if a is not Aim.JUST_STARTED or i == 0 else Aim.RUNNING for i, a in enumerate(aims)]
    return aims


def _failpoint_flag(job: str, name: str) -> Path:
    # The flag file crash_point looks for (onceflow.testing.failpoints keeps them in this directory).
    return Path(tempfile.gettempdir()) / "onceflow-failpoints" / f"{job}.{name}"


def _job_actors(job: str) -> list[str]:
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == NAMESPACE and a["name"].startswith(f"{job}/"))


def leftover_actors(job: str, timeout_s: float = 20.0) -> list[str]:
    """The named actors of ``job`` still alive after ``timeout_s`` (a killed actor's name is freed lazily)."""
    deadline = time.monotonic() + timeout_s
    while (left := _job_actors(job)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


class _ChaosThread(threading.Thread):
    """Carries out the moves of one schedule against a job."""

    def __init__(self, record: ChaosRecord, rng: random.Random, storage: str, started: float) -> None:
        super().__init__(daemon=True, name=f"chaos-{record.job}")
        self.record = record
        self.rng = rng
        self.storage = CheckpointStorage(storage, record.job)
        self.started = started
        self.handle: of.JobHandle | None = None
        self.handle_ready = threading.Event()
        self.stop = threading.Event()

    # -- observation --

    def _phase(self) -> tuple[str, int]:
        if self.handle is None:
            return "deploying(startup)", 1
        return self.handle.phase.value, self.handle.attempt

    def _ended(self) -> bool:
        return self.stop.is_set() or (self.handle is not None and self.handle.phase.terminal)

    def _wait(self, condition: Callable[[], bool], timeout_s: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if self._ended() or time.monotonic() > deadline:
                return False
            time.sleep(_POLL_S)
        return True

    def _wait_phase(self, *phases: JobPhase, after_attempt: int = 0, timeout_s: float = 60.0) -> bool:
        handle = self.handle
        assert handle is not None
        return self._wait(lambda: handle.phase in phases and handle.attempt > after_attempt, timeout_s)

    def _targets(self) -> list[str]:
        assert self.handle is not None
        return [*self.handle.actor_names, f"{self.record.job}/coordinator"]

    # -- killing --

    def _kill(self, aim: Aim, target: str) -> Kill:
        no_restart = self.rng.random() < 0.5
        phase, attempt = self._phase()
        try:
            actor = ray.get_actor(target, namespace=NAMESPACE)
        except ValueError:
            kill = Kill(aim, target, phase, attempt, no_restart, time.monotonic() - self.started, landed=False)
        else:
            ray.kill(actor, no_restart=no_restart)
            kill = Kill(aim, target, phase, attempt, no_restart, time.monotonic() - self.started)
        self.record.kills.append(kill)
        return kill

    def _kill_random(self, aim: Aim, count: int = 1, *, subtasks_only: bool = False) -> int:
        """Kill ``count`` distinct random targets; return the attempt the first one hit."""
        targets = self._targets()
        targets = self.rng.sample(targets[:-1] if subtasks_only else targets, count)
        kills = [self._kill(aim, t) for t in targets]
        return kills[0].attempt

    def _startup(self) -> None:
        # The job's actors appear while of.submit is still deploying: kill one as soon as it exists.
        job = self.record.job
        vertex_kinds = self.rng.random()
        deadline = time.monotonic() + 60
        while not self.handle_ready.is_set() and time.monotonic() < deadline and not self.stop.is_set():
            names = [n for n in _job_actors(job) if vertex_kinds < 0.2 or not n.endswith("/coordinator")]
            if names:
                self._kill(Aim.STARTUP, self.rng.choice(names))
                return
            time.sleep(0.01)

    def _move(self, aim: Aim) -> None:
        handle = self.handle
        assert handle is not None
        if aim is Aim.JUST_STARTED:
            if self._wait_phase(JobPhase.RUNNING):
                self._kill_random(aim)
        elif aim in (Aim.RUNNING, Aim.TWO_AT_ONCE, Aim.FENCING, Aim.RESOLVING, Aim.RECOVERY):
            last = self.storage.completed_ids()
            newest = last[-1] if last else 0
            if not self._wait(lambda: handle.phase is JobPhase.RUNNING and self._newest() > newest):
                return
            time.sleep(self.rng.uniform(0, 0.2))  # somewhere between two checkpoints
            if handle.phase is not JobPhase.RUNNING:
                return
            # Fencing and resolving talk to the coordinator: the first kill spares it for the second.
            attempt = self._kill_random(aim, 2 if aim is Aim.TWO_AT_ONCE else 1,
                                        subtasks_only=aim in (Aim.FENCING, Aim.RESOLVING))
            fencing = aim is Aim.FENCING and self._wait_phase(JobPhase.FENCING, after_attempt=attempt - 1,
                                                               timeout_s=10)
            resolving = aim is Aim.RESOLVING and self._wait_phase(JobPhase.RESOLVING, after_attempt=attempt,
                                                                   timeout_s=20)
            if fencing or resolving:
                self._kill(aim, f"{self.record.job}/coordinator")
            elif aim is Aim.RECOVERY and self._wait_phase(JobPhase.DEPLOYING, after_attempt=attempt, timeout_s=20):
                self._recovery_kill(attempt + 1)
        elif aim is Aim.FINISHING and self._wait_phase(JobPhase.FINISHING, timeout_s=120):
            self._kill_random(aim)

    def _recovery_kill(self, attempt: int) -> None:
        """While attempt ``attempt`` deploys, kill one of its actors once it exists."""
        handle = self.handle
        assert handle is not None
        while handle.phase is JobPhase.DEPLOYING and handle.attempt == attempt and not self._ended():
            names = [n for n in _job_actors(self.record.job) if not n.endswith("/coordinator")]
            if names:
                self._kill(Aim.RECOVERY, self.rng.choice(names))
                return
            time.sleep(0.005)

    def _newest(self) -> int:
        ids = self.storage.completed_ids()
        return ids[-1] if ids else 0

    def run(self) -> None:
        try:
            for index, aim in enumerate(self.record.aims):
                if aim is Aim.STARTUP:
                    if index == 0:
                        self._startup()
                    continue
                if not self._wait(self.handle_ready.is_set, timeout_s=120):
                    return
                if self._ended():
                    return
                self._move(aim)
        except Exception as error:  # reported with the schedule
            self.record.chaos_errors.append(f"{type(error).__name__}: {error}")


MODES = ("aligned", "unaligned", "timeout", "incremental")
"""Checkpoint modes of a schedule: aligned, unaligned, aligned switching to unaligned once it waits at all, or
aligned and incremental."""


def checkpoint_config(mode: str, storage: str) -> of.CheckpointConfig:
    """The checkpoint settings of a schedule in ``mode`` (one of :data:`MODES`)."""
    if mode == "timeout":
        return of.CheckpointConfig(interval_s=0.3, storage=storage, aligned_timeout_s=0.0)
    if mode == "incremental":
        return of.CheckpointConfig(interval_s=0.3, storage=storage, incremental=True)
    return of.CheckpointConfig(interval_s=0.3, storage=storage, mode=mode)


def run_schedule(shape: JobShape, workspace: Workspace, *, seed: int, aims: Sequence[Aim],
                 failpoint: str | None = None, resume: bool = False, job: str | None = None,
                 mode: str = "aligned", in_place: bool | None = None) -> ChaosRecord:
    """Run one job of ``shape`` through the moves ``aims`` (kills seeded by ``seed``) and verify it.

    Args:
        shape: the job shape.
        workspace: the schedule's directory (and PostgreSQL server).
        seed: seeds the targets, the ``no_restart`` flags and the delays.
        aims: the moves, in order (:data:`Aim.STARTUP` only counts first).
        failpoint: a crash point of :data:`FAILPOINTS` to arm for the job (one-shot).
        resume: resume the newest checkpoint in the workspace (after a killed driver).
        job: the job name; ``chaos-<shape>-<seed>`` by default.
        mode: the checkpoint mode, one of :data:`MODES`.
        in_place: restarts reset the surviving actors in place (``restart_in_place``); ``None``
            draws it from the seed (three schedules in four), so both ways of restarting are exercised.

    Returns:
        The record; ``record.problems`` is empty when the output is exact and nothing was left behind.
    """
    job = job or f"chaos-{shape.name}-{seed}"
    in_place = random.Random(f"in-place-{seed}").random() < 0.75 if in_place is None else in_place
    record = ChaosRecord(shape.name, job, seed, list(aims), failpoint, resume=resume, mode=mode, in_place=in_place)
    rng = random.Random(seed)
    budget = len(aims) * 2 + 4
    if failpoint is not None:
        failpoints.arm(job, failpoint)
    started = time.monotonic()
    chaos = _ChaosThread(record, rng, workspace.storage, started)
    chaos.start()
    handle = None
    try:
        handle = of.submit(shape.build(job, workspace), parallelism=shape.parallelism, resume=resume,
                           checkpoint=checkpoint_config(mode, workspace.storage),
                           restart=of.RestartStrategy.fixed_delay(attempts=budget, delay_s=0.1),
                           restart_in_place=in_place)
        chaos.handle = handle
        chaos.handle_ready.set()
        watch_failpoint = failpoint is not None
        deadline = time.monotonic() + _JOB_TIMEOUT_S
        seen = ""
        while True:
            now = f"{handle.phase.value}#{handle.attempt}"
            if now != seen:
                record.timeline.append(f"{time.monotonic() - started:.1f}s:{now}")
                seen = now
            if handle.phase.terminal:
                break
            if watch_failpoint and not _failpoint_flag(job, failpoint or "").exists():
                record.failpoint_fired, watch_failpoint = f"{handle.phase.value}#{handle.attempt}", False
            if time.monotonic() > deadline:
                chaos.stop.set()
                handle.cancel()
                record.error = f"hung: still {handle.phase.value} after {_JOB_TIMEOUT_S:.0f} s (cancelled)"
                break
            time.sleep(0.01)
        result = handle.wait(timeout_s=60)
        record.restarts = int(result.metrics["restarts"])
        record.restored_from = list(result.metrics.get("restored_from", []))
    except of.JobFailedError as error:
        record.error = record.error or str(error)
    except TimeoutError as error:
        record.error = record.error or f"hung: {error}"
    finally:
        chaos.stop.set()
        chaos.handle_ready.set()
        chaos.join(timeout=30)
        record.duration_s = time.monotonic() - started
        if failpoint is not None:
            if record.failpoint_fired is None and not _failpoint_flag(job, failpoint).exists():
                record.failpoint_fired = "fired"
            _failpoint_flag(job, failpoint).unlink(missing_ok=True)
        if handle is not None and record.error:
            record.restarts = max(handle.attempt - 1, 0)
    verify(shape, workspace, record)
    return record


def _row_counts(table: pa.Table) -> collections.Counter[tuple[Any, ...]]:
    columns = [table.column(c).to_pylist() for c in table.column_names]
    return collections.Counter(zip(*columns, strict=True))


def verify(shape: JobShape, workspace: Workspace, record: ChaosRecord) -> None:
    """Fill ``record``'s findings: lost and duplicated rows per output, and everything left behind."""
    for output in shape.outputs:
        expected = output.reference()
        got = output.read(record.job, workspace).select(expected.column_names)
        want, have = _row_counts(expected), _row_counts(got)
        missing, extra = want - have, have - want
        record.lost[output.label] = sum(missing.values())
        record.duplicated[output.label] = sum(extra.values())
        for kind, rows in (("missing", missing), ("extra", extra)):
            if rows:
                sample = ", ".join(str(r) for r in list(rows)[:3])
                record.examples.append(f"{output.label}: {kind} rows, e.g. {sample} (columns {expected.column_names})")
        if output.aborted is not None:
            record.aborted[output.label] = output.aborted(record.job, workspace)
    if workspace.out.exists():
        hidden = sorted(str(p.relative_to(workspace.out)) for p in workspace.out.rglob("*")
                        if p.name.startswith(("_", ".")))
        if hidden:
            record.leftovers.append(f"hidden Parquet files left: {hidden[:5]}{' ...' if len(hidden) > 5 else ''}")
    if shape.postgres:
        record.leftovers += _postgres_leftovers(workspace)
    if shape.kafka:
        record.leftovers += _kafka_leftovers(record.job, workspace)
    if workspace.checkpoints is not None:
        record.leftovers += _storage_leftovers(record.job, workspace)
    actors = leftover_actors(record.job)
    if actors:
        record.leftovers.append(f"named actors left: {actors}")
    record.leftovers += _checkpoint_leftovers(record.job, workspace)


def _checkpoint_leftovers(job: str, workspace: Workspace) -> list[str]:
    """Shared pieces of incremental checkpoints that no manifest names, and named files that are gone."""
    storage = CheckpointStorage(workspace.storage, job)
    fs = storage.filesystem
    listed = fs.get_file_info(pafs.FileSelector(f"{storage.root}/{SHARED_DIR}", allow_not_found=True))
    shared = {info.path for info in listed if info.type == pafs.FileType.File}
    named = {h.path for c in storage.completed_ids() for entry in (storage.manifest(c) or {})["tasks"].values()
             for state in entry["states"].values() for h in state_handles(state)}
    found = []
    if shared - named:
        found.append(f"{len(shared - named)} shared checkpoint piece(s) no checkpoint names")
    missing = sorted(p for p in named if fs.get_file_info(p).type == pafs.FileType.NotFound)
    if missing:
        found.append(f"{len(missing)} checkpoint file(s) named by a manifest are gone, e.g. {missing[0]}")
    return found


def _storage_leftovers(job: str, workspace: Workspace) -> list[str]:
    """Temporary objects in a checkpoint storage URI (an object store's writes never make any)."""
    store = CheckpointStorage(workspace.storage, job)
    infos = store.filesystem.get_file_info(pafs.FileSelector(store.root, recursive=True, allow_not_found=True))
    temporary = sorted(info.path for info in infos if info.path.endswith(".tmp"))
    return [f"temporary checkpoint objects left: {temporary[:5]}"] if temporary else []


def _postgres_leftovers(workspace: Workspace) -> list[str]:
    import psycopg

    assert workspace.dsn is not None
    found = []
    with psycopg.connect(workspace.dsn, autocommit=True) as connection:
        prepared = [r[0] for r in connection.execute(
            "SELECT gid FROM pg_prepared_xacts WHERE gid LIKE 'onceflow:%' ORDER BY gid").fetchall()]
        if prepared:
            found.append(f"prepared transactions left: {prepared}")
        for (table,) in connection.execute(
                "SELECT tablename FROM pg_tables WHERE tablename LIKE 'onceflow\\_stage\\_%'").fetchall():
            staged = connection.execute(f'SELECT count(*) FROM "{table}"').fetchone()
            if staged and staged[0]:
                found.append(f"{staged[0]} staged upsert row(s) left in {table}")
    return found


def killed_driver_command(shape: str, job: str, workspace: Workspace, python: str) -> list[str]:
    """The command line of ``tests/jobs/chaos_job.py`` running ``shape`` as ``job`` in ``workspace``."""
    root = Path(__file__).resolve().parent.parent
    command = [python, str(root / "tests/jobs/chaos_job.py"), "--shape", shape, "--job", job,
               "--workspace", str(workspace.root)]
    command += ["--dsn", workspace.dsn] if workspace.dsn else []
    return command + (["--kafka", workspace.kafka] if workspace.kafka else [])


def _process_tree(pid: int) -> list[int]:
    """``pid`` and every process descended from it."""
    listing = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True, check=True).stdout
    table = [line.split() for line in listing.splitlines()]
    children: dict[int, list[int]] = collections.defaultdict(list)
    for child, parent in ((int(a), int(b)) for a, b in table):
        children[parent].append(child)
    tree, queue = [], [pid]
    while queue:
        current = queue.pop()
        tree.append(current)
        queue.extend(children[current])
    return tree


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True


def kill_process_tree(pid: int, timeout_s: float = 30.0) -> list[int]:
    """Lose a driver and everything it started at one instant, as when its machine dies.

    Freezes ``pid`` and all its descendants (its embedded Ray: GCS, raylet,
    workers) with SIGSTOP, so none of them acts on another's death, then
    SIGKILLs them and waits until they are gone. Returns the pids killed.
    """
    tree = _process_tree(pid)
    for signal_ in (signal.SIGSTOP, signal.SIGKILL):
        for member in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(member, signal_)
    deadline = time.monotonic() + timeout_s
    while not all(_gone(member) for member in tree) and time.monotonic() < deadline:
        time.sleep(0.05)
    return tree


def environment_without_ray_address() -> dict[str, str]:
    """This process's environment minus ``RAY_ADDRESS``, so a job script starts its own embedded Ray."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
