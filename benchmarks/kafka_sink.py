"""KafkaSink: throughput exactly once against at least once, and end-to-end latency by checkpoint interval.

Both parts run on a broker this script starts on loopback (the test one,
noida-db), and alternate their runs (the order rotating) ``--repeats`` times:

- **throughput**: the same job twice, ``GeneratorSource`` of N feature events
  (``{"user_id", "amount", "event_time"}``) → ``KafkaSink`` to a 2-partition
  topic, keyed by user, parallelism 2, checkpoints every second; once with
  ``delivery="exactly_once"`` and once with ``delivery="at_least_once"``.
  Rows/s is rows over the job's duration (first read to last commit; Ray
  start-up and deployment excluded and reported apart), and the ratio of the
  medians.
- **latency**: a thread in this process writes events ``{"id",
  "produced_ms"}`` (the wall-clock time of their ``produce()``, in ms) into a
  2-partition input topic at a steady rate for a fixed time, while the job
  ``KafkaSource`` (unbounded, ``read_committed``) → ``KafkaSink`` exactly once
  runs at parallelism 2; a ``read_committed`` consumer on the output topic
  notes when each row becomes visible. Latency is visible time minus produced
  time (one clock: both ends are in this process). The job starts (deployed
  and wired) before the first event is written and is cancelled once every row
  has been seen. Checkpoint intervals 0.2, 1 and 5 s; percentiles per run,
  then the median and range over runs. Each row's latency is also split by
  the checkpoint whose commit made it visible (the last one completed before
  it was seen, from the job's checkpoint history): produce → that checkpoint's
  trigger, trigger → completion, completion → visible (:func:`split_latency`).

Writes ``benchmarks/results/kafka_sink.json`` and ``kafka_sink.png``.

    python benchmarks/kafka_sink.py [--rows 500000] [--rate 2000] [--seconds 8] [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import onceflow as of
from benchmarks.common import pyplot, range_bars, save_figure, start_ray, write_json
from onceflow.operators.kafka_client import produce_waiting
from onceflow.testing.workload import feature_events
from tests.kafka_server import KafkaServer

PARALLELISM = 2
PARTITIONS = 2
BATCH = 10_000
THROUGHPUT_INTERVAL_S = 1.0
INTERVALS_S = (0.2, 1.0, 5.0)
MODES = ("exactly_once", "at_least_once")
LATENCY_SCHEMA = pa.schema([("id", pa.int64()), ("produced_ms", pa.float64())])
PERCENTILES = {"p50": 50, "p95": 95, "p99": 99, "max": 100}
_topics = itertools.count()


def new_topic(server: KafkaServer, prefix: str) -> str:
    name = f"{prefix}-{next(_topics)}"
    server.create_topic(name, PARTITIONS)
    return name


def throughput_run(server: KafkaServer, rows: int, delivery: str, name: str) -> dict[str, Any]:
    """One bounded job writing ``rows`` feature events through a sink of ``delivery``."""
    topic = new_topic(server, f"bench-sink-{delivery}")
    sink = of.sinks.KafkaSink(server.bootstrap_servers, topic, key="user_id", delivery=delivery, timeout_s=60)
    flow = of.Dataflow(name)
    flow.source(of.sources.GeneratorSource(feature_events, total=rows, batch_size=BATCH),
                name="events").sink(sink, name="out")
    storage = tempfile.mkdtemp(prefix="of-bench-kafka-sink-")
    try:
        started = time.perf_counter()
        m = of.run(flow, parallelism=PARALLELISM,
                   checkpoint=of.CheckpointConfig(interval_s=THROUGHPUT_INTERVAL_S, storage=storage)).metrics
        wall = time.perf_counter() - started
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    assert m["events_out"] == rows, (m["events_out"], rows)
    return {"rows": rows, "duration_s": m["duration_s"], "rows_per_s": rows / m["duration_s"],
            "startup_s": m["startup_s"], "wall_s": wall, "checkpoints": m.get("checkpoints_completed", 0)}


class Observer:
    """A ``read_committed`` consumer of the output topic, noting when each row first became visible."""

    def __init__(self, bootstrap_servers: str, topic: str) -> None:
        from confluent_kafka import Consumer, TopicPartition

        self._consumer = Consumer({"bootstrap.servers": bootstrap_servers, "group.id": "bench-observer",
                                   "enable.auto.commit": False, "isolation.level": "read_committed",
                                   "fetch.wait.max.ms": 10})
        self._consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
        self.seen: dict[int, tuple[float, float]] = {}
        """Row id -> (produced_ms, visible_ms), for the first copy seen (guarded by the GIL: one writer)."""
        self.copies = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            messages = self._consumer.consume(10_000, 0.01)
            now_ms = time.time() * 1000
            for message in messages:
                if message.error() is not None:
                    continue
                row = json.loads(message.value())
                self.copies += 1
                self.seen.setdefault(row["id"], (row["produced_ms"], now_ms))
        self._consumer.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def produce_steadily(bootstrap_servers: str, topic: str, rate: int, seconds: float) -> int:
    """Write ``rate * seconds`` events ``{"id", "produced_ms"}`` evenly over ``seconds``; return how many."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap_servers, "linger.ms": 5})
    total = int(rate * seconds)
    started = time.monotonic()
    sent = 0
    while sent < total:
        due = min(total, int((time.monotonic() - started) * rate) + 1)
        for i in range(sent, due):
            value = json.dumps({"id": i, "produced_ms": time.time() * 1000}).encode()
            produce_waiting(producer, topic, value, partition=i % PARTITIONS)
        sent = due
        producer.poll(0)
        time.sleep(0.005)
    if producer.flush(60) != 0:
        msg = f"{topic!r} did not take every event within 60 s"
        raise RuntimeError(msg)
    return total


def latency_run(server: KafkaServer, interval_s: float, rate: int, seconds: float, name: str,
                delivery: str = "exactly_once") -> dict[str, Any]:
    """One unbounded KafkaSource → KafkaSink job at ``interval_s``; the latency of every row."""
    source_topic, sink_topic = new_topic(server, "bench-latency-in"), new_topic(server, "bench-latency-out")
    flow = of.Dataflow(name)
    flow.source(of.sources.KafkaSource(server.bootstrap_servers, source_topic, LATENCY_SCHEMA),
                name="events").sink(of.sinks.KafkaSink(server.bootstrap_servers, sink_topic, delivery=delivery,
                                                  timeout_s=60), name="out")
    storage = tempfile.mkdtemp(prefix="of-bench-kafka-latency-")
    observer = Observer(server.bootstrap_servers, sink_topic)
    try:
        handle = of.submit(flow, parallelism=PARALLELISM,
                           checkpoint=of.CheckpointConfig(interval_s=interval_s, storage=storage))
        try:
            total = produce_steadily(server.bootstrap_servers, source_topic, rate, seconds)
            deadline = time.monotonic() + 60 + 3 * interval_s
            while len(observer.seen) < total:
                if time.monotonic() > deadline:
                    msg = f"{name}: {len(observer.seen)} of {total} rows visible after the deadline"
                    raise TimeoutError(msg)
                time.sleep(0.05)
            m = handle.metrics()
        finally:
            handle.cancel()
    finally:
        observer.close()
        shutil.rmtree(storage, ignore_errors=True)
    produced, visible = (np.array(column) for column in zip(*observer.seen.values(), strict=True))
    latencies = visible - produced
    return {"interval_s": interval_s, "delivery": delivery, "rows": total, "copies": observer.copies,
            "checkpoints": m.get("checkpoints_completed", 0),
            "checkpoint_duration_p50_s": m.get("checkpoint_duration_p50_s"),
            "checkpoint_duration_p99_s": m.get("checkpoint_duration_p99_s"),
            **{k: float(np.percentile(latencies, q)) for k, q in PERCENTILES.items()},
            "mean": float(latencies.mean()), **split_latency(produced, visible, m.get("checkpoint_history") or [])}


def split_latency(produced_ms: np.ndarray, visible_ms: np.ndarray, history: list[dict[str, Any]]) -> dict[str, float]:
    """The medians of where each row's latency went, by the checkpoint whose commit made it visible.

    That checkpoint is the last one completed before the row became visible:
    ``to_trigger`` is from the row's produce to the checkpoint's trigger (waiting
    for the barrier, and the trip through the job), ``checkpoint`` its trigger to
    its completion (barrier, pre-commit, snapshot, manifest), ``to_visible`` its
    completion to the row's visibility (the notification, ``commit_transaction``,
    and the reader's fetch).
    """
    if not history:
        return {}
    completed = np.array([h["completed_at"] * 1000 for h in history])
    triggered = np.array([h["triggered_at"] * 1000 for h in history])
    order = np.argsort(completed)
    completed, triggered = completed[order], triggered[order]
    index = np.searchsorted(completed, visible_ms, side="right") - 1
    ok = index >= 0
    index = index[ok]
    return {"to_trigger_p50": float(np.median(triggered[index] - produced_ms[ok])),
            "checkpoint_p50": float(np.median(completed[index] - triggered[index])),
            "to_visible_p50": float(np.median(visible_ms[ok] - completed[index]))}


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=500_000, help="rows per throughput run")
    parser.add_argument("--rate", type=int, default=2_000, help="events/s written in the latency runs")
    parser.add_argument("--seconds", type=float, default=8.0, help="how long the latency runs write")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 30,000 rows, 3 s of latency, one repeat")
    args = parser.parse_args()
    rows, seconds, repeats = (30_000, 3.0, 1) if args.quick else (args.rows, args.seconds, args.repeats)
    began = time.perf_counter()
    server = KafkaServer().start()
    throughput: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    latency: dict[float, list[dict[str, Any]]] = {i: [] for i in INTERVALS_S}
    try:
        start_ray()
        for mode in MODES:
            throughput_run(server, min(rows, 20_000), mode, f"bench-kafka-sink-warmup-{mode}")
        for i in range(repeats):
            for mode in MODES[i % 2:] + MODES[:i % 2]:
                run = throughput_run(server, rows, mode, f"bench-kafka-sink-{mode}-{i}")
                throughput[mode].append(run)
                print(f"{mode:>14}: {run['rows_per_s']:>10,.0f} rows/s ({run['checkpoints']} checkpoints)",
                      flush=True)
        for i in range(repeats):
            for interval in INTERVALS_S[i % 3:] + INTERVALS_S[:i % 3]:
                run = latency_run(server, interval, args.rate, seconds, f"bench-kafka-latency-{i}-{interval:g}")
                latency[interval].append(run)
                print(f"interval {interval:>4g} s: p50 {run['p50']:>6.0f} p95 {run['p95']:>6.0f} "
                      f"p99 {run['p99']:>6.0f} max {run['max']:>6.0f} ms ({run['checkpoints']} checkpoints); "
                      f"median to trigger {run.get('to_trigger_p50', 0):.0f}, checkpoint "
                      f"{run.get('checkpoint_p50', 0):.0f}, to visible {run.get('to_visible_p50', 0):.0f} ms",
                      flush=True)
    finally:
        server.destroy()
    throughput_summary = {m: spread([r["rows_per_s"] for r in v]) for m, v in throughput.items()}
    ratio = throughput_summary["at_least_once"]["median"] / throughput_summary["exactly_once"]["median"]
    parts = ("to_trigger_p50", "checkpoint_p50", "to_visible_p50")
    latency_summary = {f"{i:g}": {k: spread([r[k] for r in v if k in r]) for k in (*PERCENTILES, *parts)
                                  if any(k in r for r in v)} for i, v in latency.items()}
    print(f"at_least_once / exactly_once (medians): {ratio:.2f}x; {time.perf_counter() - began:.0f} s in all")
    path = write_json("kafka_sink", {
        "throughput": {"rows": rows, "parallelism": PARALLELISM, "partitions": PARTITIONS, "batch_size": BATCH,
                       "checkpoint_interval_s": THROUGHPUT_INTERVAL_S, "repeats": repeats,
                       "ratio_at_least_once_to_exactly_once": ratio, "summary": throughput_summary,
                       "runs": throughput},
        "latency": {"rate": args.rate, "seconds": seconds, "parallelism": PARALLELISM, "partitions": PARTITIONS,
                    "repeats": repeats, "summary_ms": latency_summary,
                    "runs": {f"{i:g}": v for i, v in latency.items()}},
    })
    plot(throughput_summary, ratio, latency_summary)
    print(f"wrote {path}")


def plot(throughput: dict[str, dict[str, float]], ratio: float,
         latency: dict[str, dict[str, dict[str, float]]]) -> None:
    plt = pyplot()

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1, 1.6]})
    names = list(throughput)
    range_bars(left, names, [throughput[n]["median"] for n in names], [throughput[n]["min"] for n in names],
               [throughput[n]["max"] for n in names], scale=1e3, color=["#4c72b0", "#dd8452"])
    left.set_ylabel("thousand rows/s (median, min..max)")
    left.set_title(f"KafkaSink, p={PARALLELISM}, checkpoints 1 s: at least once {ratio:.2f}x", fontsize=10)

    intervals = list(latency)
    width = 0.2
    for k, (stat, color) in enumerate(zip(PERCENTILES, ["#4c72b0", "#55a868", "#dd8452", "#c44e52"], strict=True)):
        xs = [j + (k - 1.5) * width for j in range(len(intervals))]
        range_bars(right, xs, [latency[i][stat]["median"] for i in intervals],
                   [latency[i][stat]["min"] for i in intervals], [latency[i][stat]["max"] for i in intervals],
                   scale=1e3, width=width, capsize=2, color=color, label=stat)
    for j, interval in enumerate(intervals):
        right.hlines(float(interval), j - 2 * width, j + 2 * width, colors="black", linestyles="dashed")
    right.set_xticks(range(len(intervals)), [f"interval {i} s" for i in intervals])
    right.set_yscale("log")
    seconds = plt.FuncFormatter(lambda value, _: f"{value:g}")
    right.yaxis.set_major_formatter(seconds)
    right.yaxis.set_minor_formatter(seconds)
    right.set_ylabel("produce → committed visibility, s (median of runs, min..max)")
    right.set_title("Exactly once, KafkaSource → KafkaSink (dashed: the interval)", fontsize=10)
    right.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, "kafka_sink")


if __name__ == "__main__":
    main()
