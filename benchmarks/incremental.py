"""Full against incremental checkpoints: bytes written and time per checkpoint against state size.

One window-aggregation subtask holds ``keys`` keys in one open (long) window;
each checkpoint interval 1% of the keys, chosen at random, get one more
event. After every interval the state is checkpointed into a local
:class:`~onceflow.checkpoint.storage.CheckpointStorage` twice, through the
code the subtasks run:

- **full**: ``WindowAggregateLogic.snapshot()`` written with ``write_state``;
- **incremental**: ``snapshot_pieces()`` written with
  :func:`~onceflow.runtime.subtask.write_pieces`, reusing the pieces the
  previous checkpoint wrote (as a subtask does with its base's).

It measures, per checkpoint, the bytes written and the time to snapshot and
write (median and range over ``--intervals`` intervals after a warm-up of 20,
which lets the size-tiered compaction reach its steady state), for 10 k to
1 M keys. This is the checkpoint write path of one subtask without Ray (no
barriers, no coordinator): what incremental checkpoints change. Writes
``benchmarks/results/incremental.json`` and ``incremental.png``.

    python benchmarks/incremental.py [--keys 10000 100000 1000000] [--intervals 30] [--quick]
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
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import pyplot, save_figure, write_json
from onceflow.checkpoint.storage import CheckpointStorage, StateHandle
from onceflow.operators import agg
from onceflow.operators.logic import OperatorContext
from onceflow.operators.windows import Tumbling, WindowAggregate
from onceflow.runtime.subtask import write_pieces

WARM_UP = 20


def batches(keys: int, rng: np.random.Generator, rows: int) -> pa.RecordBatch:
    return pa.record_batch({"user_id": rng.integers(0, keys, rows, dtype=np.int64),
                            "amount": rng.random(rows), "event_time": np.zeros(rows, dtype=np.int64)})


def measure(keys: int, intervals: int, root: str) -> dict[str, Any]:
    rng = np.random.default_rng(42)
    op = WindowAggregate(Tumbling(10**12), keys=["user_id"], time_column="event_time",
                         aggregates={"count": agg.count(), "total": agg.sum("amount")})
    logic = op.build(OperatorContext("window", max_parallelism=128))
    for start in range(0, keys, 100_000):  # every key once
        logic.on_batch(pa.record_batch({"user_id": np.arange(start, min(start + 100_000, keys), dtype=np.int64),
                                        "amount": np.ones(min(100_000, keys - start)),
                                        "event_time": np.zeros(min(100_000, keys - start), dtype=np.int64)}))
    full_storage = CheckpointStorage(root, "full")
    incremental_storage = CheckpointStorage(root, "incremental")
    written: dict[int, tuple[object, StateHandle]] = {}
    runs: dict[str, list[tuple[float, int]]] = {"full": [], "incremental": []}
    state_bytes = []
    for checkpoint_id in range(1, WARM_UP + intervals + 1):
        changed = max(keys // 100, 1)
        for _ in range(4):  # the 1% arrive in a few batches, as they would within an interval
            logic.on_batch(batches(keys, rng, changed // 4 or 1))
        started = time.perf_counter()
        handle = full_storage.write_state(checkpoint_id, "window/0", "window", logic.snapshot())
        full = (time.perf_counter() - started, handle.bytes)
        started = time.perf_counter()
        reusable, written = written, {}
        entry, new_bytes = write_pieces(incremental_storage, checkpoint_id, "window/0", "window",
                                        logic.snapshot_pieces(), reusable, written)
        incremental = (time.perf_counter() - started, new_bytes)
        if checkpoint_id > WARM_UP:
            runs["full"].append(full)
            runs["incremental"].append(incremental)
            state_bytes.append(entry["bytes"])
        full_storage.discard(checkpoint_id)  # keep the disk small; the incremental pieces stay (they are shared)
    return {kind: {"bytes_median": statistics.median(b for _, b in r), "bytes_min": min(b for _, b in r),
                   "bytes_max": max(b for _, b in r), "seconds_median": statistics.median(s for s, _ in r),
                   "seconds_min": min(s for s, _ in r), "seconds_max": max(s for s, _ in r)}
            for kind, r in runs.items()} | {"state_bytes_median": statistics.median(state_bytes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--intervals", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="10 k and 100 k keys, 10 intervals")
    args = parser.parse_args()
    sizes, intervals = ([10_000, 100_000], 10) if args.quick else (args.keys, args.intervals)
    results = {}
    for keys in sizes:
        root = tempfile.mkdtemp(prefix="onceflow-incremental-")
        try:
            results[str(keys)] = measure(keys, intervals, root)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        r = results[str(keys)]
        print(f"{keys:>9,} keys: full {r['full']['bytes_median'] / 2**20:8.2f} MiB in "
              f"{r['full']['seconds_median'] * 1000:7.1f} ms; incremental "
              f"{r['incremental']['bytes_median'] / 2**20:8.2f} MiB in "
              f"{r['incremental']['seconds_median'] * 1000:7.1f} ms "
              f"(bytes x{r['full']['bytes_median'] / max(r['incremental']['bytes_median'], 1):.1f} fewer)")
    path = write_json("incremental", {"changed_per_interval": 0.01, "intervals": intervals, "warm_up": WARM_UP,
                                      "by_keys": results})
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for kind, colour in (("full", "tab:gray"), ("incremental", "tab:blue")):
        xs = [int(k) for k in results]
        for axis, field, scale in ((left, "bytes", 2**20), (right, "seconds", 1e-3)):
            med = [results[k][kind][f"{field}_median"] / scale for k in results]
            low = [m - results[k][kind][f"{field}_min"] / scale for m, k in zip(med, results, strict=True)]
            high = [results[k][kind][f"{field}_max"] / scale - m for m, k in zip(med, results, strict=True)]
            axis.errorbar(xs, med, yerr=[low, high], marker="o", capsize=3, label=kind, color=colour)
    for axis, label in ((left, "MiB written per checkpoint"), (right, "ms to snapshot and write")):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("keys in state (1% change per interval)")
        axis.set_ylabel(label)
        axis.legend()
    fig.suptitle("Full and incremental checkpoints of window state (median, min..max)")
    fig.tight_layout()
    save_figure(fig, "incremental")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
