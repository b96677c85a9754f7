"""Start-up: from ``of.submit`` to the job running and to its first record, on a running Ray.

A parallelism-2 feature-window job with checkpoints (4 subtask actors and a
coordinator) is submitted ``--runs`` times, one after another, to the same
embedded Ray (started once, before the first run, and not counted). For each run:

- **deployed**: ``submit`` returning (``JobResult.metrics["startup_s"]``):
  sinks resolved, actors created, restored, wired, sources started;
- **first record**: the earliest ``first_record_at`` of a source subtask,
  from the moment ``submit`` was called.

Writes ``benchmarks/results/startup.json`` and ``startup.png`` (median and
range). The issue's target is 0.5 s to the first record; this measures where
the job stands.

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


def one_run(number: int) -> dict[str, float]:
    flow = feature_flow(f"startup-{number}", of.sinks.TestingSink(), events=200_000, batch_size=50_000)
    storage = tempfile.mkdtemp(prefix="onceflow-startup-")
    started = time.time()
    handle = of.submit(flow, parallelism=2, checkpoint=of.CheckpointConfig(interval_s=1.0, storage=storage))
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
    one_run(-1)  # warm-up: the first job of a fresh Ray also pays for its worker pool
    results = [one_run(i) for i in range(runs)]
    figures = {key: {"median_s": statistics.median(r[key] for r in results), "min_s": min(r[key] for r in results),
                     "max_s": max(r[key] for r in results)} for key in ("deployed_s", "first_record_s")}
    path = write_json("startup", {"runs": results, "figures": figures, "parallelism": 2, "actors": 5})
    for key, f in figures.items():
        print(f"{key:>15}: median {f['median_s']:.2f} s [{f['min_s']:.2f} .. {f['max_s']:.2f}] over {runs} runs")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = list(figures)
    range_bars(ax, names, [figures[n]["median_s"] for n in names], [figures[n]["min_s"] for n in names],
               [figures[n]["max_s"] for n in names])
    ax.axhline(0.5, color="tab:red", linestyle="--", label="target: 0.5 s")
    ax.set_ylabel("seconds from of.submit (median, min..max)")
    ax.set_title("Start-up of a parallelism-2 job on a running Ray")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, "startup")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
