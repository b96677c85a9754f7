"""Scaling: feature-window throughput at parallelism 1..6 on a three-node Ray cluster on this machine.

A three-node Ray cluster is started in this process with
``ray.cluster_utils.Cluster`` (a head and two worker nodes, 2 CPUs each as
far as Ray is told; the subtask actors ask for none), and the driver joins it.
On it the feature-window job (:func:`benchmarks.common.feature_flow`: N
events, key by ``user_id``, tumbling 10 s windows, ``count`` and
``sum(amount)``, into ``TestingSink``; checkpoints every second) runs with
``placement="spread"`` at each parallelism p (p source and p window
subtasks), ``--repeats`` times, the order of p reversed on every other
repeat so that drift on the machine falls on every p alike. One warm-up job
(not counted) runs first. Every run is verified: the committed counts sum
to N.

Throughput is the job's own ``JobResult.metrics["events_per_s"]``, as in
``feature_window.py``: ``events_in / duration_s``, from the moment every actor
is wired to the last commit; actor start-up (``startup_s``) is reported
apart, as is ``processing_s`` (the longest any subtask was busy). Also
recorded: how many distinct Ray nodes the subtasks ran on
(``JobResult.placement``), and the coordinator's node.

All three nodes share this machine's cores, so the figures to read are the
ratios of the medians to p=1's and the spread over the nodes, not the
absolute rates. Writes ``benchmarks/results/scaling.json`` and
``scaling.png``.

    python benchmarks/scaling.py [--parallelism 1 2 3 4 5 6] [--events 2000000] [--repeats 2] [--quick]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
from ray.cluster_utils import Cluster

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import onceflow as of
from benchmarks.common import feature_flow, pyplot, range_bars, save_figure, write_json

NODE = {"num_cpus": 2, "object_store_memory": 256 * 1024 * 1024}
"""Every node of the cluster: 2 CPUs to Ray (the subtask actors ask for none) and a 256 MiB object store."""


def start_cluster() -> tuple[Cluster, dict[str, str]]:
    """A head and two worker nodes, and the driver connected; node id -> ``head``/``worker1``/``worker2``."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cluster = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
    names = {cluster.head_node.node_id: "head"}
    for number in (1, 2):
        names[cluster.add_node(**NODE).node_id] = f"worker{number}"
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="onceflow", logging_level=logging.ERROR, log_to_driver=False)
    return cluster, names


def one_run(events: int, parallelism: int, name: str, nodes: dict[str, str]) -> dict[str, Any]:
    storage = tempfile.mkdtemp(prefix="onceflow-scaling-")
    sink = of.sinks.TestingSink()
    try:
        flow = feature_flow(name, sink, events=events)
        started = time.monotonic()
        result = of.run(flow, parallelism=parallelism, placement="spread",
                        checkpoint=of.CheckpointConfig(interval_s=1.0, storage=storage))
        wall = time.monotonic() - started
        counted = int(sink.table()["count"].to_numpy().sum())
        if counted != events:
            raise SystemExit(f"verification failed at p={parallelism}: counts sum to {counted}, not {events}")
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    m = result.metrics
    subtasks = {task: nodes.get(node, node) for task, node in result.placement.items() if task != "coordinator"}
    return {"parallelism": parallelism, "events_per_s": m["events_per_s"], "duration_s": m["duration_s"],
            "processing_s": m["processing_s"], "startup_s": m["startup_s"], "wall_s": wall,
            "events_in": m["events_in"], "rows_out": m["events_out"],
            "checkpoints_completed": m["checkpoints_completed"], "restarts": m["restarts"],
            "nodes_used": len(set(subtasks.values())),
            "subtasks_per_node": {n: sum(1 for v in subtasks.values() if v == n) for n in sorted(set(nodes.values()))},
            "coordinator_node": nodes.get(result.placement.get("coordinator", ""), "?")}


def summarise(parallelism: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    rates = [r["events_per_s"] for r in runs]
    return {"parallelism": parallelism, "events_per_s_min": min(rates), "events_per_s_median": statistics.median(rates),
            "events_per_s_max": max(rates), "nodes_used": max(r["nodes_used"] for r in runs),
            "startup_s_median": statistics.median(r["startup_s"] for r in runs),
            "processing_s_median": statistics.median(r["processing_s"] for r in runs), "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parallelism", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6])
    parser.add_argument("--events", type=int, default=2_000_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="200,000 events, p = 1, 2, 3, one repeat (a smoke test)")
    args = parser.parse_args()
    events, levels, repeats = ((200_000, [1, 2, 3], 1) if args.quick
                               else (args.events, sorted(set(args.parallelism)), args.repeats))
    cluster, nodes = start_cluster()
    try:
        one_run(min(events, 200_000), max(levels), "scaling-warmup", nodes)  # worker processes, imports, page cache
        by_p: dict[int, list[dict[str, Any]]] = {p: [] for p in levels}
        for repeat in range(repeats):
            for p in levels if repeat % 2 == 0 else reversed(levels):
                run = one_run(events, p, f"scaling-{p}-{repeat}", nodes)
                by_p[p].append(run)
                print(f"repeat {repeat} p={p}: {run['events_per_s']:>12,.0f} events/s on {run['nodes_used']} node(s) "
                      f"(startup {run['startup_s']:.2f} s, duration {run['duration_s']:.2f} s)", flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    results = [summarise(p, by_p[p]) for p in levels]
    base = results[0]["events_per_s_median"]
    for r in results:
        r["ratio_to_p1"] = r["events_per_s_median"] / base  # to the smallest p run, p=1 by default
    path = write_json("scaling", {
        "workload": "feature-window, checkpoint every 1 s, TestingSink, placement='spread'",
        "cluster": {"nodes": 3, "node": NODE, "subtask_num_cpus": 0},
        "events": events, "repeats": repeats, "baseline_parallelism": levels[0],
        "throughput": "JobResult.metrics['events_per_s'] = events_in / duration_s (wired to last commit)",
        "results": results})
    for r in results:
        print(f"p={r['parallelism']}: {r['events_per_s_min']:>12,.0f} .. {r['events_per_s_median']:>12,.0f} .. "
              f"{r['events_per_s_max']:>12,.0f} events/s on {r['nodes_used']} node(s), "
              f"ratio to p={levels[0]} {r['ratio_to_p1']:.2f}")
    plot(results, events)
    print(f"wrote {path}")


def plot(results: list[dict[str, Any]], events: int) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    ps = [r["parallelism"] for r in results]
    base = results[0]["events_per_s_median"]
    ratio = [r["ratio_to_p1"] for r in results]
    low = [m - r["events_per_s_min"] / base for m, r in zip(ratio, results, strict=True)]
    high = [r["events_per_s_max"] / base - m for m, r in zip(ratio, results, strict=True)]
    left.errorbar(ps, ratio, yerr=[low, high], marker="o", capsize=4, color="tab:blue",
                  label="measured (median, min..max)")
    left.plot(ps, [p / ps[0] for p in ps], linestyle="--", color="tab:gray", label="ideal (y = p)")
    left.set_xticks(ps)
    left.set_xlabel("parallelism p")
    left.set_ylabel(f"events/s relative to p={ps[0]} (median)")
    left.set_title("Scaling on a 3-node cluster sharing 2 cores")
    left.legend()
    range_bars(right, [f"p={p}\n{r['nodes_used']} node(s)" for p, r in zip(ps, results, strict=True)],
               [r["events_per_s_median"] for r in results], [r["events_per_s_min"] for r in results],
               [r["events_per_s_max"] for r in results], scale=1e6, color="#4c72b0")
    right.set_ylabel("million events/s (median, min..max)")
    right.set_title(f"feature-window, N={events / 1e6:g}M, checkpoints every 1 s")
    fig.tight_layout()
    save_figure(fig, "scaling")


if __name__ == "__main__":
    main()
