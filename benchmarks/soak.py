"""A soak: skewed keys and a throttled stage for minutes; every actor's resident memory must stay flat.

The job: a ``GeneratorSource`` at parallelism 2 whose events carry a skewed
key (one user has 30% of the events, the rest spread over 10,000 users),
offered at ``--rate`` events/s; a ``map_batches`` stage at parallelism 1 that
lets through only a tenth of that (it sleeps per batch), so the sources are
held back by credits the whole time; then ``key_by`` user → 1-second
tumbling windows (count and sum) → a ``ParquetSink``, unaligned checkpoints
every second and 32 KiB channel batches (with aligned checkpoints, or the
default 4 MiB batches, a barrier waits behind a minute of throttled rows and
the checkpoint expires). The input is bounded so the run lasts about ``--seconds`` at the
throttled pace, and its committed output is checked against a numpy
reference at the end.

Every second the resident set size (RSS) of every onceflow actor process
(sources, operators, coordinator) is sampled. Reported per process: RSS after
warm-up (the first sample past 20% of the run), at the end, and the growth
between them; the job's checkpoints completed and failed. Writes
``benchmarks/results/soak.json`` and ``soak.png`` (RSS over time, one line
per actor).

    python benchmarks/soak.py [--seconds 300] [--rate 20000] [--quick]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.dataset as ds

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import onceflow as of
from benchmarks.common import pyplot, save_figure, start_ray, write_json

USERS = 10_000
HOT_SHARE = 0.3
WINDOW_MS = 1_000
ACTORS = ("ray::SubtaskActor", "ray::CoordinatorActor")


def skewed_events(offset: int, n: int) -> pa.RecordBatch:
    """Rows ``offset .. offset + n``: user 0 has 30% of them, the others spread over 10,000; 1 ms apart."""
    rows = np.arange(offset, offset + n, dtype=np.int64)
    mixed = (rows * 2_654_435_761) % 1_000  # a fixed scramble of the row number, 0..999
    user = np.where(mixed < HOT_SHARE * 1_000, 0, 1 + (rows * 40_503) % USERS)
    return pa.record_batch({"user_id": user, "amount": (rows % 100).astype(np.int64), "event_time": rows})


class Throttle:
    """Let ``per_s`` rows a second through (sleeping per batch)."""

    def __init__(self, per_s: float) -> None:
        self.per_s = per_s

    def __call__(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        time.sleep(batch.num_rows / self.per_s)
        return batch


def reference(total: int) -> pa.Table:
    events = skewed_events(0, total)
    user, amount = events.column("user_id").to_numpy(), events.column("amount").to_numpy()
    window = events.column("event_time").to_numpy() // WINDOW_MS
    unique, inverse = np.unique(window * (USERS + 1) + user, return_inverse=True)
    return pa.table({"user_id": (unique % (USERS + 1)).astype(np.int64),
                     "window_start": (unique // (USERS + 1) * WINDOW_MS).astype(np.int64),
                     "count": np.bincount(inverse).astype(np.int64),
                     "total": np.bincount(inverse, weights=amount).astype(np.int64)})


class RssSampler:
    """Samples the RSS of every onceflow actor process once a second."""

    def __init__(self) -> None:
        self.samples: dict[str, list[tuple[float, int]]] = {}
        self._stop = threading.Event()
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic() - self._started
            for proc in psutil.process_iter(["pid", "cmdline"]):
                cmdline = proc.info.get("cmdline") or []
                if cmdline and cmdline[0].startswith(ACTORS):
                    try:
                        rss = proc.memory_info().rss
                    except psutil.Error:
                        continue
                    actor = cmdline[0].removeprefix("ray::").split(".")[0]  # the title names the running method too
                    self.samples.setdefault(f"{actor} pid {proc.info['pid']}", []).append((now, rss))
            self._stop.wait(1.0)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_soak(seconds: float, rate: int) -> dict[str, Any]:
    """Run the soak for about ``seconds`` with sources offering ``rate`` events/s; return its figures."""
    throttled = rate / 10
    total = int(throttled * seconds)
    start_ray()
    root = Path(tempfile.mkdtemp(prefix="onceflow-soak-"))
    try:
        flow = of.Dataflow("soak")
        events = flow.source(of.sources.GeneratorSource(skewed_events, total=total, batch_size=1_000,
                                                        max_events_per_s=rate),
                             watermark=of.BoundedOutOfOrderness("event_time"), name="events")
        (events.map_batches(Throttle(throttled), name="throttle", parallelism=1)
         .key_by("user_id").window(of.windows.Tumbling(size_ms=WINDOW_MS))
         .aggregate(count=of.agg.count(), total=of.agg.sum("amount"), name="window")
         .sink(of.sinks.ParquetSink(str(root / "out")), name="parquet"))
        started = time.monotonic()
        with RssSampler() as sampler:
            # Unaligned: behind a throttled stage an aligned barrier waits out every queued row (a minute and
            # more), and the checkpoint expires; Flink's answer to lasting backpressure is the same. Small
            # channel batches: a 4 MiB one would hold the throttled stage (and any barrier) for a minute.
            result = of.run(flow, parallelism=2, timeout_s=seconds * 3 + 120, batch_bytes=32_768,
                            checkpoint=of.CheckpointConfig(interval_s=1.0, storage=str(root / "chk"),
                                                           mode="unaligned"))
        duration = time.monotonic() - started
        got = ds.dataset(root / "out", format="parquet").to_table(
            columns=["user_id", "window_start", "count", "total"]).sort_by([("window_start", "ascending"),
                                                                              ("user_id", "ascending")])
        expected = reference(total).sort_by([("window_start", "ascending"), ("user_id", "ascending")])
        exact = got.equals(expected)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    per_actor: dict[str, dict[str, Any]] = {}
    for name, series in sorted(sampler.samples.items()):
        warm = next((rss for t, rss in series if t >= 0.2 * duration), series[-1][1])
        end = series[-1][1]
        per_actor[name] = {"warm_mib": warm / 2**20, "end_mib": end / 2**20, "growth_mib": (end - warm) / 2**20,
                           "max_mib": max(r for _, r in series) / 2**20,
                           "series": [[round(t, 1), round(r / 2**20, 1)] for t, r in series]}
    return {"seconds": duration, "events": total, "offered_per_s": rate, "throttled_per_s": throttled,
            "hot_share": HOT_SHARE, "checkpoints_completed": result.metrics.get("checkpoints_completed"),
            "checkpoints_failed": result.metrics.get("checkpoints_failed"), "restarts": result.metrics["restarts"],
            "output_exact": exact, "actors": per_actor}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--rate", type=int, default=20_000, help="events/s the sources offer")
    parser.add_argument("--quick", action="store_true", help="30 s")
    args = parser.parse_args()
    payload = run_soak(30.0 if args.quick else args.seconds, args.rate)
    path = write_json("soak", payload)
    per_actor = payload["actors"]
    for name, figures in per_actor.items():
        print(f"{name:>28}: {figures['warm_mib']:7.1f} MiB after warm-up, {figures['end_mib']:7.1f} MiB at the end "
              f"({figures['growth_mib']:+.1f}), max {figures['max_mib']:.1f}")
    print(f"{payload['events']:,} events in {payload['seconds']:.0f} s; checkpoints {payload['checkpoints_completed']} "
          f"completed, {payload['checkpoints_failed']} failed; output exact: {payload['output_exact']}")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    for name, figures in per_actor.items():
        series = np.array(figures["series"])
        ax.plot(series[:, 0], series[:, 1], label=name)
    ax.axvline(0.2 * payload["seconds"], color="grey", linestyle=":", label="end of warm-up")
    ax.set_xlabel("seconds")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title(f"Soak: {payload['events']:,} skewed events, a stage throttled to "
                 f"{payload['throttled_per_s']:,.0f}/s")
    ax.legend(fontsize=6)
    save_figure(fig, "soak")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
