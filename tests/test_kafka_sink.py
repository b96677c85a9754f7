"""KafkaSink on a real Kafka-protocol broker: pre-commit, commit, abort, recovery by marker, a kill on Ray."""

from __future__ import annotations

import collections
import itertools
import json
import time
from pathlib import Path
from typing import Any

import msgpack
import pyarrow as pa
import pytest
import ray

import onceflow as of
from onceflow.checkpoint.two_phase_commit import CommittableRecord, SinkContext
from onceflow.errors import PlanError
from onceflow.operators.sinks.kafka import KafkaSink, KafkaTransaction
from onceflow.runtime.sink_committer import resolve_sink_operator
from onceflow.testing import failpoints
from onceflow.testing.workload import feature_events, feature_window_reference
from tests.helpers import assert_feature_reference, run_killing_a_subtask
from tests.kafka_server import KafkaServer

_names = itertools.count()


def new_topic(kafka: KafkaServer, partitions: int) -> str:
    name = f"sink{next(_names)}-{time.monotonic_ns()}"
    kafka.create_topic(name, partitions)
    return name


def ids(messages: list[Any]) -> list[int]:
    return sorted(json.loads(m.value())["id"] for m in messages)


def batch(start: int, stop: int) -> pa.RecordBatch:
    return pa.record_batch({"id": list(range(start, stop)), "name": [f"n{i}" for i in range(start, stop)]})


def stored(committables: list[KafkaTransaction], sink: KafkaSink) -> list[KafkaTransaction]:
    """The committables as another process reads them back from a checkpoint."""
    return [sink.read_committable(CommittableRecord.from_dict(msgpack.unpackb(msgpack.packb(c.to_record().to_dict()))))
            for c in committables]


def setup(kafka: KafkaServer, partitions: int = 2) -> tuple[str, KafkaSink, SinkContext]:
    topic = new_topic(kafka, partitions)
    sink = KafkaSink(kafka.bootstrap_servers, topic, key="id", timeout_s=20)
    sink.prepare()
    return topic, sink, SinkContext(f"job-{topic}", "sink_1", 0, 1, run="r1", attempt=1)


def test_pre_committed_rows_are_invisible_until_the_commit_then_visible_once(kafka: KafkaServer) -> None:
    topic, sink, ctx = setup(kafka)
    writer = sink.create_writer(ctx)
    writer.write(batch(0, 60))
    writer.write(batch(60, 100))
    committables = writer.prepare_commit(1)
    assert [c.checkpoint for c in committables] == [1]
    assert kafka.read(topic) == []
    assert ids(kafka.read(topic, "read_uncommitted")) == list(range(100)), "nothing was produced"
    sink.create_committer(ctx).commit(committables)
    messages = kafka.read(topic)
    assert ids(messages) == list(range(100))
    assert {m.key() for m in messages} == {str(i).encode() for i in range(100)}
    by_key = collections.defaultdict(set)
    for m in messages:
        by_key[m.key()].add(m.partition())
    assert all(len(p) == 1 for p in by_key.values())
    assert writer.prepare_commit(2) == [], "a checkpoint without rows pre-commits nothing"
    writer.close()
    sink.create_committer(ctx).commit(stored(committables, sink))  # committed before: a no-op
    assert ids(kafka.read(topic)) == list(range(100))
    assert kafka.open_transactions(topic) == []


def test_an_aborted_writer_s_rows_are_never_visible_to_read_committed(kafka: KafkaServer) -> None:
    topic, sink, ctx = setup(kafka)
    writer = sink.create_writer(ctx)
    writer.write(batch(0, 10))
    sink.create_committer(ctx).commit(writer.prepare_commit(1))
    writer.write(batch(100, 150))
    writer.flush(end_of_input=False)
    writer.abort()
    writer.write(batch(10, 20))
    sink.create_committer(ctx).commit(writer.prepare_commit(2))
    assert ids(kafka.read(topic)) == list(range(20))
    assert ids(kafka.read(topic, "read_uncommitted")) == [*range(20), *range(100, 150)]
    writer.close()


def test_a_commit_lost_in_a_crash_is_made_once_by_recovery_even_twice(kafka: KafkaServer) -> None:
    """(a) The checkpoint completed, the process died before its commit: recovery produces the rows again."""
    topic, sink, ctx = setup(kafka)
    writer = sink.create_writer(ctx)
    writer.write(batch(0, 50))
    committables = writer.prepare_commit(4)
    writer.write(batch(50, 70))  # the next transaction, open when the process dies
    writer.flush(end_of_input=False)
    writer.close()
    assert kafka.read(topic) == []
    recovered = stored(committables, sink)
    resolve_sink_operator(sink, ctx, recovered, recovered)
    assert ids(kafka.read(topic)) == list(range(50))
    resolve_sink_operator(sink, ctx, recovered, recovered)
    assert ids(kafka.read(topic)) == list(range(50)), "a second recovery produced the rows again"
    uncommitted = ids(kafka.read(topic, "read_uncommitted"))
    assert uncommitted == sorted([*range(50), *range(50), *range(50, 70)]), "the replay path did not run"
    assert kafka.open_transactions(topic) == []
    assert kafka.open_transactions(sink.marker_topic) == []
    assert sink.create_committer(ctx).lingering() == []


def test_a_commit_made_before_the_crash_is_not_made_again_by_recovery(kafka: KafkaServer) -> None:
    """(b) The commit happened but was not recorded: recovery finds the marker and does nothing."""
    topic, sink, ctx = setup(kafka)
    writer = sink.create_writer(ctx)
    writer.write(batch(0, 40))
    committables = writer.prepare_commit(9)
    sink.create_committer(ctx).commit(committables)
    writer.close()
    recovered = stored(committables, sink)
    resolve_sink_operator(sink, ctx, recovered, recovered)
    resolve_sink_operator(sink, ctx, recovered, recovered)
    assert ids(kafka.read(topic)) == list(range(40))
    assert ids(kafka.read(topic, "read_uncommitted")) == list(range(40)), "recovery produced it again"


def test_recovery_aborts_an_open_transaction_and_a_pre_committed_one_not_in_the_checkpoint(kafka: KafkaServer) -> None:
    topic, sink, ctx = setup(kafka)
    other = SinkContext(ctx.job, ctx.operator, 1, 2, run="r1", attempt=1)
    first, second = sink.create_writer(other), sink.create_writer(SinkContext(ctx.job, ctx.operator, 0, 2))
    first.write(batch(0, 10))
    first.prepare_commit(3)  # its checkpoint never completed
    second.write(batch(10, 20))  # open
    second.flush(end_of_input=False)
    first.close()
    second.close()
    assert kafka.open_transactions(topic) != []
    assert sink.create_committer(ctx).lingering() == [KafkaSink.transactional_id(other, 0)]
    resolve_sink_operator(sink, SinkContext(ctx.job, ctx.operator, 0, 1), [], [])
    assert kafka.open_transactions(topic) == [] and kafka.open_transactions(sink.marker_topic) == []
    assert kafka.read(topic) == []


def test_bad_options_and_a_missing_topic_are_plan_errors(kafka: KafkaServer) -> None:
    with pytest.raises(PlanError, match="format must be 'json'"):
        KafkaSink(kafka.bootstrap_servers, "x", format="avro")
    with pytest.raises(PlanError, match="topic 'no-such-sink-topic' does not exist"):
        KafkaSink(kafka.bootstrap_servers, "no-such-sink-topic").prepare()


def test_bad_delivery_is_a_plan_error() -> None:
    with pytest.raises(PlanError, match="delivery must be 'exactly_once' or 'at_least_once', got 'once'"):
        KafkaSink("127.0.0.1:9", "x", delivery="once")


# -- the transaction timeout against the checkpoint settings --

RESTART = of.RestartStrategy.default()


def test_the_transaction_timeout_must_outlast_every_checkpoint_a_transaction_may_wait_for() -> None:
    sink = KafkaSink("127.0.0.1:9", "out", transaction_timeout_s=100)
    sink.check_job(of.CheckpointConfig(interval_s=5, min_pause_s=1, timeout_s=30), RESTART)  # 36 s
    sink.check_job(of.CheckpointConfig(interval_s=5, timeout_s=44, tolerable_failures=1), RESTART)  # 98 s
    sink.check_job(None, RESTART)  # no checkpoints: nothing to hold it against
    with pytest.raises(PlanError) as refused:
        sink.check_job(of.CheckpointConfig(interval_s=5, min_pause_s=1, timeout_s=14, tolerable_failures=4), RESTART)
    message = str(refused.value)
    assert "kafka sink 'out'" in message and "(100 s)" in message and "100 s = (tolerable_failures 4 + 1)" in message
    assert "raise transaction_timeout_s" in message and "shorten the checkpoint interval_s or timeout_s" in message
    with pytest.raises(PlanError, match="must be above"):
        sink.check_job(of.CheckpointConfig(interval_s=40, timeout_s=60), RESTART)  # equal is not above


def test_at_least_once_is_not_held_to_the_transaction_timeout() -> None:
    sink = KafkaSink("127.0.0.1:9", "out", delivery="at_least_once", transaction_timeout_s=1)
    sink.check_job(of.CheckpointConfig(interval_s=5, timeout_s=600, tolerable_failures=3), RESTART)


@pytest.mark.usefixtures("ray_session")
def test_submit_refuses_checkpoints_longer_than_the_transaction_timeout_before_any_actor(kafka: KafkaServer,
                                                                                      tmp_path: Path) -> None:
    job = "kafka-sink-timeout-refused"
    sink = KafkaSink(kafka.bootstrap_servers, new_topic(kafka, 1), transaction_timeout_s=30)
    flow = of.Dataflow(job)
    flow.source(of.sources.GeneratorSource(feature_events, total=10, batch_size=10)).sink(sink, name="out")
    with pytest.raises(PlanError, match=r"transaction_timeout_s \(30 s\) must be above .* 70 s"):
        of.submit(flow, checkpoint=of.CheckpointConfig(interval_s=10, timeout_s=60, storage=str(tmp_path)))
    assert not [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(f"{job}/")]
    assert sink.marker_topic not in kafka.topics(), "the sink was prepared before the check"


# -- at least once --


def test_at_least_once_rows_are_visible_to_read_committed_readers_without_a_commit(kafka: KafkaServer) -> None:
    topic = new_topic(kafka, 2)
    sink = KafkaSink(kafka.bootstrap_servers, topic, key="id", delivery="at_least_once", timeout_s=20)
    sink.prepare()
    writer = sink.create_writer(SinkContext(f"job-{topic}", "sink_1", 0, 1))
    writer.write(batch(0, 60))
    writer.flush(end_of_input=False)
    assert ids(kafka.read(topic)) == list(range(60))
    writer.write(batch(60, 100))
    assert writer.prepare_commit(1) == [], "at least once pre-commits nothing"
    assert ids(kafka.read(topic)) == list(range(100)), "a completed barrier left rows undelivered"
    assert kafka.open_transactions(topic) == []
    assert sink.marker_topic not in kafka.topics(), "at least once needs no marker topic"
    assert sink.create_committer(SinkContext(f"job-{topic}", "sink_1", 0, 1)).lingering() == []


def test_at_least_once_pre_commit_fails_when_rows_cannot_be_delivered() -> None:
    """The broker goes away between a write and the barrier: the barrier must not pass."""
    server = KafkaServer().start()
    try:
        server.create_topic("gone", 1)
        sink = KafkaSink(server.bootstrap_servers, "gone", delivery="at_least_once", timeout_s=10,
                         config={"message.timeout.ms": 2_000})
        writer = sink.create_writer(SinkContext("job-gone", "sink_1", 0, 1))
        writer.write(batch(0, 10))
        assert writer.prepare_commit(1) == []
    finally:
        server.destroy()
    writer.write(batch(10, 20))
    with pytest.raises(of.errors.SinkCommitError, match="kafka sink 'gone': a write of subtask 0 .* failed"):
        writer.prepare_commit(2)


def test_the_committable_layout_is_version_1() -> None:
    t = KafkaTransaction("onceflow:j:s:0:1", 2, "tok", "out", "id", "out.onceflow-commits", 5, b"rows")
    assert KafkaTransaction.from_record(t.to_record()) == t
    with pytest.raises(of.errors.SinkCommitError, match="version 7 is not supported"):
        KafkaTransaction.from_record(CommittableRecord(7, t.fields()))


# -- end to end on Ray --

TOTAL = 200_000
SCHEMA = pa.schema([("user_id", pa.int64()), ("window_start", pa.int64()), ("window_end", pa.int64()),
                    ("count", pa.int64()), ("total", pa.float64())])


def kafka_flow(job: str, sink: KafkaSink) -> of.Dataflow:
    """Windows fire while the input runs (paced), so transactions commit before, during and after a failure."""
    flow = of.Dataflow(job)
    # About 5 s of input at parallelism 2: the kill lands while windows are still committing, even under load.
    events = flow.source(of.sources.GeneratorSource(feature_events, total=TOTAL, batch_size=2_000,
                                                    max_events_per_s=20_000),
                         watermark=of.BoundedOutOfOrderness("event_time"))
    (events.key_by("user_id").window(of.windows.Tumbling(size_ms=10_000))
     .aggregate(count=of.agg.count(), total=of.agg.sum("amount")).sink(sink, name="out"))
    return flow


def assert_exactly_once_in(kafka: KafkaServer, sink: KafkaSink, job: str) -> None:
    rows = [json.loads(m.value()) for m in kafka.read(sink.topic)]
    assert_feature_reference(pa.Table.from_pylist(rows, SCHEMA), TOTAL)
    assert kafka.open_transactions(sink.topic) == [], "a transaction of the job is still open"
    assert kafka.open_transactions(sink.marker_topic) == []
    assert sink.create_committer(SinkContext(job, "out", 0, 2)).lingering() == []


@pytest.mark.usefixtures("ray_session")
def test_a_killed_sink_subtask_changes_nothing_committed_to_kafka(kafka: KafkaServer, tmp_path: Path) -> None:
    job = "kafka-sink-kill"
    sink = KafkaSink(kafka.bootstrap_servers, new_topic(kafka, 3), key="user_id", timeout_s=20)
    # The last vertex, which the sink ends, once windows were committed.
    _, killed, committed = run_killing_a_subtask(kafka_flow(job, sink), str(tmp_path / "chk"),
                                                 pick=lambda names: names[-1],
                                                 before_kill=lambda: len(kafka.read(sink.topic)))
    assert killed.startswith(f"{job}/") and not killed.startswith(f"{job}/source"), killed
    assert 0 < (committed or 0) < feature_window_reference(TOTAL).num_rows, "the kill did not land mid-output"
    assert_exactly_once_in(kafka, sink, job)


@pytest.mark.slow  # about 20 s more of Ray; the same case runs without Ray above
@pytest.mark.usefixtures("ray_session")
def test_a_sink_that_dies_after_its_checkpoint_completed_before_its_commit(kafka: KafkaServer,
                                                                          tmp_path: Path) -> None:
    """The hard case on Ray: recovery in another process finds no marker and produces the rows again."""
    job = "kafka-sink-before-commit"
    sink = KafkaSink(kafka.bootstrap_servers, new_topic(kafka, 3), key="user_id", timeout_s=20)
    failpoints.arm(job, "sink.before_commit.1")
    try:
        result = of.run(kafka_flow(job, sink), parallelism=2,
                        checkpoint=of.CheckpointConfig(interval_s=0.2, storage=str(tmp_path)),
                        restart=of.RestartStrategy.fixed_delay(attempts=3, delay_s=0.1))
    finally:
        fired = not failpoints.armed(job, "sink.before_commit.1")
        failpoints.disarm_all()
    assert fired, "the failpoint was never reached"
    # A crash at the commit of the final checkpoint may be resolved as the job ends, without a restart.
    assert_exactly_once_in(kafka, sink, job)
    tokens = collections.Counter(json.loads(m.value())["token"] for m in kafka.read(sink.marker_topic))
    written = collections.Counter(json.loads(m.value())["token"]
                                  for m in kafka.read(sink.marker_topic, "read_uncommitted"))
    assert set(tokens.values()) == {1}, "a transaction committed twice"
    if result.metrics["restarts"]:  # recovered by a restart: the lost transaction was produced again
        assert any(n > 1 and tokens[t] == 1 for t, n in written.items()), "nothing was produced again"


def test_recovery_finds_commits_made_after_aborted_transactions_of_the_same_ids(kafka: KafkaServer) -> None:
    """A crashed attempt's transactions were aborted; the next attempt committed: recovery must not produce again."""
    topic, sink, _ = setup(kafka)
    first, second = SinkContext(f"job-{topic}", "sink_1", 0, 2), SinkContext(f"job-{topic}", "sink_1", 1, 2)
    crashed = [sink.create_writer(first), sink.create_writer(second)]
    crashed[0].write(batch(0, 10))
    crashed[1].write(batch(10, 20))
    for writer in crashed:
        writer.prepare_commit(1)  # checkpoint 1 never completes
        writer.close()
    resolve_sink_operator(sink, first, [], [])  # aborts both by fencing their ids
    writers = [sink.create_writer(first), sink.create_writer(second)]
    writers[1].write(batch(10, 20))
    writers[0].write(batch(0, 10))
    committables = writers[1].prepare_commit(2) + writers[0].prepare_commit(2)
    sink.create_committer(first).commit(committables)
    for writer in writers:
        writer.close()
    recovered = stored(committables, sink)
    resolve_sink_operator(sink, first, recovered, recovered)
    assert ids(kafka.read(topic)) == list(range(20)), "recovery produced a committed transaction again"
    assert ids(kafka.read(topic, "read_uncommitted")) == sorted([*range(20), *range(20)])


@pytest.mark.usefixtures("ray_session")
def test_a_killed_at_least_once_sink_subtask_loses_no_row(kafka: KafkaServer, tmp_path: Path) -> None:
    sink = KafkaSink(kafka.bootstrap_servers, new_topic(kafka, 3), key="user_id", delivery="at_least_once",
                     timeout_s=20)
    _, _, written = run_killing_a_subtask(kafka_flow("kafka-sink-alo-kill", sink), str(tmp_path / "chk"),
                                          pick=lambda names: names[-1],
                                          before_kill=lambda: len(kafka.read(sink.topic)))
    reference = feature_window_reference(TOTAL).num_rows
    assert 0 < (written or 0) < reference, "the kill did not land mid-output"
    rows = [json.loads(m.value()) for m in kafka.read(sink.topic)]
    first: dict[tuple[int, int], dict[str, Any]] = {}
    for row in rows:
        first.setdefault((row["user_id"], row["window_start"]), row)
    assert len(rows) >= reference
    assert_feature_reference(pa.Table.from_pylist(list(first.values()), SCHEMA), TOTAL)  # each row at least once
    assert kafka.open_transactions(sink.topic) == []
