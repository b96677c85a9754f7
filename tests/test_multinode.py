"""Placement over a cluster's nodes, and a job that loses a node: the decision (sans-IO) and a real three-node Ray.

The cluster tests run ``tests/jobs/multinode_cluster.py`` in a subprocess:
it starts a head and two worker nodes with ``ray.cluster_utils.Cluster``
(the test session has its own embedded Ray), runs the cases and prints a
JSON verdict that the tests assert on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import onceflow as of
from onceflow.errors import PlanError
from onceflow.runtime.placement import decide_placement, describe_placement, room_on, silent_nodes

ROOT = Path(__file__).resolve().parent.parent

TASKS = [(("src",), "src/0"), (("src",), "src/1"), (("win", "agg", "sink"), "win/0"),
         (("win", "agg", "sink"), "win/1")]


def load(placement: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in placement.values():
        counts[node] = counts.get(node, 0) + 1
    return counts


def test_spread_balances_the_nodes_and_fills_the_drivers_node_last() -> None:
    decision = decide_placement("spread", TASKS, nodes=["c", "a", "b"], driver="b")
    assert decision.subtasks == {"src/0": "a", "src/1": "c", "win/0": "b", "win/1": "a"}
    assert decision.coordinator == "b"  # one subtask, as few as "c"; the driver's node first among equals
    assert sorted(load(decision.subtasks).values()) == [1, 1, 2]


def test_each_operator_is_spread_over_the_nodes() -> None:
    tasks = [((name,), f"{name}/{i}") for name in ("src", "win") for i in range(3)]
    decision = decide_placement("spread", tasks, nodes=["a", "b", "c"], driver="a")
    for name in ("src", "win"):
        assert {decision.subtasks[f"{name}/{i}"] for i in range(3)} == {"a", "b", "c"}


def test_the_coordinator_goes_where_no_subtask_is_when_there_is_such_a_node() -> None:
    decision = decide_placement("spread", TASKS[:2], nodes=["a", "b", "c"], driver="a")
    assert decision.coordinator == "a" and decision.load("a") == 0
    pack = decide_placement("pack", TASKS, nodes=["a", "b", "c"], driver="b")
    assert set(pack.subtasks.values()) == {"a"} and pack.coordinator == "b"
    alone = decide_placement("pack", TASKS, nodes=["a"], driver="a")
    assert set(alone.subtasks.values()) == {"a"} and alone.coordinator == "a"


def test_a_surviving_coordinator_stays_and_its_node_is_filled_last() -> None:
    decision = decide_placement("spread", TASKS[:2], nodes=["a", "b", "c"], driver="a", coordinator="c")
    assert decision.coordinator == "c" and decision.load("c") == 0
    gone = decide_placement("spread", TASKS[:2], nodes=["a", "b"], driver="a", coordinator="c")
    assert gone.coordinator == "a" and set(gone.subtasks.values()) <= {"a", "b"}


def test_pins_go_round_robin_over_their_nodes_and_a_pin_to_a_lost_node_falls_back() -> None:
    decision = decide_placement({"agg": ["b", "c"]}, TASKS, nodes=["a", "b", "c"], driver="a")
    assert (decision.subtasks["win/0"], decision.subtasks["win/1"]) == ("b", "c")
    assert not decision.warnings
    lost = decide_placement({"src": "z"}, TASKS, nodes=["a", "b"], driver="a")
    assert set(lost.subtasks.values()) <= {"a", "b"}
    assert len(lost.warnings) == 2 and "src/0 is pinned to node z, which is not alive" in lost.warnings[0]


def test_a_node_is_silent_only_when_none_of_its_subtasks_answered() -> None:
    placement = {"src/0": "a", "src/1": "b", "win/0": "b", "win/1": "c"}
    assert silent_nodes(placement, {"src/0", "src/1", "win/1"}) == set()  # one killed actor: b still answers
    assert silent_nodes(placement, {"src/0", "win/1"}) == {"b"}  # b lost every actor: a lost node
    assert silent_nodes({"src/0": ""}, set()) == set()  # the local executor has no nodes


def test_nodes_without_room_for_the_actors_resources_are_skipped() -> None:
    totals = {"head": {"CPU": 0.0}, "a": {"CPU": 1.0}, "b": {"CPU": 2.0}}
    room = {node: room_on(resources, {"CPU": 1.0}) for node, resources in totals.items()}
    spread = decide_placement("spread", TASKS, nodes=list(totals), driver="head", room=room)
    assert sorted(spread.subtasks.values()) == ["", "a", "b", "b"]  # the fourth fits nowhere: Ray places it
    assert spread.coordinator == ""  # no room left anywhere
    pack = decide_placement("pack", TASKS[:3], nodes=list(totals), driver="head", room=room)
    assert sorted(pack.subtasks.values()) == ["a", "b", "b"] and pack.load("head") == 0
    free = decide_placement("spread", TASKS, nodes=list(totals), driver="head",
                            room={node: room_on(resources, {}) for node, resources in totals.items()})
    assert free.load("head") == 1 and free.coordinator == "head"  # no demand: every node, any number


def test_without_nodes_nothing_is_decided() -> None:
    decision = decide_placement("spread", TASKS, nodes=[], driver="")
    assert decision.subtasks == {} and decision.coordinator == ""


def test_describe_placement_lists_each_nodes_actors() -> None:
    text = describe_placement({"coordinator": "n1", "a/0": "n2", "a/1": "n2"})
    assert text.splitlines() == ["node n2: a/0, a/1", "node n1: coordinator"]


def small_flow(name: str) -> of.Dataflow:
    flow = of.Dataflow(name)
    (flow.source(of.sources.TestingSource([{"x": i} for i in range(20)]), name="events")
     .map_batches(lambda batch: batch, name="same").sink(of.sinks.TestingSink(), name="out"))
    return flow


def test_a_pin_that_names_no_operator_is_refused_before_anything_starts() -> None:
    with pytest.raises(PlanError, match=r"placement pins operator\(s\) 'nope', which the dataflow does not have"):
        of.submit(small_flow("mn-pins"), placement={"nope": "some-node"}, executor="local")


def test_the_local_executor_reports_every_actor_in_its_placement(tmp_path: Path) -> None:
    handle = of.submit(small_flow("mn-local"), parallelism=2, executor="local",
                       checkpoint=of.CheckpointConfig(interval_s=0.1, storage=str(tmp_path)))
    placement = handle.placement()
    assert handle.wait(timeout_s=60).placement == placement
    assert set(placement) == {name.split("/", 1)[1] for name in handle.actor_names} | {"coordinator"}


def run_cluster(tmp_path: Path, *cases: str, timeout_s: float) -> dict[str, Any]:
    """Run ``cases`` on a fresh three-node cluster; return the script's verdict (the last line it printed)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, str(ROOT / "tests/jobs/multinode_cluster.py"), str(tmp_path), *cases],
                          capture_output=True, text=True, timeout=timeout_s, env=env, check=False)
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0 and lines, f"rc {done.returncode}\n{done.stderr[-6000:]}"
    verdict: dict[str, Any] = json.loads(lines[-1])
    for case in cases:
        assert "error" not in verdict[case], verdict[case]["error"]
    return verdict


def assert_survived_the_node_loss(seen: dict[str, Any]) -> None:
    before, after, lost = seen["before"], seen["after"], seen["lost"]
    subtasks = {task: node for task, node in before.items() if task != "coordinator"}
    assert set(subtasks.values()) == {"head", "worker1", "worker2"}, before  # spread over the three nodes
    per_node = load(subtasks)
    assert per_node[before["coordinator"]] == min(per_node.values()), before
    assert seen["lost_subtasks"] >= 1 and lost != before["coordinator"], seen
    assert set(after) == set(before) and lost not in after.values(), after  # all placed on the nodes left
    # One restart: the attempt after the loss is placed only on nodes that answered, never on the lost one.
    assert seen["restarts"] == 1 and seen["restored_from"], seen
    # The lost node's snapshot copies are gone: at least those states come from the checkpoint files.
    assert seen["restored_from_storage"] >= seen["lost_subtasks"], seen
    assert seen["output"] == "exact", seen["output"]
    assert seen["leftover_actors"] == [] and seen["hidden_files"] == [], seen


def test_a_job_spreads_packs_and_survives_a_lost_node_on_a_three_node_cluster(tmp_path: Path) -> None:
    verdict = run_cluster(tmp_path, "pack", "node_loss", timeout_s=400)
    pack = verdict["pack"]["placement"]
    packed = {node for task, node in pack.items() if task != "coordinator"}
    assert len(packed) == 1 and pack["coordinator"] not in packed, pack
    assert verdict["pack"]["leftover_actors"] == []
    assert_survived_the_node_loss(verdict["node_loss"])


@pytest.mark.slow
def test_a_larger_job_at_parallelism_three_survives_a_lost_node(tmp_path: Path) -> None:
    verdict = run_cluster(tmp_path, "node_loss_slow", timeout_s=600)
    assert_survived_the_node_loss(verdict["node_loss_slow"])


@pytest.mark.slow
def test_a_job_whose_coordinators_node_is_lost_restores_from_the_checkpoint_files(tmp_path: Path) -> None:
    seen = run_cluster(tmp_path, "coordinator_loss", timeout_s=600)["coordinator_loss"]
    before, after = seen["before"], seen["after"]
    assert {node for task, node in before.items() if task != "coordinator"} == {"head"}, before
    assert before["coordinator"] != "head" and seen["lost"] == before["coordinator"], seen
    assert seen["lost_subtasks"] == 0 and after["coordinator"] != seen["lost"], after
    assert seen["restarts"] == 1 and seen["restored_from"], seen
    # Every object-store copy died with its owner: the whole restore reads the checkpoint files.
    assert seen["restored_from_cache"] == 0 and seen["restored_from_storage"] >= 1, seen
    assert seen["output"] == "exact", seen["output"]
    assert seen["leftover_actors"] == [] and seen["hidden_files"] == [], seen
