"""Recovery time against state size: kill a window subtask holding K keys, time until every subtask runs again.

The feature-window job (parallelism 2, checkpoints every second) runs in
four kinds (:data:`KINDS`): a killed window actor with every actor replaced on
the restart (``restart_in_place=False``, how every restart went before), the
same with the surviving actors reset in place (the default), with
incremental checkpoints in place, and an error raised in a source subtask
(a ``map_batches`` step fails once: no process is lost, all four actors are
reset in place; timed from the raise). It runs with K users and one long window, so its keyed state holds
every key seen. Once a checkpoint holds at least 80% of the K keys, and the
job's spare worker process is ready (started
:data:`onceflow.runtime.warm.SPARE_AFTER_S` after the job deployed), a window
subtask actor is killed (``ray.kill``) and the recovery is timed as
``benchmarks/common.kill_and_time_recovery`` does: from the kill to the last
subtask of the next attempt processing rows again (failure detected, attempt
fenced, actors deployed, state read and restored). The job's own record of
the restart splits it: ``fence_s`` (the failed attempt fenced),
``deploy_s`` (actors created or reset, state restored, wired), and the
failure's detection before them. Repeated ``--repeats`` times per size.
Writes ``benchmarks/results/recovery.json`` and ``recovery.png``.

    python benchmarks/recovery.py [--keys 10000 100000 1000000] [--repeats 2] [--kinds ...] [--output NAME] [--quick]
"""

from __future__ import annotations

import argparse
import os
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
from benchmarks.common import (
    feature_flow,
    kill_and_time_recovery,
    pyplot,
    save_figure,
    start_ray,
    time_recovery,
    wait_until,
    write_json,
)
from onceflow.checkpoint.storage import CheckpointStorage
from onceflow.runtime import warm
from onceflow.runtime.warm import SPARE_AFTER_S

KINDS = {
    "killed, new actors": {"incremental": False, "in_place": False, "failure": "kill"},
    "killed, in place": {"incremental": False, "in_place": True, "failure": "kill"},
    "killed, incremental, in place": {"incremental": True, "in_place": True, "failure": "kill"},
    "error, in place": {"incremental": False, "in_place": True, "failure": "error"},
}
"""The kinds measured: checkpoints full or incremental; a restart replaces every actor, or resets the survivors;
the failure kills a window subtask's actor, or is an error raised in a source subtask (no process lost)."""


class FailOnFlag:
    """A ``map_batches`` step that raises ``ConnectionError`` once, when its flag file appears; it notes when."""

    def __init__(self, flag: Path) -> None:
        self.flag = flag

    def __call__(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        fired = self.flag.with_suffix(".fired")
        try:
            os.rename(self.flag, fired)  # the subtask that renames it raises; the others go on
        except FileNotFoundError:
            return batch
        fired.write_text(repr(time.time()))
        msg = "injected by benchmarks/recovery.py: a transient error"
        raise ConnectionError(msg)


def one(keys: int, incremental: bool, in_place: bool, failure: str, number: int) -> dict[str, Any]:
    name = f"recovery-{keys}-{int(incremental)}{int(in_place)}{failure}-{number}"
    storage = tempfile.mkdtemp(prefix="onceflow-recovery-")
    flag = Path(storage) / "fail.flag"
    flow = feature_flow(name, of.sinks.TestingSink(), events=None, batch_size=min(100_000, max(keys // 10, 1_000)),
                        users=keys, window_ms=10**12, rate=max(keys // 4, 20_000),
                        transform=FailOnFlag(flag) if failure == "error" else None)
    submitted = time.monotonic()
    handle = of.submit(flow, parallelism=2, checkpoint=of.CheckpointConfig(interval_s=1.0, storage=storage,
                                                                           incremental=incremental),
                       restart=of.RestartStrategy.fixed_delay(attempts=2, delay_s=0.0), restart_in_place=in_place)
    try:
        store = CheckpointStorage(storage, name)

        def held() -> int | None:  # the newest checkpoint's state bytes, once the input covers ~80% of the keys
            history = store.history()
            enough = history and handle.metrics()["events_in"] >= 1.6 * keys  # 1 - e^-1.6: 80% of the keys seen
            return int(history[-1]["state_bytes"]) if enough else None

        state_bytes = wait_until(held, timeout_s=600, what="state of the keys in a checkpoint")
        # A job starts its spare worker SPARE_AFTER_S after deploying.
        wait_until(lambda: time.monotonic() - submitted >= SPARE_AFTER_S and warm.idle_workers(ready=True),
                   timeout_s=120, what="the job's spare worker")
        if failure == "kill":
            timing = kill_and_time_recovery(handle, f"{name}/window_2/0", timeout_s=600)
        else:
            timing = fail_and_time_recovery(handle, flag)
        restart = wait_until(lambda: (handle.view().get("restarts") or [None])[-1], timeout_s=30,
                             what="the restart in the job's view")
    finally:
        handle.cancel()
        shutil.rmtree(storage, ignore_errors=True)
    return {"recovery_s": timing["recovery_s"], "state_bytes": state_bytes,
            "detect_s": restart["at"] - timing["failed_at"], "fence_s": restart["fence_s"],
            "deploy_s": restart["deploy_s"], "replaced": restart["replaced"]}


def fail_and_time_recovery(handle: of.JobHandle, flag: Path) -> dict[str, Any]:
    """Raise the injected error and time the recovery, from the raise to every subtask processing rows again."""

    def fail() -> float:
        flag.touch()
        fired = flag.with_suffix(".fired")
        return wait_until(lambda: fired.exists() and fired.read_text() and float(fired.read_text()), timeout_s=60,
                          what="the injected error")

    return time_recovery(handle, fail, 600)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--kinds", nargs="+", choices=list(KINDS), default=list(KINDS))
    parser.add_argument("--output", default="recovery", help="the name of the JSON and PNG written")
    parser.add_argument("--quick", action="store_true", help="10 k and 100 k keys, once")
    args = parser.parse_args()
    sizes, repeats = ([10_000, 100_000], 1) if args.quick else (args.keys, args.repeats)
    start_ray()
    results: dict[str, dict[str, Any]] = {}
    for kind, settings in ((k, KINDS[k]) for k in args.kinds):
        for keys in sizes:
            runs = [one(keys, settings["incremental"], settings["in_place"], settings["failure"], i)
                    for i in range(repeats)]
            seconds = [r["recovery_s"] for r in runs]
            results.setdefault(kind, {})[str(keys)] = {
                "median_s": statistics.median(seconds), "min_s": min(seconds), "max_s": max(seconds),
                "state_bytes": statistics.median(r["state_bytes"] for r in runs),
                **{phase: statistics.median(r[phase] for r in runs) for phase in ("detect_s", "fence_s", "deploy_s")},
                "runs": runs}
            figures = results[kind][str(keys)]
            print(f"{kind:>22} {keys:>10,} keys ({figures['state_bytes'] / 2**20:8.1f} MiB): "
                  f"recovery {figures['median_s']:.2f} s [{min(seconds):.2f} .. {max(seconds):.2f}]; detect "
                  f"{figures['detect_s']:.2f}, fence {figures['fence_s']:.2f}, deploy {figures['deploy_s']:.2f} s")
    path = write_json(args.output, {"repeats": repeats, "by_kind": results})
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    colours = dict(zip(KINDS, ("tab:gray", "tab:blue", "tab:green", "tab:orange"), strict=True))
    for kind, colour in ((k, colours[k]) for k in results):
        xs = [int(k) for k in results[kind]]
        med = [results[kind][k]["median_s"] for k in results[kind]]
        low = [m - results[kind][k]["min_s"] for m, k in zip(med, results[kind], strict=True)]
        high = [results[kind][k]["max_s"] - m for m, k in zip(med, results[kind], strict=True)]
        ax.errorbar(xs, med, yerr=[low, high], marker="o", capsize=3, label=kind, color=colour)
    ax.set_xscale("log")
    ax.set_xlabel("keys in window state")
    ax.set_ylabel("failure to every subtask running again (s)")
    ax.set_title("Recovery time against state size (median, min..max)")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, args.output)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
