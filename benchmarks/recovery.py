"""Recovery time against state size: kill a window subtask holding K keys, time until every subtask runs again.

The feature-window job (parallelism 2, checkpoints every second, full or
incremental) runs with K users and one long window, so its keyed state holds
every key seen. Once a checkpoint holds at least 80% of the K keys, a window
subtask actor is killed (``ray.kill``) and the recovery is timed as
``benchmarks/common.kill_and_time_recovery`` does: from the kill to the last
subtask of the next attempt processing rows again (failure detected, attempt
fenced, actors deployed, state read and restored). Repeated ``--repeats``
times per size. Writes ``benchmarks/results/recovery.json`` and ``recovery.png``.

    python benchmarks/recovery.py [--keys 10000 100000 1000000 10000000] [--repeats 2] [--quick]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
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


def one(keys: int, incremental: bool, number: int) -> dict[str, Any]:
    name = f"recovery-{keys}-{int(incremental)}-{number}"
    storage = tempfile.mkdtemp(prefix="onceflow-recovery-")
    flow = feature_flow(name, of.sinks.TestingSink(), events=None, batch_size=min(100_000, max(keys // 10, 1_000)),
                        users=keys, window_ms=10**12, rate=max(keys // 4, 20_000))
    handle = of.submit(flow, parallelism=2, checkpoint=of.CheckpointConfig(interval_s=1.0, storage=storage,
                                                                           incremental=incremental),
                       restart=of.RestartStrategy.fixed_delay(attempts=2, delay_s=0.0))
    try:
        store = CheckpointStorage(storage, name)

        def held() -> int | None:  # the newest checkpoint's state bytes, once the input covers ~80% of the keys
            history = store.history()
            enough = history and handle.metrics()["events_in"] >= 1.6 * keys  # 1 - e^-1.6: 80% of the keys seen
            return int(history[-1]["state_bytes"]) if enough else None

        state_bytes = wait_until(held, timeout_s=600, what="state of the keys in a checkpoint")
        timing = kill_and_time_recovery(handle, f"{name}/window_2/0", timeout_s=600)
    finally:
        handle.cancel()
        shutil.rmtree(storage, ignore_errors=True)
    return {"recovery_s": timing["recovery_s"], "state_bytes": state_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, nargs="+", default=[10_000, 100_000, 1_000_000, 10_000_000])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="10 k and 100 k keys, once")
    args = parser.parse_args()
    sizes, repeats = ([10_000, 100_000], 1) if args.quick else (args.keys, args.repeats)
    start_ray()
    results: dict[str, dict[str, Any]] = {}
    for incremental in (False, True):
        kind = "incremental" if incremental else "full"
        for keys in sizes:
            runs = [one(keys, incremental, i) for i in range(repeats)]
            seconds = [r["recovery_s"] for r in runs]
            results.setdefault(kind, {})[str(keys)] = {
                "median_s": statistics.median(seconds), "min_s": min(seconds), "max_s": max(seconds),
                "state_bytes": statistics.median(r["state_bytes"] for r in runs), "runs": runs}
            print(f"{kind:>11} {keys:>10,} keys ({results[kind][str(keys)]['state_bytes'] / 2**20:8.1f} MiB): "
                  f"recovery {statistics.median(seconds):.2f} s [{min(seconds):.2f} .. {max(seconds):.2f}]")
    path = write_json("recovery", {"repeats": repeats, "by_kind": results})
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for kind, colour in (("full", "tab:gray"), ("incremental", "tab:blue")):
        xs = [int(k) for k in results[kind]]
        med = [results[kind][k]["median_s"] for k in results[kind]]
        low = [m - results[kind][k]["min_s"] for m, k in zip(med, results[kind], strict=True)]
        high = [results[kind][k]["max_s"] - m for m, k in zip(med, results[kind], strict=True)]
        ax.errorbar(xs, med, yerr=[low, high], marker="o", capsize=3, label=kind, color=colour)
    ax.set_xscale("log")
    ax.set_xlabel("keys in window state")
    ax.set_ylabel("kill to every subtask running again (s)")
    ax.set_title("Recovery time against state size (median, min..max)")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, "recovery")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
