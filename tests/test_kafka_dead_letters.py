"""KafkaSource(dead_letter=True): messages that do not decode go to the source's dead-letter side output."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
import pytest

import onceflow as of
from onceflow.errors import PlanError
from onceflow.operators.logic import DEAD_LETTERS
from onceflow.operators.sources.base import Idle, SourceContext
from onceflow.operators.sources.kafka import KAFKA_DEAD_LETTER_SCHEMA, KafkaSource, KafkaSourceReader
from onceflow.runtime.plan import plan
from onceflow.testing.source import TestingSource
from onceflow.testing.workload import feature_events
from tests.helpers import assert_feature_reference, run_killing_a_subtask
from tests.kafka_server import KafkaServer
from tests.test_kafka_source import SCHEMA, new_topic, produce, rows, slow

BAD = [b'{"id": 5, "name": ', b'{"id": "seven", "name": "n"}', b"[1, 2]", b"", b'{"id": 1.5}',
       b'{\n  "id": "x"\n}']
"""Values that do not decode as SCHEMA: cut JSON, a string id, a list, empty, a float id, a bad multi-line one."""


def read_all(reader: KafkaSourceReader, timeout_s: float = 30.0) -> tuple[list[pa.RecordBatch], list[pa.RecordBatch]]:
    """Read to the end as the runtime does: after every batch, take what the read set aside."""
    batches: list[pa.RecordBatch] = []
    dead: list[pa.RecordBatch] = []
    deadline = time.monotonic() + timeout_s
    while True:
        assert time.monotonic() < deadline, "the reader did not end in time"
        item = reader.read()
        if item is None:
            break
        if isinstance(item, Idle):
            assert reader.take_side_outputs() == []
            time.sleep(item.seconds)
            continue
        batches.append(item)
        for port, batch in reader.take_side_outputs():
            assert port == DEAD_LETTERS
            dead.append(batch)
    return batches, dead


def test_bad_messages_leave_the_batch_as_dead_letters_and_the_good_ones_go_on_in_order(kafka: KafkaServer) -> None:
    topic = new_topic(kafka, 1)
    values = rows(0, 300)
    bad_at = [0, 7, 8, 150, 151, 152, 299]  # the first, neighbours, a run, the last
    for position, index in enumerate(bad_at):
        values[index] = BAD[position % len(BAD)]
    produce(kafka, topic, values, 1)
    source = KafkaSource(kafka.bootstrap_servers, topic, SCHEMA, stop_at="end", dead_letter=True)
    batches, dead = read_all(source.build(SourceContext("s")))
    good = [i for i in range(300) if i not in bad_at]
    assert pa.Table.from_batches(batches, SCHEMA).to_pylist() == [{"id": i, "name": f"n{i}"} for i in good]
    letters = pa.Table.from_batches(dead, KAFKA_DEAD_LETTER_SCHEMA)
    assert letters.schema == KAFKA_DEAD_LETTER_SCHEMA
    assert letters.column("offset").to_pylist() == bad_at
    assert letters.column("partition").to_pylist() == [0] * len(bad_at)
    assert letters.column("value").to_pylist() == [values[i] for i in bad_at]
    assert letters.column("key").to_pylist() == [str(i).encode() for i in bad_at]
    assert all(t is not None and t > 0 for t in letters.column("timestamp").to_pylist())
    errors = letters.column("error").to_pylist()
    assert errors[0].startswith("invalid JSON")
    assert errors[1].startswith("field 'id' does not convert to int64")
    assert errors[2] == "a JSON list, not an object"
    assert errors[3] == "an empty value"
    assert errors[4].startswith("field 'id' does not convert to int64")
    assert errors[5].startswith("field 'id' does not convert to int64")


def test_a_batch_without_bad_messages_is_what_it_was_and_sets_nothing_aside(kafka: KafkaServer) -> None:
    topic = new_topic(kafka, 2)
    produce(kafka, topic, [*rows(0, 200), b'{\n  "id": 200,\n  "name": "n200"\n}'], 2)
    plain, _ = read_all(KafkaSource(kafka.bootstrap_servers, topic, SCHEMA, stop_at="end").build(SourceContext("s")))
    source = KafkaSource(kafka.bootstrap_servers, topic, SCHEMA, stop_at="end", dead_letter=True)
    batches, dead = read_all(source.build(SourceContext("s")))
    assert dead == []
    assert sorted(r["id"] for b in batches for r in b.to_pylist()) == list(range(201))
    assert pa.Table.from_batches(batches).sort_by("id").equals(pa.Table.from_batches(plain).sort_by("id"))


def test_a_batch_of_only_bad_messages_is_empty_and_all_of_it_dead_letters(kafka: KafkaServer) -> None:
    topic = new_topic(kafka, 1)
    produce(kafka, topic, BAD, 1)
    source = KafkaSource(kafka.bootstrap_servers, topic, SCHEMA, stop_at="end", dead_letter=True)
    reader = source.build(SourceContext("s"))
    batches, dead = read_all(reader)
    assert sum(b.num_rows for b in batches) == 0
    assert all(b.schema == SCHEMA for b in batches)
    assert pa.Table.from_batches(dead).column("offset").to_pylist() == list(range(len(BAD)))
    assert reader.offset() == {"partitions": [[0, len(BAD)]]}


def test_dead_letters_of_a_source_that_has_none_is_a_plan_error() -> None:
    flow = of.Dataflow("no-dead-letters")
    testing = flow.source(TestingSource([pa.record_batch({"x": [1]})]), name="items")
    with pytest.raises(PlanError, match=r"step 'items' \(TestingSource\) emits no dead letters.*dead_letter=True"):
        testing.dead_letters()
    plain = flow.source(KafkaSource("localhost:9092", "t", SCHEMA), name="plain")
    with pytest.raises(PlanError, match=r"'plain' \(KafkaSource\) emits no dead letters.*with dead_letter=True"):
        plain.dead_letters()
    with pytest.raises(PlanError, match=r"dead_letter=True needs format='json'"):
        KafkaSource("localhost:9092", "t", format="raw", dead_letter=True)


def test_the_main_output_stays_chained_to_the_source_beside_its_dead_letters(kafka: KafkaServer) -> None:
    flow = of.Dataflow("chained")
    topic = new_topic(kafka, 2)
    events = flow.source(KafkaSource(kafka.bootstrap_servers, topic, SCHEMA, dead_letter=True), name="events")
    events.map_batches(slow, name="main").sink(of.sinks.TestingSink(), name="out")
    events.dead_letters(name="bad").sink(of.sinks.TestingSink(), name="bad_out")
    physical = plan(flow, parallelism=2)
    assert [v.operators for v in physical.vertices] == [["events", "main", "out"], ["bad", "bad_out"]]
    assert [(o.stage, o.port) for o in physical.vertices[0].outputs] == [(0, DEAD_LETTERS)]


TOTAL = 40_000
FEATURE_BAD = [b'{"user_id": 5, "amount": ', b'{"user_id": "u5", "amount": 1.0, "event_time": 5}', b"[1, 2]", b"",
               b'{"user_id": 1.5, "amount": 1.0, "event_time": 5}',
               b'{\n "user_id": 1, "amount": "x", "event_time": 5\n}']
"""Values that do not decode as the feature events (a value missing a field decodes, with a null there)."""
EVERY = 1_000
"""A bad message before every EVERY-th event: over the run, each partition gets some."""


def dead_letter_flow(name: str, bootstrap_servers: str, topic: str, sink: of.sinks.TestingSink,
                     dead: of.sinks.TestingSink) -> of.Dataflow:
    schema = pa.schema([("user_id", pa.int64()), ("amount", pa.float64()), ("event_time", pa.int64())])
    flow = of.Dataflow(name)
    events = flow.source(KafkaSource(bootstrap_servers, topic, schema, stop_at="end", batch_size=1_000,
                                     dead_letter=True),
                         name="events", watermark=of.BoundedOutOfOrderness("event_time", max_delay_ms=10**9))
    (events.map_batches(slow, name="slow").key_by("user_id").window(of.windows.Tumbling(size_ms=10_000))
     .aggregate(count=of.agg.count(), total=of.agg.sum("amount")).sink(sink, name="out"))
    events.dead_letters(name="bad").sink(dead, name="bad_out")
    return flow


@pytest.mark.usefixtures("ray_session")
def test_a_killed_source_emits_every_good_row_and_every_dead_letter_exactly_once(kafka: KafkaServer,
                                                                              tmp_path: Path) -> None:
    partitions = 4
    topic = new_topic(kafka, partitions)
    values: list[bytes] = []
    bad: dict[tuple[int, int], bytes] = {}  # (partition, offset): value, as produce() spreads the values
    for i, row in enumerate(feature_events(0, TOTAL).to_pylist()):
        if i % EVERY == 0:
            bad[len(values) % partitions, len(values) // partitions] = FEATURE_BAD[len(bad) % len(FEATURE_BAD)]
            values.append(bad[len(values) % partitions, len(values) // partitions])
        values.append(json.dumps(row).encode())
    assert {p for p, _ in bad} == set(range(partitions))
    job = "kafka-dead-letters"
    sink, dead = of.sinks.TestingSink(), of.sinks.TestingSink()
    produce(kafka, topic, values, partitions)
    _, killed, _ = run_killing_a_subtask(
        dead_letter_flow(job, kafka.bootstrap_servers, topic, sink, dead), str(tmp_path / "chk"),
        pick=lambda names: next(n for n in names if n.startswith(f"{job}/events/")))
    assert killed.startswith(f"{job}/events/")
    assert_feature_reference(sink.table(), TOTAL)
    letters = dead.table()
    assert letters.schema == KAFKA_DEAD_LETTER_SCHEMA
    got = sorted(zip(letters.column("partition").to_pylist(), letters.column("offset").to_pylist(), strict=True))
    assert got == sorted(bad), "every bad message is a dead letter exactly once"
    assert [bad[p, o] for p, o in zip(letters.column("partition").to_pylist(),
                                      letters.column("offset").to_pylist(), strict=True)] \
        == letters.column("value").to_pylist()
    assert all(letters.column("error").to_pylist())
