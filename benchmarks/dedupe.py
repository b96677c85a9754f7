"""Dedupe throughput and memory: the operator logic alone (no Ray) against a Python ``set`` loop.

One deterministic stream (numpy seed 42): N events (default 5,000,000), 30%
of them resends of an id sent up to 50,000 unique ids earlier, ``event_time``
rising 1 ms per event, in batches of 100,000 rows with a watermark after
each batch. The operator runs with ``within_ms = 600,000`` (10 minutes of
event time, about 420,000 unique ids per horizon, which is its
``expected_items``) in bloom mode at fp_rate 0.01 and 0.001 and in exact
mode; the baseline is the naive per-row loop over a Python ``set`` (ids as
Python ints, ``batch.take`` of the first occurrences; it never forgets).

Reported per variant: events/s (min / median / max of ``--repeats`` runs),
bytes per remembered id (state bytes over the ids the live generations hold
at the end; for the set, ``sys.getsizeof`` of the set and of its ints over
its size), and the unique events wrongly dropped (bloom false positives).
Writes ``benchmarks/results/dedupe.json`` and ``dedupe.png``.

    python benchmarks/dedupe.py [--events 5000000] [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import pyplot, range_bars, save_figure, write_json
from onceflow.operators.dedupe import Dedupe, DedupeMode
from onceflow.operators.logic import OperatorContext

BATCH = 100_000
WITHIN_MS = 600_000
DUPLICATE_SHARE = 0.3
RESEND_WINDOW = 50_000


def make_stream(events: int, seed: int = 42) -> tuple[list[pa.RecordBatch], int]:
    """The batches, and the number of distinct ids (the rows a perfect dedupe lets through)."""
    rng = np.random.default_rng(seed)
    resend = rng.random(events) < DUPLICATE_SHARE
    resend[0] = False
    unique_before: np.ndarray = np.cumsum(~resend) - (~resend)  # unique ids sent before each row
    back = rng.integers(1, RESEND_WINDOW + 1, events)  # a resend repeats the id sent this many unique ids ago
    ordinal = np.where(resend, np.maximum(unique_before - back, 0), unique_before)
    ids = (ordinal.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)).view(np.int64)  # distinct, scrambled
    times = np.arange(events, dtype=np.int64)
    amounts = rng.random(events)
    table = pa.table({"id": ids, "event_time": times, "amount": amounts})
    batches = [table.slice(start, BATCH).combine_chunks().to_batches()[0] for start in range(0, events, BATCH)]
    return batches, int(np.count_nonzero(~resend))


def run_operator(batches: list[pa.RecordBatch], mode: DedupeMode, fp_rate: float,
                 expected_items: int) -> dict[str, Any]:
    config = Dedupe("id", WITHIN_MS, time_column="event_time", mode=mode, fp_rate=fp_rate,
                    expected_items=expected_items)
    logic = config.build(OperatorContext("dedupe_bench"))
    passed = 0
    started = time.perf_counter()
    for batch in batches:
        for _, out in logic.on_batch(batch):
            passed += out.num_rows
        logic.on_watermark(int(batch.column("event_time")[-1].as_py()) - 1)
    elapsed = time.perf_counter() - started
    metrics = logic.metrics()
    remembered = sum(v for k, v in metrics.items() if k.startswith("items_g"))
    return {"seconds": elapsed, "passed": passed, "state_bytes": metrics["state_bytes"],
            "remembered_ids": remembered, "generations": metrics["generations"],
            "estimated_fp_rate": metrics.get("estimated_fp_rate")}


def run_set_baseline(batches: list[pa.RecordBatch]) -> dict[str, Any]:
    seen: set[int] = set()
    passed = 0
    started = time.perf_counter()
    for batch in batches:
        keep = []
        for row, value in enumerate(batch.column("id").to_pylist()):
            if value not in seen:
                seen.add(value)
                keep.append(row)
        passed += batch.take(pa.array(keep, pa.int64())).num_rows
    elapsed = time.perf_counter() - started
    state = sys.getsizeof(seen) + sum(map(sys.getsizeof, seen))
    return {"seconds": elapsed, "passed": passed, "state_bytes": state, "remembered_ids": len(seen)}


def repeat(fn: Callable[[], dict[str, Any]], repeats: int, events: int, unique: int) -> dict[str, Any]:
    runs = [fn() for _ in range(repeats)]
    rates = [events / r["seconds"] for r in runs]
    last = runs[-1]
    wrongly_dropped = unique - last["passed"]
    return {
        "events_per_s_min": min(rates), "events_per_s_median": statistics.median(rates),
        "events_per_s_max": max(rates),
        "bytes_per_remembered_id": last["state_bytes"] / max(1, last["remembered_ids"]),
        "state_bytes": last["state_bytes"], "remembered_ids": last["remembered_ids"],
        "passed": last["passed"], "unique_ids": unique, "unique_dropped": wrongly_dropped,
        "measured_fp_rate": wrongly_dropped / unique,
        **({"estimated_fp_rate_end": last["estimated_fp_rate"]} if last.get("estimated_fp_rate") is not None else {}),
        "runs_s": [r["seconds"] for r in runs],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=5_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="500,000 events, one repeat (a smoke test)")
    args = parser.parse_args()
    events = 500_000 if args.quick else args.events
    repeats = 1 if args.quick else args.repeats
    batches, unique = make_stream(events)
    per_horizon = round(WITHIN_MS * (1 - DUPLICATE_SHARE))  # unique ids per within_ms at 1 event per ms
    variants: dict[str, Callable[[], dict[str, Any]]] = {
        "bloom fp=0.01": lambda: run_operator(batches, "bloom", 0.01, per_horizon),
        "bloom fp=0.001": lambda: run_operator(batches, "bloom", 0.001, per_horizon),
        "exact": lambda: run_operator(batches, "exact", 0.01, per_horizon),
        "python set": lambda: run_set_baseline(batches),
    }
    results = {}
    for name, fn in variants.items():
        fn()  # warm-up (imports, allocator)
        results[name] = r = repeat(fn, repeats, events, unique)
        print(f"{name:>15}: {r['events_per_s_min'] / 1e6:5.2f} / {r['events_per_s_median'] / 1e6:5.2f} M events/s "
              f"(min / median), {r['bytes_per_remembered_id']:6.2f} bytes per remembered id, "
              f"{r['unique_dropped']} of {unique} unique ids dropped ({r['measured_fp_rate']:.2e})")
    path = write_json("dedupe", {
        "workload": {"events": events, "duplicate_share": DUPLICATE_SHARE, "resend_window_ids": RESEND_WINDOW,
                     "batch_rows": BATCH, "within_ms": WITHIN_MS, "expected_items": per_horizon, "seed": 42,
                     "unique_ids": unique},
        "repeats": repeats, "results": results,
    })
    plot(results, events)
    print(f"wrote {path}")


def plot(results: dict[str, dict[str, Any]], events: int) -> None:
    plt = pyplot()

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(results)
    colors = ["#4c72b0", "#55a868", "#8172b2", "#c44e52"]
    bars = range_bars(left, names, [results[n]["events_per_s_median"] for n in names],
                      [results[n]["events_per_s_min"] for n in names],
                      [results[n]["events_per_s_max"] for n in names], scale=1e6, color=colors)
    left.bar_label(bars, fmt="%.2f", label_type="center", color="white")
    left.set_ylabel("million events/s (median, min..max)")
    left.set_title(f"dedupe throughput, {events / 1e6:g}M events, 30% resends")
    bars = right.bar(names, [results[n]["bytes_per_remembered_id"] for n in names], color=colors)
    right.bar_label(bars, fmt="%.2f")
    right.set_yscale("log")
    right.set_ylabel("bytes per remembered id (log)")
    right.set_title("memory")
    for axis in (left, right):
        axis.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    save_figure(fig, "dedupe")


if __name__ == "__main__":
    main()
