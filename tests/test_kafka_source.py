"""KafkaSource on a real Kafka-protocol broker: partitions as splits, offsets, rescaling, transactions, recovery."""

from __future__ import annotations

import collections
import itertools
import json
import time
from pathlib import Path

import pyarrow as pa
import pytest
from confluent_kafka import Producer

import onceflow as of
from onceflow.errors import DataError, OperatorError, PlanError
from onceflow.operators.sources.base import Idle, RescaledOffsets, SourceContext, SourceReader
from onceflow.operators.sources.kafka import KAFKA_RAW_SCHEMA, KafkaSource
from onceflow.testing.workload import feature_events
from tests.helpers import assert_feature_reference, run_killing_a_subtask, wait_until
from tests.kafka_server import KafkaServer

SCHEMA = pa.schema([("id", pa.int64()), ("name", pa.string())])
_topics = itertools.count()


def new_topic(kafka: KafkaServer, partitions: int) -> str:
    name = f"t{next(_topics)}-{time.monotonic_ns()}"
    kafka.create_topic(name, partitions)
    return name


def produce(kafka: KafkaServer, topic: str, values: list[bytes], partitions: int) -> None:
    """Write ``values`` round-robin over the partitions: value *i* to partition ``i % partitions``."""
    producer = Producer({"bootstrap.servers": kafka.bootstrap_servers, "linger.ms": 5})
    for i, value in enumerate(values):
        producer.produce(topic, value, key=str(i).encode(), partition=i % partitions)
    assert producer.flush(30) == 0


def rows(start: int, stop: int) -> list[bytes]:
    return [json.dumps({"id": i, "name": f"n{i}", "extra": True}).encode() for i in range(start, stop)]


def read_batches(reader: SourceReader, limit: int | None = None, timeout_s: float = 30.0) -> list[pa.RecordBatch]:
    """Read to the end (or ``limit`` batches), waiting out ``Idle``; fail after ``timeout_s``."""
    batches: list[pa.RecordBatch] = []
    deadline = time.monotonic() + timeout_s
    while limit is None or len(batches) < limit:
        assert time.monotonic() < deadline, "the reader did not end in time"
        item = reader.read()
        if item is None:
            break
        if isinstance(item, Idle):
            time.sleep(item.seconds)
            continue
        batches.append(item)
    return batches


def ids(batches: list[pa.RecordBatch]) -> list[int]:
    return [i for b in batches for i in b.column("id").to_pylist()]


def test_a_bounded_read_returns_every_message_once_decoded_by_the_schema(kafka: KafkaServer) -> None:
    topic = new_topic(kafka, 3)
    produce(kafka, topic, rows(0, 500), 3)
    source = KafkaSource(kafka.bootstrap_servers, topic, SCHEMA, stop_at="end", batch_size=64)
    assert source.max_parallelism() == 3
    reader = source.build(SourceContext("source_0"))
    batches = read_batches(reader)
    assert all(b.schema.equals(SCHEMA) and b.num_rows <= 64 for b in batches)
    assert sorted(ids(batches)) == list(range(500))
    table = pa.Table.from_batches(batches)
    assert table.filter(pa.compute.equal(table["id"], 7))["name"].to_pylist() == ["n7"]
    assert reader.offset() == {"partitions": [[0, 167], [1, 167], [2, 166]]}
    assert reader.read() is None


def test_raw_format_has_key_value_partition_offset_and_timestamp(kafka: KafkaServer) -> None:
    topic = new_topic(kafka, 2)
    produce(kafka, topic, [b"a", b"b", b"c"], 2)
    before_ms = int(time.time() * 1000) - 60_000
    reader = KafkaSource(kafka.bootstrap_servers, topic, format="raw", stop_at="end").build(SourceContext("source_0"))
    table = pa.Table.from_batches(read_batches(reader)).sort_by([("partition", "ascending"), ("offset", "ascending")])
    assert table.schema.equals(KAFKA_RAW_SCHEMA)
    assert table.select(["key", "value", "partition", "offset"]).to_pylist() == [
        {"key": b"0", "value": b"a", "partition": 0, "offset": 0},
        {"key": b"2", "value": b"c", "partition": 0, "offset": 1},
        {"key": b"1", "value": b"b", "partition": 1, "offset": 0},
    ]
    assert all(t > before_ms for t in table["timestamp"].to_pylist())


def test_a_reader_resumed_from_its_offset_continues_right_after(kafka: KafkaServer) -> None:
    topic = new_topic(kafka, 3)
    produce(kafka, topic, rows(0, 300), 3)
    source = KafkaSource(kafka.bootstrap_servers, topic, SCHEMA, stop_at="end", batch_size=25)
    first = source.build(SourceContext("source_0"))
    head = read_batches(first, limit=3)
    offset = first.offset()
    first.close()
    rest = read_batches(source.build(SourceContext("source_0"), offset))
    seen = ids(head) + ids(rest)
    assert len(ids(head)) == 75
    assert sorted(seen) == list(range(300)), "a message was skipped or read twice"


def test_a_rescale_from_two_to_three_readers_reads_every_message_exactly_once(kafka: KafkaServer) -> None:
    topic = new_topic(kafka, 5)
    produce(kafka, topic, rows(0, 1_000), 5)
    source = KafkaSource(kafka.bootstrap_servers, topic, SCHEMA, stop_at="end", batch_size=30)
    seen: list[int] = []
    offsets = []
    for subtask in range(2):
        reader = source.build(SourceContext("source_0", subtask, 2))
        seen += ids(read_batches(reader, limit=4))
        offsets.append(reader.offset())
        reader.close()
    assert [p for p, _ in offsets[0]["partitions"]] == [0, 2, 4]
    assert [p for p, _ in offsets[1]["partitions"]] == [1, 3]
    for subtask in range(3):
        reader = source.build(SourceContext("source_0", subtask, 3), RescaledOffsets(tuple(offsets)))
        assert [p for p, _ in reader.offset()["partitions"]] == list(range(subtask, 5, 3))
        seen += ids(read_batches(reader))
    twice = sorted(i for i, n in collections.Counter(seen).items() if n > 1)
    assert sorted(seen) == list(range(1_000)), f"read twice: {twice}"


def test_read_committed_skips_aborted_transactions_and_ends_before_an_open_one(kafka: KafkaServer) -> None:
    topic = new_topic(kafka, 1)
    producer = Producer({"bootstrap.servers": kafka.bootstrap_servers, "transactional.id": f"tx-{topic}"})
    producer.init_transactions(30)
    for start, commit in ((0, True), (100, False), (3, True)):
        producer.begin_transaction()
        for value in rows(start, start + 3):
            producer.produce(topic, value, partition=0)
        producer.flush(30)
        producer.commit_transaction(30) if commit else producer.abort_transaction(30)
    producer.begin_transaction()  # left open while the reader starts: its records are after the end
    producer.produce(topic, rows(200, 201)[0], partition=0)
    producer.flush(30)
    try:
        source = KafkaSource(kafka.bootstrap_servers, topic, SCHEMA, stop_at="end")
        assert ids(read_batches(source.build(SourceContext("source_0")))) == list(range(6))
        uncommitted = KafkaSource(kafka.bootstrap_servers, topic, SCHEMA, stop_at="end",
                                  isolation_level="read_uncommitted")
        assert sorted(ids(read_batches(uncommitted.build(SourceContext("source_0"))))) == [
            *range(6), 100, 101, 102, 200]
    finally:
        producer.abort_transaction(30)


def test_a_message_that_does_not_decode_fails_naming_topic_partition_and_offset(kafka: KafkaServer) -> None:
    topic = new_topic(kafka, 2)
    produce(kafka, topic, [*rows(0, 5), b'{"id": 5, "name": ', *rows(6, 8)], 2)  # message 5: partition 1, offset 2
    reader = KafkaSource(kafka.bootstrap_servers, topic, SCHEMA, stop_at="end").build(SourceContext("source_0"))
    with pytest.raises(DataError, match=rf"topic '{topic}' partition 1 offset 2 does not decode"):
        read_batches(reader)
    wrong_type = new_topic(kafka, 1)
    produce(kafka, wrong_type, [*rows(0, 2), b'{"id": "seven"}'], 1)
    reader = KafkaSource(kafka.bootstrap_servers, wrong_type, SCHEMA, stop_at="end").build(SourceContext("s"))
    with pytest.raises(DataError, match=rf"topic '{wrong_type}' partition 0 offset 2"):
        read_batches(reader)


def test_a_value_spanning_lines_decodes_like_the_others(kafka: KafkaServer) -> None:
    topic = new_topic(kafka, 1)
    produce(kafka, topic, [*rows(0, 2), b'{\n  "id": 2,\n  "name": "n2"\n}', *rows(3, 4)], 1)
    reader = KafkaSource(kafka.bootstrap_servers, topic, SCHEMA, stop_at="end").build(SourceContext("s"))
    assert pa.Table.from_batches(read_batches(reader)).to_pylist() == [{"id": i, "name": f"n{i}"} for i in range(4)]


def test_messages_after_the_end_stay_unread_in_the_offset(kafka: KafkaServer) -> None:
    """With ``stop_at="end"``, what arrives after the reader started is left for a later run."""
    topic = new_topic(kafka, 1)
    produce(kafka, topic, rows(0, 10), 1)
    bounded = KafkaSource(kafka.bootstrap_servers, topic, SCHEMA, stop_at="end", batch_size=4)
    reader = bounded.build(SourceContext("s"))
    first = read_batches(reader, limit=1)
    produce(kafka, topic, rows(10, 20), 1)
    seen = ids(first) + ids(read_batches(reader))
    assert seen == list(range(10)) and reader.offset() == {"partitions": [[0, 10]]}
    later = KafkaSource(kafka.bootstrap_servers, topic, SCHEMA, batch_size=100).build(SourceContext("s"),
                                                                                       reader.offset())
    following: list[int] = []

    def ten_more() -> bool:
        item = later.read()
        following.extend(ids([item]) if isinstance(item, pa.RecordBatch) else [])
        return len(following) >= 10

    wait_until(ten_more, timeout_s=30, what="the later messages")
    assert following == list(range(10, 20))
    later.close()


def test_a_missing_topic_or_broker_is_a_clear_error_in_bounded_time(kafka: KafkaServer) -> None:
    missing = KafkaSource(kafka.bootstrap_servers, "no-such-topic", SCHEMA, metadata_timeout_s=5)
    with pytest.raises(PlanError, match="topic 'no-such-topic' does not exist.*create it first"):
        missing.max_parallelism()
    with pytest.raises(OperatorError, match="topic 'no-such-topic' does not exist"):
        missing.build(SourceContext("source_0"))
    flow = of.Dataflow("kafka-missing")
    flow.source(missing, name="events").sink(of.sinks.TestingSink(), name="out")
    with pytest.raises(PlanError, match="does not exist"):
        of.submit(flow)
    started = time.monotonic()
    with pytest.raises(PlanError, match="no metadata for topic 'x' from 127.0.0.1:1 within 1"):
        KafkaSource("127.0.0.1:1", "x", SCHEMA, metadata_timeout_s=1).max_parallelism()
    assert time.monotonic() - started < 10


def test_a_malformed_resume_offset_is_a_plan_error(kafka: KafkaServer) -> None:
    topic = new_topic(kafka, 1)
    with pytest.raises(PlanError, match="is not {'partitions'"):
        KafkaSource(kafka.bootstrap_servers, topic, SCHEMA).build(SourceContext("s"), {"cursors": [[1, 0, 0, 0]]})


# -- end to end on Ray --

TOTAL = 60_000


def slow(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Pace the readers so a checkpoint completes and a kill lands before the input ends."""
    time.sleep(0.08)
    return batch


def window_flow(name: str, bootstrap_servers: str, topic: str, sink: of.sinks.TestingSink) -> of.Dataflow:
    schema = pa.schema([("user_id", pa.int64()), ("amount", pa.float64()), ("event_time", pa.int64())])
    flow = of.Dataflow(name)
    # Partitions are read side by side, so one may run far ahead of another in event time: a bound
    # beyond the whole input keeps every row on time, and the windows fire at the end of the input.
    events = flow.source(KafkaSource(bootstrap_servers, topic, schema, stop_at="end", batch_size=1_000),
                         name="events", watermark=of.BoundedOutOfOrderness("event_time", max_delay_ms=10**9))
    (events.map_batches(slow, name="slow").key_by("user_id").window(of.windows.Tumbling(size_ms=10_000))
     .aggregate(count=of.agg.count(), total=of.agg.sum("amount")).sink(sink, name="out"))
    return flow


@pytest.mark.usefixtures("ray_session")
def test_a_killed_subtask_changes_nothing_committed_from_kafka(kafka: KafkaServer, tmp_path: Path) -> None:
    topic = new_topic(kafka, 4)
    events = feature_events(0, TOTAL).to_pylist()
    produce(kafka, topic, [json.dumps(row).encode() for row in events], 4)
    sink = of.sinks.TestingSink()
    _, killed, _ = run_killing_a_subtask(window_flow("kafka-kill", kafka.bootstrap_servers, topic, sink),
                                         str(tmp_path / "chk"), pick=lambda names: names[0])
    assert killed.startswith("kafka-kill/events/")
    assert_feature_reference(sink.table(), TOTAL)


def test_a_reader_keeps_each_partitions_event_time_in_its_offset_and_resumes_it(kafka: KafkaServer) -> None:
    topic = new_topic(kafka, 2)
    schema = pa.schema([("id", pa.int64()), ("t", pa.int64())])
    produce(kafka, topic, [json.dumps({"id": i, "t": 1_000 * i}).encode() for i in range(6)], 2)
    source = KafkaSource(kafka.bootstrap_servers, topic, schema, stop_at="end")
    strategy = of.BoundedOutOfOrderness("t", max_delay_ms=10)
    reader = source.build(SourceContext("events"))
    watermarks = reader.split_watermarks(strategy, None)
    read_batches(reader)
    assert watermarks.on_batch(pa.record_batch({"t": [0]})) == 3_989  # partition 1's last is 5,000; 0's 4,000
    offset = reader.offset()
    assert offset == {"partitions": [[0, 3], [1, 3]], "event_times": [[0, 4_000], [1, 5_000]]}
    resumed = source.build(SourceContext("events"), offset)
    again = resumed.split_watermarks(strategy, watermarks.max_event_time)
    assert again.on_start() == 3_989
    assert again.split_max_event_times() == {0: 4_000, 1: 5_000}
    resumed.close()
    plain = source.build(SourceContext("events"))
    assert plain.offset() == {"partitions": [[0, 0], [1, 0]]}  # no watermark, no event times
    plain.close()


def idle_partition_flow(name: str, bootstrap_servers: str, topic: str, sink: of.sinks.TestingSink,
                        idle_timeout_s: float | None) -> of.Dataflow:
    schema = pa.schema([("user_id", pa.int64()), ("amount", pa.float64()), ("event_time", pa.int64())])
    flow = of.Dataflow(name)
    events = flow.source(KafkaSource(bootstrap_servers, topic, schema, idle_timeout_s=idle_timeout_s),
                         name="events", watermark=of.BoundedOutOfOrderness("event_time"))
    (events.key_by("user_id").window(of.windows.Tumbling(size_ms=10_000))
     .aggregate(count=of.agg.count()).sink(sink, name="out"))
    return flow


@pytest.mark.parametrize("idle_timeout_s", [0.3, None])
def test_a_partition_without_data_stalls_windows_unless_it_goes_idle(kafka: KafkaServer, tmp_path: Path,
                                                                      idle_timeout_s: float | None) -> None:
    topic = new_topic(kafka, 2)
    producer = Producer({"bootstrap.servers": kafka.bootstrap_servers, "linger.ms": 5})
    for i in range(400):  # partition 0 only: event times 0 .. 39,900, four 10 s windows
        producer.produce(topic, json.dumps({"user_id": 1, "amount": 1.0, "event_time": 100 * i}).encode(),
                         partition=0)
    assert producer.flush(30) == 0
    sink = of.sinks.TestingSink()
    handle = of.submit(idle_partition_flow(f"kafka-idle-{idle_timeout_s}", kafka.bootstrap_servers, topic, sink,
                                           idle_timeout_s),
                       parallelism=1, executor="local",
                       checkpoint=of.CheckpointConfig(interval_s=0.1, storage=str(tmp_path)))
    try:
        if idle_timeout_s is not None:
            wait_until(lambda: len(sink.rows()) == 3, timeout_s=30, what="three windows to fire")
            assert sorted((r["window_start"], r["count"]) for r in sink.rows()) == [
                (0, 100), (10_000, 100), (20_000, 100)]
        else:
            wait_until(lambda: handle.metrics()["events_in"] == 400, timeout_s=30, what="every event read")
            done = handle.metrics()["checkpoints_completed"]
            time.sleep(2.0)  # a bounded wait: checkpoints go on, no window fires
            assert handle.metrics()["checkpoints_completed"] > done
            assert sink.rows() == []
    finally:
        handle.cancel()


def partition_spread(reader: SourceReader, batches: int) -> list[int]:
    """After each of ``batches`` reads, how far apart partitions 0 and 1 are in event time (ms; -1 before any)."""
    spreads = []
    watermarks = reader.split_watermarks(of.BoundedOutOfOrderness("t"), None)  # type: ignore[attr-defined]
    for _ in range(batches):
        read_batches(reader, limit=1)
        times = watermarks.split_max_event_times()
        spreads.append(abs(times.get(0, -1) - times.get(1, -1)))
    return spreads


def test_a_reader_keeps_its_partitions_in_step_in_event_time(kafka: KafkaServer) -> None:
    # A backlog in two partitions, each in event-time order: the client hands out long runs of one partition.
    topic = new_topic(kafka, 2)
    schema = pa.schema([("id", pa.int64()), ("t", pa.int64())])
    produce(kafka, topic, [json.dumps({"id": i, "t": i}).encode() for i in range(8_000)], 2)
    unaligned = KafkaSource(kafka.bootstrap_servers, topic, schema, stop_at="end", batch_size=100,
                            max_partition_skew_ms=None).build(SourceContext("events"))
    assert max(partition_spread(unaligned, 30)) > 2_000, "the client interleaved the partitions by itself"
    unaligned.close()
    source = KafkaSource(kafka.bootstrap_servers, topic, schema, stop_at="end", batch_size=100,
                         max_partition_skew_ms=300)
    reader = source.build(SourceContext("events"))
    spreads = partition_spread(reader, 30)
    # A partition is paused once it is 300 ms ahead; a batch read before the pause adds at most 200 ms
    # (the first batch, before the other partition delivered anything, spans 200 ms from -1).
    assert max(spreads) <= 300 + 200, spreads
    rest = read_batches(reader)
    assert reader.read() is None
    resumed = source.build(SourceContext("events"))
    assert sorted(ids(read_batches(resumed))) == list(range(8_000)), "pausing changed what was read"
    assert rest and reader.offset()["partitions"] == [[0, 4_000], [1, 4_000]]


def test_a_partition_at_its_end_does_not_hold_the_others(kafka: KafkaServer) -> None:
    topic = new_topic(kafka, 2)
    schema = pa.schema([("id", pa.int64()), ("t", pa.int64())])
    producer = Producer({"bootstrap.servers": kafka.bootstrap_servers})
    producer.produce(topic, json.dumps({"id": 0, "t": 0}).encode(), partition=1)  # partition 1: one old event
    for i in range(1, 2_001):
        producer.produce(topic, json.dumps({"id": i, "t": 10 * i}).encode(), partition=0)
    assert producer.flush(30) == 0
    reader = KafkaSource(kafka.bootstrap_servers, topic, schema, batch_size=100,
                         max_partition_skew_ms=100).build(SourceContext("events"))
    reader.split_watermarks(of.BoundedOutOfOrderness("t"), None)
    found: list[int] = []
    deadline = time.monotonic() + 30
    while len(found) < 2_001:  # unbounded: partition 1 is caught up, not ended, and far behind
        assert time.monotonic() < deadline, f"partition 0 was held back after {len(found)} rows"
        found += ids(read_batches(reader, limit=1, timeout_s=30))
    assert sorted(found) == list(range(2_001))
    reader.close()
