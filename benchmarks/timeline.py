"""Throughput over time through a killed actor, with checkpoints and the failure marked.

The feature-window job reads at a fixed rate (``--rate`` events/s, parallelism
2, checkpoints every ``--interval`` s). Halfway through, a window subtask actor
is killed with ``ray.kill``; the job restores the newest checkpoint and replays
from the recorded offsets (the rate limit applies to the replay too). The
sources' counters are sampled every 0.1 s and turned into events/s over 0.5 s
windows; nothing is read while the job restarts. Writes ``benchmarks/results/timeline.json`` and
``timeline.png``.

    python benchmarks/timeline.py [--rate 1000000] [--seconds 12]
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import ray

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import onceflow as of
from benchmarks.common import feature_flow, pyplot, save_figure, start_ray, write_json
from onceflow.checkpoint.storage import CheckpointStorage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--interval", type=float, default=1.0)
    args = parser.parse_args()
    start_ray()
    name, storage = "timeline", tempfile.mkdtemp(prefix="of-bench-chk-")
    events = int(args.rate * args.seconds)
    sink = of.sinks.TestingSink()
    handle = of.submit(feature_flow(name, sink, events=events, batch_size=50_000, rate=args.rate), parallelism=2,
                       checkpoint=of.CheckpointConfig(interval_s=args.interval, storage=storage))
    outcome: dict[str, Any] = {}

    def wait() -> None:
        outcome["result"] = handle.wait()

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    started = time.time()
    samples: list[tuple[float, int | None]] = []
    killed_at = None
    while waiter.is_alive():
        try:
            samples.append((time.time() - started, handle.metrics(timeout_s=1.0)["events_in"]))
        except Exception:
            samples.append((time.time() - started, None))
        if killed_at is None and time.time() - started > args.seconds / 2:
            killed_at = time.time() - started
            ray.kill(ray.get_actor(f"{name}/window_2/1", namespace="onceflow"))
        time.sleep(0.1)
    waiter.join()
    history = CheckpointStorage(storage, name).history()
    shutil.rmtree(storage, ignore_errors=True)
    metrics = outcome["result"].metrics
    rates = events_per_second(samples)
    checkpoints = [h["completed_at"] - started for h in history if "completed_at" in h]
    path = write_json("timeline", {"rate": args.rate, "events": events, "interval_s": args.interval,
                                   "killed_at_s": killed_at, "restarts": metrics["restarts"],
                                   "restored_from": metrics["restored_from"], "checkpoints_at_s": checkpoints,
                                   "rates": rates})
    plot(rates, checkpoints, killed_at, args.rate)
    print(f"killed at {killed_at:.1f} s; restored checkpoint(s) {metrics['restored_from']}; wrote {path}")


def events_per_second(samples: list[tuple[float, int | None]], window_s: float = 0.5) -> list[tuple[float, float]]:
    """Rates over ``window_s`` windows; 0 while restarting. A restart resets the sources' counters."""
    rates: list[tuple[float, float]] = []
    read, start = 0, samples[0][0] if samples else 0.0
    for (_t0, n0), (t1, n1) in itertools.pairwise(samples):
        if n0 is not None and n1 is not None and n1 >= n0:
            read += n1 - n0
        if t1 - start >= window_s:
            rates.append((t1, read / (t1 - start)))
            read, start = 0, t1
    return rates


def plot(rates: list[tuple[float, float]], checkpoints: list[float], killed_at: float | None,
         rate: int) -> None:
    plt = pyplot()

    fig, axis = plt.subplots(figsize=(10, 4))
    axis.plot([t for t, _ in rates], [r / 1e6 for _, r in rates], color="#4c72b0", drawstyle="steps-pre",
              label="events/s read (0.5 s windows)")
    axis.axhline(rate / 1e6, color="#999999", linestyle=":", label="source rate limit")
    for i, t in enumerate(checkpoints):
        axis.axvline(t, color="#55a868", alpha=0.5, linewidth=1, label="checkpoint complete" if i == 0 else None)
    if killed_at is not None:
        axis.axvline(killed_at, color="#c44e52", linewidth=2, label="window subtask killed")
    axis.set_xlabel("seconds")
    axis.set_ylabel("million events/s")
    axis.set_title("feature-window through a killed window subtask: restore the last checkpoint, replay, go on")
    axis.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    save_figure(fig, "timeline")


if __name__ == "__main__":
    main()
