"""Warm worker processes (:mod:`onceflow.runtime.warm`): prestarted, onceflow preloaded, taken by actors.

A subtask actor that takes a warm worker starts in about 0.3 s instead of
0.75 s (a new process); these tests check the mechanism itself, on the
session's Ray: what ``of.prestart`` leaves, that such a worker has onceflow
imported before any actor runs in it, and that a subtask replaced after a
kill starts in one of the idle workers the job kept, with the output exact.
The timings are measured by ``benchmarks/startup.py`` and ``recovery.py``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray

import onceflow as of
from onceflow.errors import PlanError
from onceflow.runtime import warm
from tests.helpers import assert_feature_reference, feature_flow, wait_until


def _probe_class() -> type:
    """A class defined here, so Ray ships it by value: creating it imports nothing of onceflow."""

    class Probe:
        def __init__(self) -> None:
            import os  # by value: imported here, not from module globals
            import sys

            self.seen = ("onceflow.runtime.subtask_actor" in sys.modules, os.getpid())

        def seen_at_start(self) -> tuple[bool, int]:
            return self.seen

    return Probe


@pytest.mark.usefixtures("ray_session")
def test_prestart_leaves_ready_workers_that_have_onceflow_imported() -> None:
    node = ray.get_runtime_context().get_node_id()
    counts = of.prestart(3, keep_alive_s=60)
    assert counts.get(node, 0) >= 3, counts
    idle = set(warm.idle_workers(node))
    assert len(idle) >= 3, idle
    probe = ray.remote(num_cpus=0)(_probe_class()).remote()
    try:
        preloaded, pid = ray.get(probe.seen_at_start.remote(), timeout=60)
    finally:
        ray.kill(probe)
    assert pid in idle, f"the actor started a new process {pid}, not one of the idle workers {sorted(idle)}"
    assert preloaded, "onceflow was not imported in the worker before the actor started"


@pytest.mark.usefixtures("ray_session")
def test_a_replaced_subtask_starts_in_a_worker_the_job_kept_warm(tmp_path: Path) -> None:
    """The job keeps ``spare_workers`` idle workers (from 5 s on); the actor replacing a killed one takes one."""
    node = ray.get_runtime_context().get_node_id()
    sink = of.sinks.TestingSink()
    handle = of.submit(feature_flow("warm-spare", 150_000, sink, rate=10_000), parallelism=2,
                       checkpoint=of.CheckpointConfig(interval_s=0.2, storage=str(tmp_path / "chk")),
                       restart=of.RestartStrategy.fixed_delay(attempts=2, delay_s=0.0), spare_workers=4)
    wait_until(lambda: handle.view().get("checkpoints", {}).get("completed"), what="a completed checkpoint")
    idle = wait_until(lambda: (pids := warm.idle_workers(node)) and len(pids) >= 4 and pids,
                      timeout_s=60, what="the job's 4 spare workers")
    victim = next(n for n in handle.actor_names if "/window" in n)
    ray.kill(ray.get_actor(victim, namespace="onceflow"), no_restart=True)
    wait_until(lambda: handle.attempt == 2 and handle.status() is of.JobStatus.RUNNING, what="attempt 2 running")
    replacement = ray.get_actor(victim, namespace="onceflow")
    pid = ray.get(replacement.__ray_call__.remote(lambda _actor: __import__("os").getpid()), timeout=60)
    result = handle.wait(120)
    assert pid in idle, f"the replacement started a new process {pid}, not one of the spares {sorted(idle)}"
    assert result.metrics["restarts"] == 1
    assert handle.view()["restarts"][-1]["replaced"] == 1
    assert_feature_reference(sink.table(), 150_000)


def test_spare_workers_is_a_count() -> None:
    with pytest.raises(PlanError, match="spare_workers"):
        of.JobOptions(spare_workers=-1)


@pytest.mark.usefixtures("ray_session")
def test_an_unreachable_raylet_costs_only_a_log_line(caplog: pytest.LogCaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Prestarting is an optimisation: a raylet that does not answer leaves actors to start new processes."""
    node = ray.get_runtime_context().get_node_id()
    # A real, closed port: the raylet's calls fail as they would against another Ray version's raylet.
    monkeypatch.setattr(warm, "_raylets", lambda nodes: {n: warm._Raylet("127.0.0.1:9") for n in nodes})
    workers = warm.WarmWorkers()
    with caplog.at_level(logging.INFO, logger="onceflow"):
        assert workers.ensure({node: 2}, keep_alive_s=5, timeout_s=5) == {}
        assert workers.ensure({node: 2}, keep_alive_s=5, timeout_s=5) == {}
    warnings = [r for r in caplog.records if "could not prestart" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]


@pytest.mark.slow  # its own Ray in a subprocess: 15 s
def test_a_job_with_a_runtime_environment_gets_workers_started_with_it() -> None:
    """Under ``ray job submit --working-dir`` a job has a runtime environment: spares must be started with it."""
    script = Path(__file__).parent / "jobs" / "warm_runtime_env.py"
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180, check=False,
                          env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["counts"] == [2], seen
    assert seen["pid"] in seen["idle"], f"the actor started a new process, not a prestarted one: {seen}"
