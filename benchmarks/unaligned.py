"""Checkpoints under backpressure: aligned, aligned with a timeout, and unaligned.

1. *Backpressure.* A per-event feature job: two rate-limited sources of the
   feature-window events, key by ``user_id``, a running count per user
   (one output row per event), into a sink throttled to a tenth of the source
   rate, so the whole pipeline runs backpressured. It runs ``--seconds``
   seconds per mode with a checkpoint every second, then stops (draining and
   committing). Reported per mode: checkpoint end-to-end duration p50/p99,
   channel-state bytes per checkpoint, events/s, and each checkpoint's
   duration over time.
2. *Recovery under backpressure.* The same job again per mode; once
   ``--kill-after`` checkpoints completed, the actor of the count subtask 0 is
   killed with ``ray.kill``. Recovery time runs from just before the kill to
   the latest ``first_record_at`` over every actor of the restarted attempt,
   each of them restored from a checkpoint (``restored_from``). Reported with
   it: the restored checkpoint (id, age at the kill, channel-state and state
   bytes, from its manifest) and the events the sources read twice (their
   reads over every attempt minus their final positions). The job is then
   stopped (drained) and its committed output checked against the
   failure-free expectation: for each user, the counts 1..n exactly once,
   where n counts the user's events up to the sources' final positions.
3. *Overhead.* The unthrottled feature-window job (N = 10 M, parallelism 2,
   Parquet sink) with checkpointing off, aligned every second and unaligned
   every second, alternating, ``--repeats`` times: the ratio of medians.

Writes ``benchmarks/results/unaligned.json`` and ``unaligned.png``.

    python benchmarks/unaligned.py [--seconds 20] [--repeats 3] [--kill-after 3] [--quick]
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
from onceflow.checkpoint.state import read_source_state
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
BATCH_SIZE = 2_000
"""Rows per source batch (the unit of replay)."""
USERS = 100_000
"""Distinct ``user_id`` values of the feature events."""


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


def backpressured_flow(name: str) -> tuple[of.Dataflow, ThrottledSink]:
    """The running count per user, from two rate-limited sources into a sink at a tenth of their rate."""
    flow = of.Dataflow(name)
    events = flow.source(of.sources.GeneratorSource(feature_events, total=None, batch_size=BATCH_SIZE,
                                                    max_events_per_s=SOURCE_RATE), name="events")
    # The sink (two subtasks) takes a tenth of what the two sources send.
    sink = ThrottledSink(rows_per_s=SOURCE_RATE / 10)
    events.key_by("user_id").process(running_count, name="count").sink(sink, name="out")
    return flow, sink


def backpressured(mode: str, seconds: float, name: str) -> dict[str, Any]:
    storage = tempfile.mkdtemp(prefix="of-bench-chk-")
    try:
        flow, _ = backpressured_flow(name)
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


def recovery(mode: str, checkpoints: int, name: str, timeout_s: float = 120.0) -> dict[str, Any]:
    """Kill the count subtask 0 once ``checkpoints`` checkpoints completed under backpressure; time the recovery.

    Then stop the job (draining it) and check its committed output against the
    failure-free expectation: the running counts 1..n of every user, once each,
    where n counts the user's events among those the sources read (their
    positions in the final checkpoint).
    """
    storage = tempfile.mkdtemp(prefix="of-bench-chk-")
    try:
        flow, sink = backpressured_flow(name)
        checkpoint = of.CheckpointConfig(interval_s=1.0, storage=storage, timeout_s=120.0, **MODES[mode])
        handle = of.submit(flow, parallelism=2, checkpoint=checkpoint,
                           restart=of.RestartStrategy.fixed_delay(attempts=1, delay_s=0.0))
        chk = CheckpointStorage(storage, name)
        try:
            wait_until(lambda: len(chk.history()) >= checkpoints, timeout_s,
                       what=f"{checkpoints} completed checkpoints")
            victim = next(n for n in handle.actor_names if n.split("/")[1].startswith("count"))
            read_before = handle.metrics()["events_in"]
            timing = kill_and_time_recovery(handle, victim, timeout_s)
            # Read the restored checkpoint now: newer ones make the storage delete it (retain=3).
            restored = chk.manifest(timing["restored_from"])
            result = handle.stop(timeout_s=600)
        except BaseException:
            handle.cancel()
            raise
        if restored is None:
            msg = f"checkpoint {timing['restored_from']} was gone before its manifest was read"
            raise RuntimeError(msg)
        final = chk.latest_manifest()
        assert final is not None
        restored_events = sum(len(r) for r in source_position(chk, restored)) * BATCH_SIZE
        final_batches = source_position(chk, final)
        check = verify_running_counts(sink.table(), final_batches)
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    if not check["exact"]:
        raise SystemExit(f"{mode}: committed output after the restart is not exact: {check}")
    tasks = restored["tasks"].values()
    return {
        "mode": mode, "killed": victim, "checkpoints_before_kill": checkpoints,
        "recovery_s": timing["recovery_s"],
        "restored_checkpoint_id": timing["restored_from"],
        "restored_checkpoint_age_s": timing["failed_at"] - restored["trigger_time"],
        "restored_unaligned": any(t["metrics"].get("unaligned") for t in tasks),
        "restored_channel_state_bytes": int(sum(t["metrics"].get("channel_state_bytes", 0) for t in tasks)),
        "restored_state_bytes": restored["state_bytes"],
        "events_read_before_kill": read_before,
        "events_at_restored_checkpoint": restored_events,
        "events_after_checkpoint_at_kill": read_before - restored_events,
        # Every event read past its final position was read twice: once by the failed attempt, after the
        # restored checkpoint (until the kill, and on until the attempt was fenced), and again by the next one.
        "events_replayed": result.metrics["events_in"] - sum(len(r) for r in final_batches) * BATCH_SIZE,
        "restarts": result.metrics["restarts"],
        "output": check,
    }


def source_position(chk: CheckpointStorage, manifest: dict[str, Any]) -> list[range]:
    """The batch indices the source subtasks had read when ``manifest``'s checkpoint was taken."""
    read = []
    for entry in manifest["tasks"].values():
        for handle in entry["states"].values():
            table = chk.read_state(handle["path"])
            if (table.schema.metadata or {}).get(b"onceflow.state") != b"source":
                continue  # not a source's position
            offset, _ = read_source_state(table)
            read.extend(range(start, end, stride) for stride, start, end, _ in offset["cursors"])
    return read


def verify_running_counts(table: pa.Table, batches: list[range]) -> dict[str, Any]:
    """Compare the committed ``(user_id, seen)`` rows with counts 1..n per user, n from the events of ``batches``."""
    expected = np.zeros(USERS, np.int64)
    for batch in (b for r in batches for b in r):
        users = feature_events(batch * BATCH_SIZE, BATCH_SIZE).column("user_id").to_numpy()
        expected += np.bincount(users, minlength=USERS)
    user = table.column("user_id").to_numpy() if table.num_rows else np.zeros(0, np.int64)
    seen = table.column("seen").to_numpy() if table.num_rows else np.zeros(0, np.int64)
    pairs = np.unique(user * (1 << 32) + seen)
    valid = (pairs % (1 << 32) >= 1) & (pairs % (1 << 32) <= expected[pairs // (1 << 32)])
    rows, expected_rows = len(user), int(expected.sum())
    duplicates, unexpected = rows - len(pairs), int((~valid).sum())
    missing = expected_rows - int(valid.sum())
    return {"rows": rows, "expected_rows": expected_rows, "duplicates": duplicates, "missing": missing,
            "unexpected": unexpected, "exact": duplicates == missing == unexpected == 0}


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
    parser.add_argument("--kill-after", type=int, default=3,
                        help="completed checkpoints before the recovery run kills a count subtask")
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
    recoveries = []
    for number, mode in enumerate(MODES):
        recoveries.append(recovery(mode, args.kill_after, f"bench-unaligned-recovery-{number}"))
        r = recoveries[-1]
        print(f"{mode:>24}: recovered in {r['recovery_s']:.2f} s from checkpoint {r['restored_checkpoint_id']} "
              f"({r['restored_checkpoint_age_s']:.2f} s old, channel state "
              f"{r['restored_channel_state_bytes'] / 2**10:,.0f} KiB, {r['events_replayed']:,} events replayed); "
              f"output exact ({r['output']['rows']:,} rows)")
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
        "recovery": {"workload": "the backpressure job; once --kill-after checkpoints completed, the count subtask "
                                 "actor 0 is killed (ray.kill); recovery_s runs from the kill to the last first "
                                 "record processed by the restored actors; then stop() drains and the committed "
                                 "output is checked against counts 1..n per user",
                     "kill_after_checkpoints": args.kill_after, "results": recoveries},
        "overhead": {"workload": f"feature-window, N={events}, parallelism 2, ParquetSink, checkpoint every 1 s",
                     "repeats": repeats, "results": overhead},
    })
    plot(pressure, recoveries, overhead)
    print(f"wrote {path}")


def plot(pressure: list[dict[str, Any]], recoveries: list[dict[str, Any]], overhead: dict[str, Any]) -> None:
    plt = pyplot()
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(17, 4))
    for p in pressure:
        left.plot(p["triggered_at_s"], p["durations_s"], marker="o", markersize=3,
                  label=f"{p['mode']} (p99 {p['duration_p99_s']:.2f} s)")
    left.set_yscale("log")
    left.set_xlabel("checkpoint triggered at (s)")
    left.set_ylabel("checkpoint duration (s, log)")
    left.set_title("backpressure: sink at 1/10 of the source rate")
    left.legend(fontsize=8)
    bars = middle.bar([r["mode"] for r in recoveries], [r["recovery_s"] for r in recoveries], color="#55a868")
    middle.bar_label(bars, [f"chk {r['restored_checkpoint_id']}, "
                            f"{r['restored_channel_state_bytes'] / 2**10:,.0f} KiB in flight"
                            for r in recoveries], fontsize=8)
    middle.set_ylabel("seconds, kill to first record after restore")
    middle.set_title("recovery under backpressure (count subtask killed)")
    middle.tick_params(axis="x", labelsize=8)
    labels = list(overhead)
    right.bar(labels, [overhead[k]["events_per_s_median"] / 1e6 for k in labels], color="#4c72b0")
    right.set_ylabel("million events/s (median)")
    right.set_title("unthrottled feature-window, checkpoints every 1 s")
    fig.tight_layout()
    save_figure(fig, "unaligned")


if __name__ == "__main__":
    main()
