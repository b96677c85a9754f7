"""What checksummed snapshots cost: CRC-32 on each checkpoint write, verification on each restore.

A keyed-state-like table (int64 key, int64 count, float64 sum, a short
string; ``--mb`` MiB as an Arrow IPC file) is written to and read from a local
checkpoint directory with :class:`~onceflow.checkpoint.storage.CheckpointStorage`,
``--repeats`` times each, and the parts are timed apart:

- **checkpoint**: ``write_state`` (serialise to IPC, CRC-32, write, fsync) and
  the CRC-32 alone: the overhead is the CRC's share of the write;
- **restore**: ``read_state`` with the handle (read, size and CRC-32
  checked, decode) against ``read_state`` of the bare path (read, decode);
- **verify**: ``CheckpointStorage.verify`` (the offline check that
  ``resume=True`` and ``onceflow checkpoints verify`` run), in MB/s.

The files sit in the page cache after the first write, so the figures are
the CPU cost of the checks, not disk speed. Writes
``benchmarks/results/integrity.json`` and ``integrity.png``.

    python benchmarks/integrity.py [--mb 256] [--repeats 5] [--quick]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import pyplot, range_bars, save_figure, write_json
from onceflow.checkpoint.storage import CheckpointStorage, ipc_file_bytes

BYTES_PER_ROW = 8 + 8 + 8 + 4 + 12


def state_table(mb: int) -> pa.Table:
    rows = mb * 2**20 // BYTES_PER_ROW
    rng = np.random.default_rng(42)
    return pa.table({"key": np.arange(rows, dtype=np.int64), "count": rng.integers(0, 1_000, rows),
                     "sum": rng.random(rows), "tag": pa.array(np.char.mod("u%07d", np.arange(rows) % 10**7))})


def timed(fn: Callable[[], Any], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def summary(seconds: list[float], mib: float) -> dict[str, float]:
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "max_s": max(seconds),
            "mb_per_s": mib / statistics.median(seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="32 MiB, 2 repeats")
    args = parser.parse_args()
    mb, repeats = (32, 2) if args.quick else (args.mb, args.repeats)
    table = state_table(mb)
    root = tempfile.mkdtemp(prefix="onceflow-integrity-")
    try:
        storage = CheckpointStorage(root, "bench")
        handle = storage.write_state(1, "counts/0", "keyed", table)
        storage.write_manifest({"checkpoint_id": 1, "tasks": {"counts/0": {"states": {"keyed": handle.to_manifest()}}}})
        mib = handle.bytes / 2**20
        data = ipc_file_bytes(table)
        figures = {
            "write_state": summary(timed(lambda: storage.write_state(2, "counts/0", "keyed", table), repeats), mib),
            "crc32": summary(timed(lambda: zlib.crc32(data), repeats), mib),
            "read_checked": summary(timed(lambda: storage.read_state(handle), repeats), mib),
            "read_unchecked": summary(timed(lambda: storage.read_state(handle.path), repeats), mib),
            "verify": summary(timed(lambda: storage.verify(1), repeats), mib),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
    write_share = figures["crc32"]["median_s"] / figures["write_state"]["median_s"]
    read_overhead = figures["read_checked"]["median_s"] / figures["read_unchecked"]["median_s"] - 1
    payload = {"state_mib": round(mib, 1), "rows": table.num_rows, "repeats": repeats, "figures": figures,
               "crc_share_of_write": write_share, "checked_read_overhead": read_overhead}
    path = write_json("integrity", payload)
    for name, f in figures.items():
        print(f"{name:>15}: {f['median_s'] * 1000:8.1f} ms ({f['mb_per_s']:,.0f} MiB/s) "
              f"[{f['min_s'] * 1000:.1f} .. {f['max_s'] * 1000:.1f}]")
    print(f"CRC-32 is {write_share:.1%} of a checkpoint write; a checked read costs {read_overhead:+.1%} "
          f"over an unchecked one ({mib:.0f} MiB of state)")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(figures)
    range_bars(ax, names, [figures[n]["mb_per_s"] for n in names], [mib / figures[n]["max_s"] for n in names],
               [mib / figures[n]["min_s"] for n in names])
    ax.set_ylabel("MiB/s (median, min..max)")
    ax.set_title(f"Checksummed snapshots, {mib:.0f} MiB of state")
    save_figure(fig, "integrity")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
