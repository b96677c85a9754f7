"""Checkpointing cost and recovery time on the feature-window workload.

1. Throughput with checkpoints every ``--interval`` s and every
   ``--fast-interval`` s (aligned) against checkpointing off, alternating runs in one session (N = 10,000,000,
   parallelism 2, Parquet sink): the overhead is the ratio of medians.
2. Checkpoint end-to-end duration and alignment time, p50/p99 over every
   checkpoint of the ``--interval`` runs.
3. Recovery time: a rate-limited job holds 100,000 or 1,000,000 keys of window
   state (one window that never fires); once a checkpoint with that state is
   complete, a window subtask actor is killed with ``ray.kill``. Recovery is
   the time from the kill until every restored subtask processed its first
   record (restore from the object store copy, sources rewound).

Writes ``benchmarks/results/checkpointing.json`` and ``checkpointing.png``.

    python benchmarks/checkpointing.py [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import onceflow as of
from benchmarks.common import (
    feature_flow,
    kill_and_time_recovery,
    pyplot,
    save_figure,
    start_ray,
    wait_until,
    write_json,
)
from onceflow.checkpoint.storage import CheckpointStorage
from onceflow.runtime.checkpointing import percentile


def throughput(events: int, interval: float | None, name: str) -> dict[str, Any]:
    out = Path(tempfile.mkdtemp(prefix="of-bench-out-"))
    storage = Path(tempfile.mkdtemp(prefix="of-bench-chk-"))
    try:
        flow = feature_flow(name, of.sinks.ParquetSink(str(out)), events=events)
        checkpoint = of.CheckpointConfig(interval_s=interval, storage=str(storage)) if interval else None
        m = of.run(flow, parallelism=2, checkpoint=checkpoint).metrics
        history = m.get("checkpoint_history", [])
        return {"events_per_s": m["events_per_s"], "duration_s": m["duration_s"],
                "checkpoints": len(history),
                "checkpoint_durations_s": [h["duration_s"] for h in history],
                "alignments_s": [h["alignment_s"] for h in history],
                "state_bytes": [h["state_bytes"] for h in history]}
    finally:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(storage, ignore_errors=True)


def recovery(keys: int, repeats: int, name: str) -> dict[str, Any]:
    storage = tempfile.mkdtemp(prefix="of-bench-chk-")
    flow = feature_flow(name, of.sinks.TestingSink(), events=None, batch_size=20_000, users=keys,
                        window_ms=10**12, rate=max(keys // 2, 100_000))
    handle = of.submit(flow, parallelism=2, checkpoint=of.CheckpointConfig(interval_s=1.0, storage=storage),
                       restart=of.RestartStrategy.fixed_delay(attempts=repeats + 1, delay_s=0.0))
    waiter = threading.Thread(target=lambda: _swallow(handle.wait), daemon=True)
    waiter.start()
    chk = CheckpointStorage(storage, name)
    times, state_bytes = [], []
    try:
        for _ in range(repeats):
            def big_checkpoint() -> dict[str, Any] | None:
                manifest = chk.latest_manifest()
                rows = sum(s["rows"] for t in (manifest or {}).get("tasks", {}).values()
                           for op, s in t["states"].items() if op.startswith("window"))
                return manifest if rows >= keys * 0.95 else None

            manifest = wait_until(big_checkpoint)
            wait_until(lambda m=manifest: (chk.latest_manifest() or {}).get("checkpoint_id", 0)
                       > m["checkpoint_id"])  # a fresh one, after any earlier restore
            state_bytes.append(chk.latest_manifest()["state_bytes"])  # type: ignore[index]
            times.append(kill_and_time_recovery(handle, f"{name}/window_2/0")["recovery_s"])
            print(f"  {keys:>9,} keys: recovered in {times[-1]:.2f} s")
    finally:
        handle.cancel()
        shutil.rmtree(storage, ignore_errors=True)
    return {"keys": keys, "recovery_s": times, "recovery_s_median": statistics.median(times),
            "recovery_s_max": max(times), "state_bytes": state_bytes}


def _swallow(fn: Any) -> None:
    with contextlib.suppress(Exception):  # the benchmark cancels the job at the end
        fn()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--fast-interval", type=float, default=0.2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--recovery-only", action="store_true",
                        help="measure only the recovery time (written to checkpointing-recovery.json)")
    args = parser.parse_args()
    events = 1_000_000 if args.quick else 10_000_000
    repeats = 1 if args.quick else args.repeats
    start_ray()
    if args.recovery_only:
        recoveries = [recovery(keys, args.repeats, f"bench-recovery-{keys}") for keys in (100_000, 1_000_000)]
        print(f"wrote {write_json('checkpointing-recovery', {'recovery': recoveries})}")
        return
    throughput(events // 5, None, "bench-warmup")
    off, on, fast = [], [], []
    for i in range(repeats):
        off.append(throughput(events, None, f"bench-off-{i}"))
        on.append(throughput(events, args.interval, f"bench-on-{i}"))
        fast.append(throughput(events, args.fast_interval, f"bench-fast-{i}"))
        print(f"run {i}: off {off[-1]['events_per_s']:,.0f} events/s, every {args.interval:g} s "
              f"{on[-1]['events_per_s']:,.0f} ({on[-1]['checkpoints']} checkpoints), every "
              f"{args.fast_interval:g} s {fast[-1]['events_per_s']:,.0f} ({fast[-1]['checkpoints']} checkpoints)")
    off_median = statistics.median(r["events_per_s"] for r in off)
    on_median = statistics.median(r["events_per_s"] for r in on)
    fast_median = statistics.median(r["events_per_s"] for r in fast)
    durations = [d for r in on for d in r["checkpoint_durations_s"]]
    alignments = [a for r in on for a in r["alignments_s"]]
    summary = {
        "events": events, "parallelism": 2, "interval_s": args.interval,
        "events_per_s_off_median": off_median, "events_per_s_on_median": on_median,
        "overhead": 1 - on_median / off_median,
        "fast_interval_s": args.fast_interval, "events_per_s_fast_median": fast_median,
        "overhead_fast": 1 - fast_median / off_median,
        "checkpoint_duration_p50_s": percentile(durations, 0.5),
        "checkpoint_duration_p99_s": percentile(durations, 0.99),
        "alignment_p50_s": percentile(alignments, 0.5), "alignment_p99_s": percentile(alignments, 0.99),
        "checkpoints_measured": len(durations),
    }
    print(f"overhead {summary['overhead']:.1%}; checkpoint p50 {summary['checkpoint_duration_p50_s']:.3f} s, "
          f"p99 {summary['checkpoint_duration_p99_s']:.3f} s; alignment p99 {summary['alignment_p99_s']:.3f} s")
    recoveries = [recovery(keys, repeats, f"bench-recovery-{keys}") for keys in (100_000, 1_000_000)]
    path = write_json("checkpointing", {"throughput": summary, "runs_off": off, "runs_on": on, "runs_fast": fast,
                                        "recovery": recoveries})
    plot(summary, recoveries)
    print(f"wrote {path}")


def plot(summary: dict[str, Any], recoveries: list[dict[str, Any]]) -> None:
    plt = pyplot()

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.bar(["off", f"every {summary['interval_s']:g} s", f"every {summary['fast_interval_s']:g} s"],
             [summary["events_per_s_off_median"] / 1e6, summary["events_per_s_on_median"] / 1e6,
              summary["events_per_s_fast_median"] / 1e6], color=["#4c72b0", "#dd8452", "#c44e52"])
    left.set_ylabel("million events/s (median)")
    left.set_title(f"overhead {summary['overhead']:.1%} / {summary['overhead_fast']:.1%}")
    labels = [f"{r['keys']:,} keys" for r in recoveries]
    right.bar(labels, [r["recovery_s_median"] for r in recoveries],
              yerr=[[0] * len(recoveries), [r["recovery_s_max"] - r["recovery_s_median"] for r in recoveries]],
              capsize=4, color="#55a868")
    right.axhline(3.0, color="#c44e52", linestyle="--", label="target 3 s")
    right.set_ylabel("seconds, kill to first record after restore")
    right.set_title("recovery time")
    right.legend()
    fig.tight_layout()
    save_figure(fig, "checkpointing")


if __name__ == "__main__":
    main()
