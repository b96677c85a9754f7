"""KafkaSource throughput against a plain confluent-kafka consumer loop.

N feature events (``{"user_id", "amount", "event_time"}`` as JSON, 2
partitions) are written once to a topic on a broker this script starts on
loopback (the test one, noida-db). Then, alternating (the order rotating),
``--repeats`` times each:

- ``onceflow``: a bounded job, ``KafkaSource(stop_at="end")`` (JSON decoded
  into Arrow batches by the source) → a map that counts the rows and drops
  them → ``TestingSink``; parallelism 1, checkpoints off. Events/s is events
  over the job's duration (start-up, about a second on Ray, excluded and
  reported apart);
- ``onceflow-checkpointed``: the same with checkpoints every second;
- ``plain``: one confluent-kafka ``Consumer`` assigned both partitions,
  ``consume()`` in batches of 10,000 to the end offsets, ``json.loads`` of
  every value: what a hand-written reader does, without offsets in
  checkpoints, batches or a runtime.

Writes ``benchmarks/results/kafka.json`` and ``kafka.png``.

    python benchmarks/kafka.py [--events 500000] [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import onceflow as of
from benchmarks.common import pyplot, range_bars, save_figure, start_ray, write_json
from examples.kafka_features import produce as produce_feature_events
from tests.kafka_server import KafkaServer

SCHEMA = pa.schema([("user_id", pa.int64()), ("amount", pa.float64()), ("event_time", pa.int64())])
PARTITIONS = 2
BATCH = 10_000


def produce(bootstrap_servers: str, topic: str, events: int) -> float:
    """Write the events as the example does (event *i* to partition ``i % 2``); return the seconds it took."""
    started = time.perf_counter()
    produce_feature_events(bootstrap_servers, topic, events, PARTITIONS)
    return time.perf_counter() - started


def drop(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Pass nothing on: the benchmark measures the source."""
    return batch.slice(0, 0)


def onceflow_run(bootstrap_servers: str, topic: str, events: int, name: str, checkpointed: bool) -> dict[str, Any]:
    flow = of.Dataflow(name)
    source = of.sources.KafkaSource(bootstrap_servers, topic, SCHEMA, stop_at="end", batch_size=BATCH)
    flow.source(source, name="events").map_batches(drop, name="drop").sink(of.sinks.TestingSink(), name="out")
    storage = tempfile.mkdtemp(prefix="of-bench-kafka-")
    try:
        checkpoint = of.CheckpointConfig(interval_s=1.0, storage=storage) if checkpointed else None
        started = time.perf_counter()
        m = of.run(flow, parallelism=1, checkpoint=checkpoint).metrics
        wall = time.perf_counter() - started
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    assert m["events_in"] == events, (m["events_in"], events)
    return {"events": m["events_in"], "duration_s": m["duration_s"], "events_per_s": m["events_in"] / m["duration_s"],
            "startup_s": m["startup_s"], "processing_s": m["processing_s"], "wall_s": wall,
            "checkpoints": m.get("checkpoints_completed", 0)}


def plain_run(bootstrap_servers: str, topic: str, events: int) -> dict[str, Any]:
    from confluent_kafka import Consumer, KafkaError, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap_servers, "group.id": "bench-plain",
                         "enable.auto.commit": False, "enable.partition.eof": True,
                         "isolation.level": "read_committed"})
    try:
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10, cached=False)[1]
                for p in range(PARTITIONS)}
        started = time.perf_counter()
        consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
        positions = dict.fromkeys(ends, 0)
        count = 0
        amount = 0.0
        while any(positions[p] < end for p, end in ends.items()):
            for message in consumer.consume(BATCH, 0.02):
                error = message.error()
                if error is not None:
                    if error.code() != KafkaError._PARTITION_EOF:
                        raise RuntimeError(error.str())
                    continue
                row = json.loads(message.value())
                amount += row["amount"]
                count += 1
                positions[message.partition()] = message.offset() + 1
        duration = time.perf_counter() - started
    finally:
        consumer.close()
    assert count == events, (count, events)
    return {"events": count, "duration_s": duration, "events_per_s": count / duration}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=500_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 20,000 events, one repeat")
    args = parser.parse_args()
    events, repeats = (20_000, 1) if args.quick else (args.events, args.repeats)
    kinds = ["onceflow", "onceflow-checkpointed", "plain"]
    server = KafkaServer().start()
    try:
        topic = "bench-events"
        server.create_topic(topic, PARTITIONS)
        produce_s = produce(server.bootstrap_servers, topic, events)
        print(f"produced {events:,} events in {produce_s:.1f} s", flush=True)
        start_ray()
        onceflow_run(server.bootstrap_servers, topic, events, "bench-kafka-warmup", False)
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
        for i in range(repeats):
            for kind in kinds[i % 3:] + kinds[:i % 3]:  # the order rotates, so no kind always follows another
                if kind == "plain":
                    run = plain_run(server.bootstrap_servers, topic, events)
                else:
                    run = onceflow_run(server.bootstrap_servers, topic, events, f"bench-{kind}-{i}",
                                       kind == "onceflow-checkpointed")
                runs[kind].append(run)
                print(f"{kind:>22}: {run['events_per_s']:>12,.0f} events/s", flush=True)
    finally:
        server.destroy()
    summary = {k: {"events_per_s_median": statistics.median(r["events_per_s"] for r in v),
                   "events_per_s_min": min(r["events_per_s"] for r in v),
                   "events_per_s_max": max(r["events_per_s"] for r in v)} for k, v in runs.items()}
    ratios = {k: summary[k]["events_per_s_median"] / summary["plain"]["events_per_s_median"]
              for k in ("onceflow", "onceflow-checkpointed")}
    print(f"KafkaSource / plain consumer (medians): {ratios['onceflow']:.2f}x, "
          f"checkpointed {ratios['onceflow-checkpointed']:.2f}x")
    path = write_json("kafka", {"events": events, "partitions": PARTITIONS, "batch_size": BATCH, "parallelism": 1,
                                "repeats": repeats, "produce_s": produce_s, "ratio_to_plain": ratios,
                                "summary": summary, "runs": runs})
    plot(summary, ratios)
    print(f"wrote {path}")


def plot(summary: dict[str, dict[str, float]], ratios: dict[str, float]) -> None:
    plt = pyplot()

    fig, axis = plt.subplots(figsize=(6, 4))
    names = list(summary)
    range_bars(axis, names, [summary[n]["events_per_s_median"] for n in names],
               [summary[n]["events_per_s_min"] for n in names], [summary[n]["events_per_s_max"] for n in names],
               scale=1e3, color=["#4c72b0", "#dd8452", "#55a868"])
    axis.set_ylabel("thousand events/s read and decoded (median, min..max)")
    axis.set_title(f"Kafka JSON: KafkaSource at {ratios['onceflow']:.2f}x a plain consumer loop")
    fig.tight_layout()
    save_figure(fig, "kafka")


if __name__ == "__main__":
    main()
