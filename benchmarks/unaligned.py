"""Checkpoints under backpressure: aligned, aligned with a timeout, and unaligned.

1. *Backpressure.* A per-event feature job: two rate-limited sources of the
   feature-window events, key by ``user_id``, a running count per user
   (one output row per event), into a sink throttled to a tenth of the source
   rate, so the whole pipeline runs backpressured. It runs ``--seconds``
   seconds per mode with a checkpoint every second, then stops (draining and
   committing). Reported per mode: checkpoint end-to-end duration p50/p99,
   channel-state bytes per checkpoint, events/s, and each checkpoint's
   duration over time.
2. *Overhead.* The unthrottled feature-window job (N = 10 M, parallelism 2,
   Parquet sink) with checkpointing off, aligned every second and unaligned
   every second, alternating, ``--repeats`` times: the ratio of medians.

Writes ``benchmarks/results/unaligned.json`` and ``unaligned.png``.

    python benchmarks/unaligned.py [--seconds 20] [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
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
from benchmarks.common import feature_flow, pyplot, save_figure, start_ray, write_json
from onceflow.checkpoint.storage import CheckpointStorage
from onceflow.runtime.checkpointing import percentile
from onceflow.testing.sink import TestingSinkWriter
from onceflow.testing.workload import feature_events

MODES = {
    "aligned": {"mode": "aligned"},
    "aligned, 50 ms timeout": {"mode": "aligned", "aligned_timeout_s": 0.05},
    "unaligned": {"mode": "unaligned"},
}
SOURCE_RATE = 20_000
"""Events/s per source subtask (two of them)."""


class ThrottledSink(of.sinks.TestingSink):
    """A TestingSink whose writers take ``1 / rows_per_s`` seconds per row (an external system at its limit)."""

    def __init__(self, rows_per_s: float) -> None:
        super().__init__()
        self.rows_per_s = rows_per_s

    def create_writer(self, ctx: Any) -> TestingSinkWriter:
        writer = super().create_writer(ctx)
        write = writer.write
        rows_per_s = self.rows_per_s

        def throttled(batch: pa.RecordBatch) -> None:
            time.sleep(batch.num_rows / rows_per_s)
            write(batch)

        writer.write = throttled  # type: ignore[method-assign]
        return writer


def running_count(state: int | None, row: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    seen = (state or 0) + 1
    return seen, {"user_id": row["user_id"], "seen": seen}


def backpressured(mode: str, seconds: float, name: str) -> dict[str, Any]:
    storage = tempfile.mkdtemp(prefix="of-bench-chk-")
    try:
        flow = of.Dataflow(name)
        events = flow.source(of.sources.GeneratorSource(feature_events, total=None, batch_size=2_000,
                                                        max_events_per_s=SOURCE_RATE), name="events")
        # The sink (two subtasks) takes a tenth of what the two sources send.
        sink = ThrottledSink(rows_per_s=SOURCE_RATE / 10)
        events.key_by("user_id").process(running_count, name="count").sink(sink, name="out")
        checkpoint = of.CheckpointConfig(interval_s=1.0, storage=storage, timeout_s=120.0, **MODES[mode])
        handle = of.submit(flow, parallelism=2, checkpoint=checkpoint)
        time.sleep(seconds)
        result = handle.stop(timeout_s=600)
        history = CheckpointStorage(storage, name).history()
        durations = [h["duration_s"] for h in history]
        return {
            "mode": mode, "events_per_s": result.metrics["events_in"] / result.metrics["duration_s"],
            "checkpoints": len(history),
            "duration_p50_s": percentile(durations, 0.5), "duration_p99_s": percentile(durations, 0.99),
            "unaligned_share": sum(1 for h in history if h.get("unaligned")) / max(len(history), 1),
            "channel_state_bytes_mean": statistics.fmean([h.get("channel_state_bytes", 0) for h in history] or [0]),
            "durations_s": durations,
            "triggered_at_s": [h["triggered_at"] - history[0]["triggered_at"] for h in history],
        }
    finally:
        shutil.rmtree(storage, ignore_errors=True)


def unthrottled(mode: str | None, events: int, name: str) -> float:
    out = Path(tempfile.mkdtemp(prefix="of-bench-out-"))
    storage = Path(tempfile.mkdtemp(prefix="of-bench-chk-"))
    try:
        flow = feature_flow(name, of.sinks.ParquetSink(str(out)), events=events)
        checkpoint = None if mode is None else of.CheckpointConfig(interval_s=1.0, storage=str(storage), mode=mode)
        return float(of.run(flow, parallelism=2, checkpoint=checkpoint).metrics["events_per_s"])
    finally:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(storage, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="short runs, one repeat (a smoke test)")
    args = parser.parse_args()
    seconds = 6.0 if args.quick else args.seconds
    repeats = 1 if args.quick else args.repeats
    events = 1_000_000 if args.quick else 10_000_000
    start_ray()
    pressure = []
    for number, mode in enumerate(MODES):
        pressure.append(backpressured(mode, seconds, f"bench-unaligned-{number}"))
        p = pressure[-1]
        print(f"{mode:>24}: checkpoint p50 {p['duration_p50_s']:.3f} s, p99 {p['duration_p99_s']:.3f} s, "
              f"{p['checkpoints']} checkpoints ({p['unaligned_share']:.0%} unaligned), "
              f"channel state {p['channel_state_bytes_mean'] / 2**10:,.0f} KiB mean, "
              f"{p['events_per_s']:,.0f} events/s")
    rates: dict[str, list[float]] = {"off": [], "aligned": [], "unaligned": []}
    for repeat in range(repeats):
        for label, mode in (("off", None), ("aligned", "aligned"), ("unaligned", "unaligned")):
            rates[label].append(unthrottled(mode, events, f"bench-overhead-{label}-{repeat}"))
            print(f"[{repeat + 1}/{repeats}] unthrottled, checkpoints {label:>9}: {rates[label][-1]:>12,.0f} events/s")
    overhead = {label: {"events_per_s": values, "events_per_s_median": statistics.median(values),
                        "ratio_to_off": statistics.median(values) / statistics.median(rates["off"])}
                for label, values in rates.items()}
    for label in ("aligned", "unaligned"):
        print(f"unthrottled overhead, {label} every 1 s: {1 - overhead[label]['ratio_to_off']:+.1%} "
              f"(ratio of medians {overhead[label]['ratio_to_off']:.3f})")
    path = write_json("unaligned", {
        "backpressure": {"workload": "per-event running count per user into a sink throttled to 1/10 of the "
                                     f"source rate ({2 * SOURCE_RATE} events/s offered), parallelism 2, "
                                     "checkpoint every 1 s", "seconds": seconds, "results": pressure},
        "overhead": {"workload": f"feature-window, N={events}, parallelism 2, ParquetSink, checkpoint every 1 s",
                     "repeats": repeats, "results": overhead},
    })
    plot(pressure, overhead)
    print(f"wrote {path}")


def plot(pressure: list[dict[str, Any]], overhead: dict[str, Any]) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    for p in pressure:
        left.plot(p["triggered_at_s"], p["durations_s"], marker="o", markersize=3,
                  label=f"{p['mode']} (p99 {p['duration_p99_s']:.2f} s)")
    left.set_yscale("log")
    left.set_xlabel("checkpoint triggered at (s)")
    left.set_ylabel("checkpoint duration (s, log)")
    left.set_title("backpressure: sink at 1/10 of the source rate")
    left.legend(fontsize=8)
    labels = list(overhead)
    right.bar(labels, [overhead[k]["events_per_s_median"] / 1e6 for k in labels], color="#4c72b0")
    right.set_ylabel("million events/s (median)")
    right.set_title("unthrottled feature-window, checkpoints every 1 s")
    fig.tight_layout()
    save_figure(fig, "unaligned")


if __name__ == "__main__":
    main()
