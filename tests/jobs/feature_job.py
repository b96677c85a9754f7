"""The feature-window job as a stand-alone driver, for tests that kill the driver itself.

    python tests/jobs/feature_job.py --storage DIR --out DIR --events N --rate R [--resume]
"""

from __future__ import annotations

import argparse
import json

import onceflow as of
from onceflow.testing.workload import feature_events


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--storage", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--events", type=int, required=True)
    parser.add_argument("--rate", type=int, default=None)
    parser.add_argument("--interval", type=float, default=0.3)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    flow = of.Dataflow("durable")
    events = flow.source(of.sources.GeneratorSource(feature_events, total=args.events, batch_size=5_000,
                                                    max_events_per_s=args.rate),
                         watermark=of.BoundedOutOfOrderness("event_time"))
    (events.key_by("user_id").window(of.windows.Tumbling(size_ms=10_000))
     .aggregate(count=of.agg.count(), total=of.agg.sum("amount")).sink(of.sinks.ParquetSink(args.out)))
    result = of.run(flow, parallelism=2, resume=args.resume,
                    checkpoint=of.CheckpointConfig(interval_s=args.interval, storage=args.storage))
    print(json.dumps({"restored_from": result.metrics["restored_from"],
                      "checkpoints_completed": result.metrics["checkpoints_completed"]}))


if __name__ == "__main__":
    main()
