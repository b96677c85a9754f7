"""The feature-window demo: per-user event counts and amount sums in 10-second windows.

Runs on an embedded local Ray by default:

    python examples/feature_pipeline.py --events 2000000 --parallelism 2

and unchanged on a cluster (``--address auto``), or under ``ray job submit``
(where ``RAY_ADDRESS`` is set and the job joins that cluster):

    RAY_AUTH_MODE=token ray job submit --working-dir . -- python examples/feature_pipeline.py

It checks the committed Parquet output against a numpy reference and prints a
short summary.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds

import onceflow as of
from onceflow.testing.workload import feature_events, feature_window_reference


def build(out_dir: str, events: int, batch_size: int) -> of.Dataflow:
    flow = of.Dataflow("features")
    stream = flow.source(
        of.sources.GeneratorSource(feature_events, total=events, batch_size=batch_size),
        watermark=of.BoundedOutOfOrderness("event_time", max_delay_ms=0),
    )
    (
        stream.key_by("user_id")
        .window(of.windows.Tumbling(size_ms=10_000))
        .aggregate(count=of.agg.count(), total=of.agg.sum("amount"))
        .sink(of.sinks.ParquetSink(out_dir))
    )
    return flow


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2_000_000)
    parser.add_argument("--parallelism", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=100_000)
    parser.add_argument("--out", default=None, help="output directory (a fresh temporary one by default)")
    parser.add_argument("--address", default=None, help='Ray address: none for embedded, "auto" for a cluster')
    parser.add_argument("--checkpoint-interval", type=float, default=1.0,
                        help="seconds between checkpoints; 0 turns checkpointing off")
    parser.add_argument("--checkpoints", default=None,
                        help="checkpoint storage (a directory or pyarrow.fs URI; a fresh temporary one by default)")
    args = parser.parse_args()

    out_dir = args.out or tempfile.mkdtemp(prefix="onceflow-features-")
    if Path(out_dir).exists():
        shutil.rmtree(out_dir)
    checkpoint = None
    if args.checkpoint_interval > 0:
        storage = args.checkpoints or tempfile.mkdtemp(prefix="onceflow-checkpoints-")
        checkpoint = of.CheckpointConfig(interval_s=args.checkpoint_interval, storage=storage)
    result = of.run(build(out_dir, args.events, args.batch_size), parallelism=args.parallelism,
                    address=args.address, checkpoint=checkpoint)

    committed = ds.dataset(out_dir, format="parquet").to_table()
    expected = feature_window_reference(args.events)
    total_count = int(committed["count"].to_numpy().sum())
    committed_sum = float(committed["total"].to_numpy().sum())
    expected_sum = float(expected["total"].to_numpy().sum())
    ok = (committed.num_rows == expected.num_rows and total_count == args.events
          and np.isclose(committed_sum, expected_sum, rtol=1e-6))
    m = result.metrics
    print(f"feature-window: {m['events_in']:,} events -> {m['events_out']:,} (user, window) rows in {out_dir}")
    print(f"  {m['events_per_s']:,.0f} events/s over {m['duration_s']:.2f} s "
          f"(+{m['startup_s']:.2f} s start-up), parallelism {args.parallelism}")
    if checkpoint is not None:
        print(f"  {m['checkpoints_completed']} checkpoint(s) (every {args.checkpoint_interval:g} s, p99 "
              f"{m['checkpoint_duration_p99_s']:.3f} s) in {checkpoint.storage}")
    print(f"  sum of counts {total_count:,} (expected {args.events:,}); "
          f"sum of amounts {committed_sum:,.3f} (expected {expected_sum:,.3f})")
    print("  result matches the numpy reference" if ok else "  RESULT DIFFERS FROM THE REFERENCE")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
