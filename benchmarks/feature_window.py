"""Feature-window throughput: events/s end to end, checkpointing off.

The feature-window workload (:mod:`onceflow.testing.workload`): N
deterministic events, key by ``user_id``, tumbling 10 s event-time windows,
``count`` and ``sum(amount)`` per (user, window) into the Parquet
two-phase-commit sink. Every run is verified
(sum of counts == N, sum of sums equal to the input's within 1e-6 relative).

It first sweeps the data-plane knobs (source batch size, channel
``batch_bytes``) at N = 2,000,000 and parallelism 2, then runs N = 2,000,000
and 10,000,000 at parallelism 1 and 2, ``--repeats`` times each. Writes
``benchmarks/results/feature_window.json`` and ``feature_window.png``.

    python benchmarks/feature_window.py [--repeats 3] [--quick]
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

import numpy as np
import pyarrow.dataset as ds

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import onceflow as of
from benchmarks.common import PeakMemory, feature_flow, pyplot, range_bars, save_figure, start_ray, write_json
from onceflow.testing.workload import feature_events


def input_amount_sum(total: int, chunk: int = 1_000_000) -> float:
    return float(sum(feature_events(s, min(chunk, total - s)).column("amount").to_numpy().sum()
                     for s in range(0, total, chunk)))


def one_run(events: int, parallelism: int, batch_size: int, batch_bytes: int | None, expected_sum: float,
            name: str) -> dict[str, Any]:
    out = Path(tempfile.mkdtemp(prefix="of-bench-"))
    try:
        flow = feature_flow(name, of.sinks.ParquetSink(str(out)), events=events, batch_size=batch_size)
        started = time.monotonic()
        with PeakMemory() as memory:
            result = of.run(flow, parallelism=parallelism, batch_bytes=batch_bytes)
        wall = time.monotonic() - started
        table = ds.dataset(out, format="parquet").to_table(columns=["count", "total"])
        counted = int(table["count"].to_numpy().sum())
        summed = float(table["total"].to_numpy().sum())
        if counted != events or not np.isclose(summed, expected_sum, rtol=1e-6):
            raise SystemExit(f"verification failed: counts {counted} vs {events}, sums {summed} vs {expected_sum}")
        m = result.metrics
        return {"events_per_s": m["events_per_s"], "duration_s": m["duration_s"], "startup_s": m["startup_s"],
                "wall_s": wall, "peak_rss_mib": memory.peak_bytes / 2**20, "messages": m["messages"],
                "backpressure_s": m["backpressure_s"], "rows_out": m["events_out"]}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    rates = [r["events_per_s"] for r in runs]
    return {"events_per_s_min": min(rates), "events_per_s_median": statistics.median(rates),
            "events_per_s_max": max(rates), "peak_rss_mib_max": max(r["peak_rss_mib"] for r in runs),
            "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small N, one repeat (a smoke test)")
    args = parser.parse_args()
    sizes = [200_000] if args.quick else [2_000_000, 10_000_000]
    repeats = 1 if args.quick else args.repeats
    start_ray()
    sums = {n: input_amount_sum(n) for n in sizes}
    run_id = 0

    def run(events: int, parallelism: int, batch_size: int, batch_bytes: int | None) -> dict[str, Any]:
        nonlocal run_id
        run_id += 1
        return one_run(events, parallelism, batch_size, batch_bytes, sums[events], f"bench-{run_id}")

    run(sizes[0], 2, 100_000, None)  # warm-up: worker processes, imports
    sweep = []
    for batch_size in (10_000, 100_000):
        for batch_bytes in (64 << 10, 1 << 20, 4 << 20):
            runs = [run(sizes[0], 2, batch_size, batch_bytes) for _ in range(max(repeats - 1, 1))]
            sweep.append({"events": sizes[0], "source_batch_size": batch_size, "batch_bytes": batch_bytes,
                          **summarise(runs)})
            print(f"sweep batch_size={batch_size:>7,} batch_bytes={batch_bytes:>9,}: "
                  f"{sweep[-1]['events_per_s_median']:>12,.0f} events/s (median)")
    grid = []
    for events in sizes:
        for parallelism in (1, 2):
            runs = [run(events, parallelism, 100_000, None) for _ in range(repeats)]
            grid.append({"events": events, "parallelism": parallelism, **summarise(runs)})
            g = grid[-1]
            print(f"N={events:>10,} p={parallelism}: {g['events_per_s_min']:>12,.0f} .. "
                  f"{g['events_per_s_median']:>12,.0f} events/s (min .. median), "
                  f"peak RSS {g['peak_rss_mib_max']:,.0f} MiB")
    path = write_json("feature_window", {"workload": "feature-window, checkpointing off, ParquetSink",
                                         "repeats": repeats, "sweep": sweep, "results": grid})
    plot(grid, sweep)
    print(f"wrote {path}")


def plot(grid: list[dict[str, Any]], sweep: list[dict[str, Any]]) -> None:
    plt = pyplot()

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f"N={g['events'] / 1e6:g}M\np={g['parallelism']}" for g in grid]
    range_bars(left, labels, [g["events_per_s_median"] for g in grid], [g["events_per_s_min"] for g in grid],
               [g["events_per_s_max"] for g in grid], scale=1e6, color="#4c72b0")
    left.axhline(1.0, color="#c44e52", linestyle="--", label="target 1M events/s")
    left.set_ylabel("million events/s (median, min..max)")
    left.set_title("feature-window, checkpointing off")
    left.legend()
    names = [f"src {s['source_batch_size'] // 1000}k\nch {s['batch_bytes'] >> 10} KiB" for s in sweep]
    right.bar(names, [s["events_per_s_median"] / 1e6 for s in sweep], color="#55a868")
    right.set_title(f"data-plane sweep (N={sweep[0]['events'] / 1e6:g}M, p=2)")
    right.set_ylabel("million events/s (median)")
    right.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    save_figure(fig, "feature_window")


if __name__ == "__main__":
    main()
