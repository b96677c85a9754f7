"""Features from Kafka: per-user counts and sums in 10-second windows, into PostgreSQL or back to Kafka.

Reads JSON events ``{"user_id", "amount", "event_time"}`` from a Kafka topic,
keys them by user, counts and sums them in tumbling 10-second event-time
windows and either upserts each ``(user_id, window_start)`` row into a
PostgreSQL table (``--dsn``: an online feature table) or publishes it to a
Kafka topic in transactions (``--output-topic``, keyed by user), exactly once
across failures (Kafka offsets and the window state in checkpoints, the
upserts or transactions committed with them). Event time is tracked per
partition, so the partitions may run apart without making rows late.

A demo that fills the topic itself and checks the table against a numpy reference:

    python examples/kafka_features.py --bootstrap-servers localhost:9092 --topic events \\
        --dsn postgresql://localhost/features --produce 200000

and under ``ray job submit`` (``RAY_ADDRESS`` set, the job joins that cluster):

    RAY_AUTH_MODE=token ray job submit --working-dir . -- python examples/kafka_features.py \\
        --bootstrap-servers kafka:9092 --topic events --dsn postgresql://db/features --follow

``--follow`` reads without end (stop it with ``ray job stop``); without it
the job ends at the topic's end offsets taken at start.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable

import numpy as np
import pyarrow as pa

import onceflow as of
from onceflow.operators.kafka_client import produce_waiting
from onceflow.testing.workload import feature_events, feature_window_reference

SCHEMA = pa.schema([("user_id", pa.int64()), ("amount", pa.float64()), ("event_time", pa.int64())])
"""The events' JSON fields."""

WINDOW_MS = 10_000


def build(bootstrap_servers: str, topic: str, dsn: str | None, table: str = "user_features", *,
          output_topic: str | None = None, follow: bool = False, batch_size: int = 10_000,
          idle_timeout_s: float | None = 5.0) -> of.Dataflow:
    """Return the Kafka → windows → PostgreSQL upsert dataflow, or Kafka → windows → Kafka with ``output_topic``."""
    flow = of.Dataflow("kafka-features")
    events = flow.source(
        of.sources.KafkaSource(bootstrap_servers, topic, SCHEMA, stop_at=None if follow else "end",
                               batch_size=batch_size, idle_timeout_s=idle_timeout_s),
        name="events",
        # Each partition is in event-time order (the producer writes it so): no delay within a partition.
        watermark=of.BoundedOutOfOrderness("event_time", max_delay_ms=0),
    )
    windows = (events.key_by("user_id").window(of.windows.Tumbling(size_ms=WINDOW_MS))
               .aggregate(count=of.agg.count(), total=of.agg.sum("amount")))
    if output_topic is not None:
        windows.sink(of.sinks.KafkaSink(bootstrap_servers, output_topic, key="user_id"), name="features")
    else:
        assert dsn is not None, "give a PostgreSQL dsn or an output topic"
        windows.sink(of.sinks.PostgresSink(dsn, table, mode="upsert", key_columns=["user_id", "window_start"],
                                           create=True), name="features")
    return flow


def produce(bootstrap_servers: str, topic: str, events: int, partitions: int = 4, chunk: int = 100_000,
            rows: Callable[[int, int], pa.RecordBatch] = feature_events) -> None:
    """Create ``topic`` if needed and write the first ``events`` rows of ``rows`` (feature events) to it.

    Event *i* goes to partition ``i % partitions``, so each partition is in event-time order;
    ``rows(offset, n)`` returns rows ``offset .. offset + n`` of the stream.
    """
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap_servers})
    if topic not in admin.list_topics(timeout=30).topics:
        for future in admin.create_topics([NewTopic(topic, num_partitions=partitions)]).values():
            future.result(timeout=30)
    count = len(admin.list_topics(topic, timeout=30).topics[topic].partitions)
    producer = Producer({"bootstrap.servers": bootstrap_servers, "linger.ms": 20})
    for start in range(0, events, chunk):
        for i, row in enumerate(rows(start, min(chunk, events - start)).to_pylist(), start):
            produce_waiting(producer, topic, json.dumps(row).encode(), partition=i % count)
        producer.poll(0)
    if producer.flush(60) != 0:
        msg = f"kafka features: {topic!r} did not take every event within 60 s"
        raise RuntimeError(msg)


def read_table(dsn: str, table: str = "user_features") -> pa.Table:
    """Return the feature table sorted like :func:`~onceflow.testing.workload.feature_window_reference`."""
    import psycopg
    from psycopg import sql

    query = sql.SQL('SELECT user_id, window_start, window_end, "count", total FROM {} '
                    "ORDER BY window_start, user_id").format(sql.Identifier(*table.split(".")))
    with psycopg.connect(dsn) as connection:
        found = connection.execute(query).fetchall()
    columns = list(zip(*found, strict=True)) if found else [[], [], [], [], []]
    return pa.table({name: pa.array(values, kind) for name, values, kind in zip(
        ("user_id", "window_start", "window_end", "count", "total"), columns,
        (pa.int64(), pa.int64(), pa.int64(), pa.int64(), pa.float64()), strict=True)})


def read_topic(bootstrap_servers: str, topic: str) -> pa.Table:
    """Return the committed feature rows of ``topic`` (read_committed), sorted like :func:`read_table`."""
    from confluent_kafka import Consumer, KafkaError, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap_servers, "group.id": "kafka-features-check",
                         "isolation.level": "read_committed", "enable.auto.commit": False,
                         "enable.partition.eof": True})
    try:
        partitions = list(consumer.list_topics(topic, timeout=30).topics[topic].partitions)
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        rows, ended = [], set()
        while len(ended) < len(partitions):
            for message in consumer.consume(10_000, timeout=1.0):
                if message.error() is None:
                    rows.append(json.loads(message.value()))
                elif message.error().code() == KafkaError._PARTITION_EOF:
                    ended.add(message.partition())
    finally:
        consumer.close()
    schema = pa.schema([("user_id", pa.int64()), ("window_start", pa.int64()), ("window_end", pa.int64()),
                        ("count", pa.int64()), ("total", pa.float64())])
    return pa.Table.from_pylist(rows, schema).sort_by([("window_start", "ascending"), ("user_id", "ascending")])


def matches_reference(table: pa.Table, events: int) -> bool:
    """Whether the feature table holds exactly the reference rows for the first ``events`` events."""
    expected = feature_window_reference(events, window_ms=WINDOW_MS)
    if table.num_rows != expected.num_rows:
        return False
    return all(
        np.array_equal(table[name].to_numpy(), expected[name].to_numpy()) for name in ("user_id", "window_start")
    ) and np.array_equal(table["count"].to_numpy(), expected["count"].to_numpy()) and bool(
        np.allclose(table["total"].to_numpy(), expected["total"].to_numpy(), rtol=1e-9))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap-servers", required=True, help="Kafka brokers, host:port[,...]")
    parser.add_argument("--topic", required=True)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--dsn", help="PostgreSQL connection string: upsert the features into --table")
    target.add_argument("--output-topic", help="publish the features to this Kafka topic instead (it must exist)")
    parser.add_argument("--table", default="user_features")
    parser.add_argument("--produce", type=int, default=0, metavar="N",
                        help="first write N demo events to the topic (created with --partitions if missing), "
                             "then check the table against the reference")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--follow", action="store_true", help="read without end instead of up to the end offsets")
    parser.add_argument("--parallelism", type=int, default=2)
    parser.add_argument("--address", default=None, help='Ray address: none for embedded, "auto" for a cluster')
    parser.add_argument("--checkpoint-interval", type=float, default=1.0, help="seconds between checkpoints")
    parser.add_argument("--checkpoints", default=None,
                        help="checkpoint storage (a directory or pyarrow.fs URI; a fresh temporary one by default)")
    args = parser.parse_args()

    if args.produce:
        produce(args.bootstrap_servers, args.topic, args.produce, args.partitions)
    storage = args.checkpoints or tempfile.mkdtemp(prefix="onceflow-checkpoints-")
    result = of.run(build(args.bootstrap_servers, args.topic, args.dsn, args.table, output_topic=args.output_topic,
                          follow=args.follow),
                    parallelism=args.parallelism, address=args.address,
                    checkpoint=of.CheckpointConfig(interval_s=args.checkpoint_interval, storage=storage))
    m = result.metrics
    target = f"topic {args.output_topic}" if args.output_topic else args.table
    print(f"kafka-features: {m['events_in']:,} events -> {m['events_out']:,} (user, window) rows into {target}")
    print(f"  {m['events_per_s']:,.0f} events/s over {m['duration_s']:.2f} s, {m['checkpoints_completed']} "
          f"checkpoint(s) in {storage}")
    if args.produce:
        found = read_topic(args.bootstrap_servers, args.output_topic) if args.output_topic \
            else read_table(args.dsn, args.table)
        ok = matches_reference(found, args.produce)
        print("  the output matches the numpy reference" if ok else "  THE OUTPUT DIFFERS FROM THE REFERENCE")
        if not ok:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
