"""Watching a job through its failures: a handle's status and metrics never raise, whatever actor died."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import ray

import onceflow as of
from onceflow.checkpoint.storage import CheckpointStorage
from onceflow.runtime.monitor import find_monitor
from onceflow.testing.workload import feature_events
from tests.helpers import wait_until

pytestmark = pytest.mark.usefixtures("ray_session")


def paced_flow(name: str, events_per_s: int = 40_000) -> of.Dataflow:
    flow = of.Dataflow(name)
    events = flow.source(of.sources.GeneratorSource(feature_events, total=None, batch_size=2_000,
                                                    max_events_per_s=events_per_s),
                         watermark=of.BoundedOutOfOrderness("event_time"))
    (events.key_by("user_id").window(of.windows.Tumbling(size_ms=1_000))
     .aggregate(count=of.agg.count()).sink(of.sinks.TestingSink()))
    return flow


class Poller:
    """Calls ``metrics()`` and ``status()`` of a handle in a tight loop, keeping what it saw and every exception."""

    def __init__(self, handle: of.JobHandle) -> None:
        self.handle = handle
        self.seen: list[dict[str, Any]] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.handle.status()
                self.seen.append(self.handle.metrics(timeout_s=0.5))
            except BaseException as error:
                self.errors.append(error)
                time.sleep(0.01)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def kill(name: str) -> None:
    ray.kill(ray.get_actor(name, namespace="onceflow"), no_restart=True)


def test_metrics_and_status_never_raise_through_kills_of_every_kind_of_actor(tmp_path: Path) -> None:
    handle = of.submit(paced_flow("watched"), parallelism=2,
                       checkpoint=of.CheckpointConfig(interval_s=0.2, storage=str(tmp_path / "cp")),
                       restart=of.RestartStrategy.fixed_delay(attempts=10, delay_s=0.2))
    poller = Poller(handle)
    try:
        victims = ["watched/source_0/1", "watched/window_2/0", "watched/coordinator"]
        before = 0
        for number, victim in enumerate(victims, start=1):
            wait_until(lambda: handle.status() is of.JobStatus.RUNNING, timeout_s=60, what="the job to run")
            # The view is sampled twice a second; once it shows a checkpoint, the event log has it.
            wait_until(lambda b=before: (handle.view()["checkpoints"]["latest"] or 0) > b, timeout_s=60,
                       what=f"attempt {number} to complete a checkpoint")
            seen_before = len(poller.seen)
            before = handle.view()["checkpoints"]["latest"]
            kill(victim)
            wait_until(lambda n=number: handle.attempt > n, timeout_s=60, what=f"the restart after {victim}")
            wait_until(lambda: len(poller.seen) > seen_before + 20, timeout_s=30, what="the poller to go on")
        wait_until(lambda: handle.status() is of.JobStatus.RUNNING, timeout_s=60, what="the job to run again")
        # The monitor only watches: killing it restarts nothing, and the driver starts another.
        monitor = wait_until(lambda: find_monitor("watched"), timeout_s=30, what="the job's monitor")
        kill("watched/monitor")
        wait_until(lambda: (m := find_monitor("watched")) is not None and m._actor_id != monitor._actor_id,
                   timeout_s=30, what="a new monitor")
        assert handle.attempt == len(victims) + 1 and handle.status() is of.JobStatus.RUNNING
        result = handle.stop(timeout_s=120)
    finally:
        poller.close()
        handle.cancel()
    assert not poller.errors, f"{len(poller.errors)} calls raised, first: {poller.errors[0]!r}"
    assert result.metrics["restarts"] == len(victims)
    restarting = [m for m in poller.seen if m["status"] == "RESTARTING"]
    assert restarting, "the poller never saw the job restarting"
    for m in restarting:
        assert m["cause"], m
        assert m["events_in"] > 0, "a restarting job reports its last known figures, not zeros"
    causes = {m["cause"] for m in restarting}
    for victim in victims:
        assert any(victim in cause for cause in causes), (victim, causes)
    counts = [m["checkpoints_completed"] for m in poller.seen if "checkpoints_completed" in m]
    assert counts == sorted(counts), "checkpoints_completed went back (the coordinator was replaced)"
    assert result.metrics["checkpoints_completed"] >= max(counts)
    ages = [m["age_s"] for m in restarting]
    assert max(ages) > 0, "figures from dead actors are reported with their age"
    assert all(m["status"] in {"RUNNING", "RESTARTING", "FINISHED"} for m in poller.seen)

    view = handle.view()
    assert view["status"] == "FINISHED" and view["ended"]
    assert [r["actor"] for r in view["restarts"]] == victims
    assert [r["attempt"] for r in view["restarts"]] == [2, 3, 4]
    for restart in view["restarts"]:
        assert restart["recovery_s"] > 0 and restart["cause"] == f"actor {restart['actor']!r} died"
    assert view["restarts"][0]["node"], "a subtask's failure names its node"

    events = CheckpointStorage(str(tmp_path / "cp"), "watched").events()
    kinds = [e["event"] for e in events]
    assert kinds[0] == "started" and kinds[-1] == "stopped" and "stop_requested" in kinds, kinds
    in_time = [e["event"] for e in sorted(events, key=lambda e: e["at"])]
    after_stop = in_time[in_time.index("stop_requested") + 1:]
    assert after_stop[-1] == "stopped" and set(after_stop[:-1]) == {"checkpoint_completed"}, in_time  # the final one
    failures = [e for e in events if e["event"] == "failure"]
    assert [e["actor"] for e in failures] == victims
    assert all(e["traceback"] and e["cause"] for e in failures)
    restarts = [e for e in events if e["event"] == "restart"]
    assert [e["attempt"] for e in restarts] == [2, 3, 4]
    assert all(e["restored_from"] is not None for e in restarts)
    completed = [e["checkpoint_id"] for e in events if e["event"] == "checkpoint_completed"]
    assert len(completed) >= 3 and completed == sorted(completed), completed
    assert {e["run"] for e in events} == {handle.run_id}
