"""A retry loop: events go round until their attempt succeeds, then windowed counts per user.

Every event carries ``retries``: how many of its attempts fail before one
succeeds. The loop (``iterate`` ... ``close_with``) keys the events by ``id``
and counts each one's attempts in keyed state (:func:`~onceflow.testing.workload.attempt`);
a failed attempt goes round again, a successful one leaves the loop. After
the loop, tumbling event-time windows count each user's events and their
attempts, into Parquet, exactly once.

    python examples/retry_loop.py --events 200000 --parallelism 2

Checkpoints of a loop follow Chandy-Lamport: the loop head snapshots on the
barrier from its input, then records the events that come round until the
barrier does, and a restore replays them. The loop holds event time back
(no watermark crosses it), so the windows after it fire once the loop has
ended: the job ends when its input ended and the loop is empty.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

import onceflow as of
from onceflow.testing.workload import attempt, retry_events, retry_reference

WINDOW_MS = 2_000


def failed(batch: pa.RecordBatch) -> pa.RecordBatch:
    """The attempts that failed: they go round again."""
    return batch.filter(pc.greater_equal(batch.column("retries"), 0))


def succeeded(batch: pa.RecordBatch) -> pa.RecordBatch:
    """The attempts that succeeded: they leave the loop."""
    return batch.filter(pc.less(batch.column("retries"), 0))


def build(name: str, out_dir: str, events: int, *, batch_size: int = 5_000,
          max_events_per_s: float | None = None) -> of.Dataflow:
    """The retry loop job: ``events`` events, windowed counts into Parquet at ``out_dir``."""
    flow = of.Dataflow(name)
    source = of.sources.GeneratorSource(retry_events, total=events, batch_size=batch_size,
                                        max_events_per_s=max_events_per_s)
    loop = flow.source(source, watermark=of.BoundedOutOfOrderness("event_time"), name="events").iterate(name="retry")
    tried = loop.key_by("id").process(attempt, name="attempt")
    loop.close_with(tried.map_batches(failed, name="failed"))
    (tried.map_batches(succeeded, name="succeeded")
     .key_by("user_id").window(of.windows.Tumbling(size_ms=WINDOW_MS))
     .aggregate(events=of.agg.count(), attempts=of.agg.sum("attempts"), name="per_user")
     .sink(of.sinks.ParquetSink(out_dir), name="parquet"))
    return flow


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--parallelism", type=int, default=2)
    parser.add_argument("--out", default=None, help="output directory (a fresh temporary one by default)")
    parser.add_argument("--address", default=None, help='Ray address: none for embedded, "auto" for a cluster')
    parser.add_argument("--checkpoint-interval", type=float, default=1.0,
                        help="seconds between checkpoints; 0 turns checkpointing off")
    args = parser.parse_args()

    out_dir = args.out or tempfile.mkdtemp(prefix="onceflow-retry-")
    if Path(out_dir).exists():
        shutil.rmtree(out_dir)
    checkpoints = tempfile.mkdtemp(prefix="onceflow-retry-chk-")
    checkpoint = of.CheckpointConfig(interval_s=args.checkpoint_interval, storage=checkpoints) \
        if args.checkpoint_interval > 0 else None
    try:
        result = of.run(build("retries", out_dir, args.events), parallelism=args.parallelism,
                        address=args.address, checkpoint=checkpoint)
        committed = ds.dataset(out_dir, format="parquet").to_table().sort_by([("window_start", "ascending"),
                                                                              ("user_id", "ascending")])
        expected = retry_reference(args.events, window_ms=WINDOW_MS)
        exact = committed.select(expected.column_names).equals(expected)
        attempts = pc.sum(committed.column("attempts")).as_py()
        metrics = result.metrics
        print(f"{metrics['events_in']:,} events, {attempts:,} attempts round the loop, "
              f"{committed.num_rows:,} windows committed in {metrics['duration_s']:.2f} s; "
              f"{metrics['checkpoints_completed']} checkpoints; output {'exact' if exact else 'WRONG'}")
        if not exact:
            raise SystemExit(1)
    finally:
        shutil.rmtree(checkpoints, ignore_errors=True)


if __name__ == "__main__":
    main()
