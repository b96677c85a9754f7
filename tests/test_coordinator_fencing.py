"""The coordinator actor fences attempts: a zombie subtask's acknowledgement never completes a checkpoint."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import ray

from onceflow.checkpoint.config import CheckpointConfig
from onceflow.checkpoint.coordinator import TaskAck
from onceflow.checkpoint.lease import JobLease
from onceflow.checkpoint.storage import CheckpointStorage
from onceflow.errors import CheckpointError, PlanError
from onceflow.runtime.checkpointing import CoordinatorActor
from tests.helpers import wait_until

pytestmark = pytest.mark.usefixtures("ray_session")


@ray.remote(num_cpus=0)
class _Source:
    """Stands in for a source subtask: remembers which checkpoints were triggered."""

    def __init__(self) -> None:
        self.triggered: list[int] = []

    def trigger_checkpoint(self, checkpoint_id: int, triggered_at: float, attempt: int | None = None) -> None:
        self.triggered.append(checkpoint_id)

    def notify_checkpoint_complete(self, checkpoint_id: int, attempt: int | None = None) -> None:
        pass

    def abort_checkpoint(self, checkpoint_id: int, attempt: int | None = None) -> None:
        pass

    def triggers(self) -> list[int]:
        return list(self.triggered)


def test_acknowledgements_of_a_fenced_attempt_never_complete_a_checkpoint(tmp_path: Path) -> None:
    storage = str(tmp_path / "chk")
    config = CheckpointConfig(interval_s=0.05, timeout_s=60, storage=storage)
    coordinator = ray.remote(CoordinatorActor).options(num_cpus=0).remote("fencing", config, ["v/0"], run="r1")
    source = _Source.remote()
    try:
        ray.get(coordinator.start.remote(1, [source], [source]))
        first = wait_until(lambda: ray.get(source.triggers.remote()), what="a trigger")[0]
        assert ray.get(coordinator.fence.remote()) is None  # nothing completed; checkpoint `first` aborted
        ray.get(coordinator.start.remote(2, [source], [source]))
        second = wait_until(lambda: [i for i in ray.get(source.triggers.remote()) if i > first],
                            what="a trigger of attempt 2")[0]
        # A subtask of attempt 1 that is still alive (a zombie) acknowledges the new checkpoint: ignored.
        ray.get(coordinator.acknowledge.remote(second, TaskAck("v/0", attempt=1)))
        ray.get(coordinator.acknowledge.remote(first, TaskAck("v/0", attempt=1)))
        assert ray.get(coordinator.latest_checkpoint.remote()) is None
        assert CheckpointStorage(storage, "fencing").completed_ids() == []
        # The live attempt's acknowledgement completes it.
        ray.get(coordinator.acknowledge.remote(second, TaskAck("v/0", attempt=2)))
        wait_until(lambda: ray.get(coordinator.latest_checkpoint.remote()) == second, what="the checkpoint")
        manifest = CheckpointStorage(storage, "fencing").manifest(second)
        assert manifest is not None and manifest["run"] == "r1"
        assert ray.get(coordinator.fence.remote()) == second
    finally:
        ray.kill(coordinator)
        ray.kill(source)


def test_a_new_coordinator_restores_only_its_own_runs_checkpoints(tmp_path: Path) -> None:
    """After a coordinator is replaced, its successor of the same run finds the run's checkpoints, not others'."""
    storage = str(tmp_path / "chk")
    config = CheckpointConfig(interval_s=0.05, timeout_s=60, storage=storage)
    store = CheckpointStorage(storage, "runs")
    store.write_manifest({"checkpoint_id": 4, "job": "runs", "run": "earlier", "tasks": {}})
    fresh = ray.remote(CoordinatorActor).options(num_cpus=0).remote("runs", config, ["v/0"], run="fresh")
    resumed = ray.remote(CoordinatorActor).options(num_cpus=0).remote("runs", config, ["v/0"], run="again",
                                                                      baseline=4)
    try:
        assert ray.get(fresh.latest_checkpoint.remote()) is None
        assert ray.get(resumed.latest_checkpoint.remote()) == 4
    finally:
        ray.kill(fresh)
        ray.kill(resumed)


def test_a_coordinator_whose_storage_another_run_took_over_completes_nothing(tmp_path: Path) -> None:
    """A zombie coordinator (its driver gone, its cluster still running) after a resume elsewhere took over."""
    storage = str(tmp_path / "chk")
    config = CheckpointConfig(interval_s=0.05, timeout_s=60, storage=storage, lease_s=2.0)
    store = CheckpointStorage(storage, "zombie")
    coordinator = ray.remote(CoordinatorActor).options(num_cpus=0).remote("zombie", config, ["v/0"], run="old")
    source = _Source.remote()
    try:
        ray.get(coordinator.start.remote(1, [source], [source]))
        first = wait_until(lambda: ray.get(source.triggers.remote()), what="a trigger")[0]
        held = wait_until(store.read_lease, what="the zombie's lease")
        assert held.run == "old"
        # A new run (another driver, another cluster) takes the storage over.
        store.write_lease(JobLease("new", held.epoch + 1, time.time()))
        ray.get(coordinator.acknowledge.remote(first, TaskAck("v/0", attempt=1)))
        with pytest.raises(ray.exceptions.RayTaskError, match="took over the checkpoint storage") as info:
            ray.get(coordinator.watch.remote(1), timeout=30)
        assert isinstance(info.value.cause, CheckpointError) and info.value.cause.reason == "lease lost"
        assert store.completed_ids() == []  # the zombie's fully acknowledged checkpoint never completed
        assert store.read_lease() is not None and store.read_lease().run == "new"  # and it never renewed over it
    finally:
        ray.kill(coordinator)
        ray.kill(source)


def test_a_run_waits_while_another_live_run_holds_the_storage_and_takes_it_once_lapsed(tmp_path: Path) -> None:
    import onceflow as of
    from onceflow.testing.workload import feature_events

    storage = str(tmp_path / "chk")
    store = CheckpointStorage(storage, "held")
    holding = threading.Event()
    holding.set()

    def renew() -> None:  # a live run elsewhere, renewing its lease
        while holding.is_set():
            store.write_lease(JobLease("elsewhere", 1, time.time()))
            time.sleep(0.05)

    renewer = threading.Thread(target=renew, daemon=True)
    renewer.start()

    def flow() -> of.Dataflow:
        flow = of.Dataflow("held")
        flow.source(of.sources.GeneratorSource(feature_events, total=10_000, batch_size=5_000)).sink(
            of.sinks.TestingSink())
        return flow

    # The renewer lives in this process: a lease of 2 s outlasts its pauses while the driver starts Ray under
    # load (with 0.5 s a paused renewer let the run take the lease, and then lose it, under CI load).
    config = CheckpointConfig(interval_s=0.1, storage=storage, lease_s=2.0)
    try:
        with pytest.raises(PlanError, match="holds its checkpoint storage"):
            of.run(flow(), checkpoint=config)
    finally:
        holding.clear()
        renewer.join()
    result = of.run(flow(), checkpoint=config)  # the other run stopped renewing: its lease lapses
    assert result.metrics["events_in"] == 10_000
    assert store.read_lease() is None  # released at the end


def test_a_final_checkpoint_call_of_a_fenced_attempt_never_takes_the_next_attempts_checkpoint(
        tmp_path: Path) -> None:
    """Attempt 1 asks for its final checkpoint while a periodic one is pending, then is fenced.

    Its waiting call must end with it: it may not trigger a checkpoint for
    attempt 2 (and pause the coordinator), or attempt 2's own final
    checkpoint never comes.
    """
    storage = str(tmp_path / "chk")
    config = CheckpointConfig(interval_s=0.05, timeout_s=600, storage=storage)
    coordinator = ray.remote(CoordinatorActor).options(num_cpus=0).remote("final", config, ["v/0"], run="r")
    source = _Source.remote()
    try:
        ray.get(coordinator.start.remote(1, [source], [source]))
        wait_until(lambda: ray.get(source.triggers.remote()), what="a periodic checkpoint")  # pending, never acked
        stale = coordinator.final_checkpoint.remote(1)
        assert not ray.wait([stale], timeout=0.3)[0]  # waits for the pending one
        ray.get(coordinator.fence.remote())
        with pytest.raises(ray.exceptions.RayTaskError):
            ray.get(stale, timeout=30)  # ends with its attempt
        seen = set(ray.get(source.triggers.remote()))
        ray.get(coordinator.start.remote(2, [source], [source]))
        final = coordinator.final_checkpoint.remote(2)

        def acknowledged_all() -> bool:
            for checkpoint_id in set(ray.get(source.triggers.remote())) - seen:
                ray.get(coordinator.acknowledge.remote(checkpoint_id, TaskAck("v/0", attempt=2)))
                seen.add(checkpoint_id)
            return bool(ray.wait([final], timeout=0.05)[0])

        wait_until(acknowledged_all, timeout_s=30, what="attempt 2's final checkpoint")
        assert ray.get(final) == ray.get(coordinator.latest_checkpoint.remote())
    finally:
        ray.kill(coordinator)
        ray.kill(source)
