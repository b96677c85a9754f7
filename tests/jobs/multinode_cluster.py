"""Jobs on a real three-node Ray cluster (``ray.cluster_utils.Cluster``: a head and two worker nodes).

Run by ``tests/test_multinode.py`` in a subprocess (the test session has its
own embedded Ray). Each case named on the command line runs on the same
cluster; the script prints one JSON object, case -> what it saw, on its last
line of stdout. Cases:

- ``pack``: a short job with ``placement="pack"``; the nodes its subtasks
  and coordinator ran on (``handle.placement()``).
- ``node_loss``: the feature-window job to a Parquet sink, spread over the
  nodes (the default); once a checkpoint completed, the worker node holding
  the most subtasks is removed; then the job's placement before and after
  the restart, its result, the committed output checked against the
  reference, the actors and the hidden files left.
- ``node_loss_slow``: the same with more events, parallelism 3, and the node
  killed without a graceful shutdown (``ONCEFLOW_SLOW=1``).
- ``coordinator_loss``: every subtask pinned to the head node, so the
  coordinator goes to a worker node, which is removed: the coordinator and
  every object-store copy it owned are lost (``ONCEFLOW_SLOW=1``).

Usage: ``python tests/jobs/multinode_cluster.py WORKSPACE CASE [CASE ...]``
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds
import ray
from ray.cluster_utils import Cluster

import onceflow as of
from onceflow.checkpoint.storage import CheckpointStorage
from onceflow.testing.workload import feature_events

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.helpers import assert_feature_reference, wait_until

NODE = {"num_cpus": 1, "object_store_memory": 80 * 1024 * 1024}
"""Every node: one CPU (the actors ask for none) and a small object store, so three fit on a 2-core machine."""


def feature_flow(name: str, total: int, rate: int | None, out: str) -> of.Dataflow:
    flow = of.Dataflow(name)
    events = flow.source(of.sources.GeneratorSource(feature_events, total=total, batch_size=5_000,
                                                    max_events_per_s=rate),
                         watermark=of.BoundedOutOfOrderness("event_time"))
    (events.key_by("user_id").window(of.windows.Tumbling(size_ms=10_000))
     .aggregate(count=of.agg.count(), total=of.agg.sum("amount")).sink(of.sinks.ParquetSink(out)))
    return flow


def leftovers(job: str) -> list[str]:
    """The named actors of ``job`` still alive."""
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(f"{job}/"))


def hidden_files(directory: Path) -> list[str]:
    """Files under ``directory`` that a reader ignores: uncommitted or temporary output."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                  if p.is_file() and any(part.startswith(("_", ".")) for part in p.relative_to(directory).parts))


def pack_case(workspace: Path, nodes: dict[str, str]) -> dict[str, Any]:
    out = workspace / "pack-out"
    handle = of.submit(feature_flow("mn-pack", 20_000, None, str(out)), parallelism=2, placement="pack",
                       checkpoint=of.CheckpointConfig(interval_s=0.5, storage=str(workspace / "pack-chk")))
    placement = {task: nodes.get(node, node) for task, node in handle.placement().items()}
    handle.wait(timeout_s=120)
    return {"placement": placement, "leftover_actors": leftovers("mn-pack")}


def node_loss_case(workspace: Path, cluster: Cluster, nodes: dict[str, str], *, total: int, rate: int,
                   parallelism: int, name: str, graceful: bool = True,
                   placement: str | dict[str, str] = "spread") -> dict[str, Any]:
    """Remove the worker node with the most subtasks (the coordinator's, when every subtask is pinned to the head)."""
    out = workspace / f"{name}-out"
    storage = str(workspace / f"{name}-chk")
    handle = of.submit(feature_flow(name, total, rate, str(out)), parallelism=parallelism, placement=placement,
                       checkpoint=of.CheckpointConfig(interval_s=0.2, storage=storage),
                       restart=of.RestartStrategy.fixed_delay(attempts=3, delay_s=0.1))
    before = handle.placement()
    store = CheckpointStorage(storage, name)
    wait_until(store.completed_ids, timeout_s=60, what="a first checkpoint")
    workers = {n.node_id: n for n in cluster.worker_nodes}
    load = {node: sum(1 for task, n in before.items() if n == node and task != "coordinator") for node in workers}
    lost = max(load, key=lambda node: (load[node], node == before["coordinator"]))
    removed_at = time.monotonic()
    cluster.remove_node(workers[lost], allow_graceful=graceful)
    result = handle.wait(timeout_s=240)
    after = handle.placement()
    verdict: dict[str, Any] = {
        "before": {task: nodes[node] for task, node in before.items()},
        "lost": nodes[lost],
        "lost_subtasks": load[lost],
        "after": {task: nodes.get(node, node) for task, node in after.items()},
        "restarts": result.metrics["restarts"],
        "restored_from": result.metrics["restored_from"],
        "restored_from_cache": result.metrics["restored_from_cache"],
        "restored_from_storage": result.metrics["restored_from_storage"],
        "recovered_in_s": time.monotonic() - removed_at,
        "leftover_actors": leftovers(name),
        "hidden_files": hidden_files(out),
    }
    try:
        assert_feature_reference(ds.dataset(str(out), format="parquet").to_table(), total)
        verdict["output"] = "exact"
    except AssertionError as error:
        verdict["output"] = str(error)
    return verdict


def main() -> None:
    workspace = Path(sys.argv[1])
    cases = sys.argv[2:]
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cluster = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
    verdict: dict[str, Any] = {}
    try:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
        nodes = {cluster.head_node.node_id: "head"}
        for case in cases:
            while len(cluster.worker_nodes) < 2:  # a node-loss case removed one
                nodes[cluster.add_node(**NODE).node_id] = f"worker{len(nodes)}"
            cluster.wait_for_nodes()
            if not ray.is_initialized():
                ray.init(address=cluster.address, logging_level=logging.ERROR, log_to_driver=False)
            try:
                if case == "pack":
                    verdict[case] = pack_case(workspace, nodes)
                elif case == "node_loss":
                    verdict[case] = node_loss_case(workspace, cluster, nodes, total=200_000, rate=50_000,
                                                   parallelism=2, name="mn-loss")
                elif case == "node_loss_slow":
                    verdict[case] = node_loss_case(workspace, cluster, nodes, total=1_000_000, rate=100_000,
                                                   parallelism=3, name="mn-loss-slow", graceful=False)
                elif case == "coordinator_loss":
                    head = cluster.head_node.node_id
                    verdict[case] = node_loss_case(workspace, cluster, nodes, total=300_000, rate=100_000,
                                                   parallelism=2, name="mn-coordinator-loss",
                                                   placement={"source_0": head, "window_2": head})
                else:
                    verdict[case] = {"error": f"no case {case!r}"}
            except Exception:  # reported in the verdict, which the test asserts on
                verdict[case] = {"error": traceback.format_exc()}
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps(verdict))


if __name__ == "__main__":
    main()
