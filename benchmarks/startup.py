"""Start-up: from ``of.submit`` to the job running and to its first record, on a running Ray.

A parallelism-2 feature-window job with checkpoints (4 subtask actors and a
coordinator) is submitted ``--runs`` times, one after another, to the same
embedded Ray (started once, before the first run, and not counted; its
workers preload onceflow, as an embedded Ray that ``of.run`` starts does).
Each run is made twice:

- **cold**: no worker process is left idle for it (``of.prestart`` is not
  called and the jobs keep no spare, ``spare_workers=0``): every actor
  starts a new process, as on a Ray whose idle workers are used up;
- **prestarted**: ``of.prestart(6)`` first, so every actor takes a worker
  process that is already running with onceflow imported
  (see :mod:`onceflow.runtime.warm`).

For each run:

- **deployed**: ``submit`` returning (``JobResult.metrics["startup_s"]``):
  sinks resolved, actors created, restored, wired, sources started;
- **first record**: the earliest ``first_record_at`` of a source subtask,
  from the moment ``submit`` was called.

Writes ``benchmarks/results/startup.json`` and ``startup.png`` (median and
range). The issue's target is 0.5 s to the first record.

    python benchmarks/startup.py [--runs 8] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ray

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import onceflow as of
from benchmarks.common import feature_flow, pyplot, range_bars, save_figure, start_ray, write_json

MODES = ("cold", "prestarted")
WARM_WORKERS = 6
"""Idle workers ``prestarted`` asks for: the job's five actors and one to spare."""


def one_run(number: int, mode: str) -> dict[str, float]:
    if mode == "prestarted":
        warm = of.prestart(WARM_WORKERS)
        if min(warm.values(), default=0) < WARM_WORKERS:
            msg = f"of.prestart({WARM_WORKERS}) left {warm} idle workers"
            raise RuntimeError(msg)
    flow = feature_flow(f"startup-{mode}-{number}", of.sinks.TestingSink(), events=200_000, batch_size=50_000)
    storage = tempfile.mkdtemp(prefix="onceflow-startup-")
    started = time.time()
    handle = of.submit(flow, parallelism=2, checkpoint=of.CheckpointConfig(interval_s=1.0, storage=storage),
                       spare_workers=0)
    deployed = time.time()
    sources = [ray.get_actor(name, namespace="onceflow") for name in handle.actor_names if "/source" in name]
    firsts: list[float] = []
    while len(firsts) < len(sources) and time.time() - started < 120:
        firsts = [m.first_record_at for m in ray.get([s.metrics.remote() for s in sources])
                  if m.first_record_at is not None]
        time.sleep(0.005)
    handle.wait(120)
    return {"deployed_s": deployed - started, "first_record_s": min(firsts) - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="3 runs")
    args = parser.parse_args()
    runs = 3 if args.quick else args.runs
    start_ray()
    one_run(-1, "cold")  # warm-up: the first job of a fresh Ray takes the workers Ray started with it
    # All cold runs first: a prestarted run leaves a worker idle (six for five actors).
    results = {mode: [one_run(i, mode) for i in range(runs)] for mode in MODES}
    figures = {mode: {key: {"median_s": statistics.median(r[key] for r in results[mode]),
                            "min_s": min(r[key] for r in results[mode]),
                            "max_s": max(r[key] for r in results[mode])}
                      for key in ("deployed_s", "first_record_s")} for mode in MODES}
    path = write_json("startup", {"runs": results, "figures": figures, "parallelism": 2, "actors": 5,
                                  "prestarted_workers": WARM_WORKERS})
    for mode in MODES:
        for key, f in figures[mode].items():
            print(f"{mode:>10} {key:>15}: median {f['median_s']:.2f} s [{f['min_s']:.2f} .. {f['max_s']:.2f}] "
                  f"over {runs} runs")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    names = [f"{mode}\n{key.removesuffix('_s').replace('_', ' ')}" for mode in MODES for key in figures[mode]]
    cells = [figures[mode][key] for mode in MODES for key in figures[mode]]
    range_bars(ax, names, [c["median_s"] for c in cells], [c["min_s"] for c in cells], [c["max_s"] for c in cells])
    ax.axhline(0.5, color="tab:red", linestyle="--", label="target: 0.5 s")
    ax.set_ylabel("seconds from of.submit (median, min..max)")
    ax.set_title("Start-up of a parallelism-2 job on a running Ray")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, "startup")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
