"""Failures that land outside the running phase: start-up, recovery, manifest writes, stop, cancel, later runs.

Each test makes a failure (or a user request) land in one phase of the job's
lifecycle and checks the exact committed output and what is left behind.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pytest
import ray

import onceflow as of
from onceflow.checkpoint.storage import CheckpointStorage
from onceflow.checkpoint.two_phase_commit import CommittableRecord
from onceflow.testing import failpoints
from onceflow.testing.workload import feature_events
from tests.helpers import actor_id, assert_feature_reference, feature_flow, wait_until

pytestmark = pytest.mark.usefixtures("ray_session")


def kill(name: str) -> bool:
    try:
        ray.kill(ray.get_actor(name, namespace="onceflow"), no_restart=True)
    except ValueError:
        return False
    return True


def job_actors(job: str) -> set[str]:
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "onceflow" and a["name"].startswith(f"{job}/")}


def hidden_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(("_", "."))) if directory.exists() else []


def parquet_rows(directory: Path) -> pa.Table:
    return ds.dataset(directory, format="parquet").to_table()


def in_background(target: Any) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            target()
        except BaseException as error:  # reported by the test
            errors.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


def run_killing_at_start(name: str, flow: of.Dataflow, checkpoint: of.CheckpointConfig) -> of.JobResult:
    """Run ``flow`` at parallelism 2, killing actor ``name`` as soon as it exists; assert it restarted."""

    def killer() -> None:
        wait_until(lambda: kill(name), timeout_s=60, what=f"{name} to exist")

    thread, errors = in_background(killer)
    result = of.run(flow, parallelism=2, checkpoint=checkpoint,
                    restart=of.RestartStrategy.fixed_delay(attempts=3, delay_s=0.05))
    thread.join(timeout=10)
    assert not errors, errors
    assert result.metrics["restarts"] >= 1
    return result


@pytest.mark.parametrize("target", ["window/0", "window/1", "source_0/1"])
def test_an_actor_killed_while_the_first_attempt_starts_is_one_failure(tmp_path: Path, target: str) -> None:
    """A kill as soon as the actor exists (before it is wired or restored) restarts the job."""
    job, total = f"start-kill-{target.replace('/', '-')}", 60_000
    sink = of.sinks.TestingSink()
    run_killing_at_start(f"{job}/{target}", feature_flow(job, total, sink),
                         of.CheckpointConfig(interval_s=0.2, storage=str(tmp_path / "chk")))
    assert_feature_reference(sink.table(), total)
    wait_until(lambda: not job_actors(job), timeout_s=30, what="no actor of the job left")


def test_an_actor_killed_while_a_restarted_attempt_starts_is_one_more_failure(tmp_path: Path) -> None:
    """The first kill starts a recovery; a second lands on the new attempt's actor as soon as it exists."""
    job, total = "restart-kill", 150_000
    name = f"{job}/window/1"

    def killer() -> None:
        storage = CheckpointStorage(str(tmp_path / "chk"), job)
        wait_until(lambda: storage.completed_ids(), timeout_s=60, what="a checkpoint")
        first = actor_id(name)
        assert kill(name)
        wait_until(lambda: actor_id(name) not in (None, first), timeout_s=60, what="the restarted actor")
        assert kill(name)

    thread, errors = in_background(killer)
    sink = of.sinks.TestingSink()
    result = of.run(feature_flow(job, total, sink, rate=100_000), parallelism=2,
                    checkpoint=of.CheckpointConfig(interval_s=0.2, storage=str(tmp_path / "chk")),
                    restart=of.RestartStrategy.fixed_delay(attempts=4, delay_s=0.05))
    thread.join(timeout=10)
    assert not errors, errors
    assert result.metrics["restarts"] >= 2
    assert_feature_reference(sink.table(), total)


def test_a_checkpoint_completing_during_recovery_is_restored_never_aborted(tmp_path: Path) -> None:
    """Checkpoint n is acknowledged and its manifest write is held; a subtask dies; then n's manifest lands.

    Recovery must not restore n-1 and abort n's pending files: a later restore
    (here: a second kill right after n landed) would then commit files that no
    longer exist.
    """
    job, total, out = "complete-during-recovery", 300_000, tmp_path / "out"
    storage = str(tmp_path / "chk")
    point = "coordinator.before_manifest"
    failpoints.disarm_all()
    failpoints.arm_pause(job, point)
    try:
        handle = of.submit(feature_flow(job, total, of.sinks.ParquetSink(str(out)), rate=60_000), parallelism=2,
                           checkpoint=of.CheckpointConfig(interval_s=0.3, storage=storage),
                           restart=of.RestartStrategy.fixed_delay(attempts=4, delay_s=0.05))
        held = int(wait_until(lambda: failpoints.paused(job, point), timeout_s=60, what="a held manifest write"))
        window = f"{job}/window/0"
        first = actor_id(window)
        assert kill(window)
        wait_until(lambda: actor_id(window) not in (None, first) or str(getattr(handle, "phase", "")) ==
                   "JobPhase.FENCING", timeout_s=60, what="recovery to begin")
        failpoints.release(job, point)
        wait_until(lambda: CheckpointStorage(storage, job).manifest(held) is not None, timeout_s=60,
                   what=f"checkpoint {held}'s manifest")
        wait_until(lambda: actor_id(window) not in (None, first) and handle.status() is of.JobStatus.RUNNING,
                   timeout_s=60, what="the restarted attempt to run")
        assert kill(window)  # the next restore: checkpoint `held` or newer
        result = handle.wait(timeout_s=300)
    finally:
        failpoints.disarm_all()
    assert held in result.metrics["restored_from"]
    assert_feature_reference(parquet_rows(out), total)
    assert hidden_files(out) == []


def test_a_fresh_run_never_restores_an_earlier_runs_checkpoint(tmp_path: Path) -> None:
    """A second run of the same job and storage fails before its own first checkpoint: it starts from 0."""
    job, storage = "fresh-run", str(tmp_path / "chk")
    first = of.sinks.TestingSink()
    of.run(feature_flow(job, 40_000, first), parallelism=2,
           checkpoint=of.CheckpointConfig(interval_s=0.1, storage=storage))
    assert CheckpointStorage(storage, job).completed_ids()

    total = 60_000
    second = of.sinks.TestingSink()
    handle = of.submit(feature_flow(job, total, second, rate=30_000), parallelism=2,
                       checkpoint=of.CheckpointConfig(interval_s=60.0, storage=storage),
                       restart=of.RestartStrategy.fixed_delay(attempts=3, delay_s=0.05))
    # Running, with some input read, and no checkpoint of this run yet: a failure now must restart from 0.
    wait_until(lambda: handle.metrics()["events_in"] > 0, timeout_s=60, what="input to flow")
    assert kill(f"{job}/window/0")
    result = handle.wait(timeout_s=300)
    assert result.metrics["restarts"] == 1
    assert result.metrics["restored_from"] == []
    assert_feature_reference(second.table(), total)


class _StallOnce:
    """A batch transform that stalls the first time it runs in a job (a flag file), so one checkpoint expires."""

    def __init__(self, flag: str) -> None:
        self.flag = flag

    def __call__(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        path = Path(self.flag)
        if not path.exists():
            path.touch()
            import time

            time.sleep(3.0)  # the stall under test: three times the checkpoint timeout
        return batch


def test_an_expired_checkpoint_does_not_fail_every_restart(tmp_path: Path) -> None:
    """One expired checkpoint fails the attempt (no failure tolerated); the restarts then finish the job.

    The restart count is at least one, not exactly one: under load another
    checkpoint may take longer than the timeout too, which is the same failure
    handled the same way (the bug this guards against failed every restart).
    """
    job, total = "expired-once", 80_000
    sink = of.sinks.TestingSink()
    result = of.run(feature_flow(job, total, sink, rate=100_000, transform=_StallOnce(str(tmp_path / "stalled"))),
                    parallelism=1,
                    checkpoint=of.CheckpointConfig(interval_s=0.1, timeout_s=1.0, storage=str(tmp_path / "chk")),
                    restart=of.RestartStrategy.fixed_delay(attempts=5, delay_s=0.05))
    assert result.metrics["restarts"] >= 1
    assert_feature_reference(sink.table(), total)


def test_stop_during_a_restart_ends_the_job(tmp_path: Path) -> None:
    """stop() while the job restarts: the restarted sources end their input and the job drains and commits."""
    job = "stop-restart"
    sink = of.sinks.TestingSink()
    handle = of.submit(feature_flow(job, None, sink, rate=50_000), parallelism=2,
                       checkpoint=of.CheckpointConfig(interval_s=0.2, storage=str(tmp_path / "chk")),
                       restart=of.RestartStrategy.fixed_delay(attempts=3, delay_s=1.0))
    try:
        wait_until(lambda: CheckpointStorage(str(tmp_path / "chk"), job).completed_ids(), what="a checkpoint")
        # Rows read before the kill: the restarted sources read none (stop() ends their input at once).
        wait_until(lambda: handle.metrics()["events_in"] > 0, timeout_s=60, what="input to flow")
        assert kill(f"{job}/window/0")
        wait_until(lambda: handle.status() is of.JobStatus.RESTARTING, timeout_s=30, what="the restart")
        result = handle.stop(timeout_s=120)
    finally:
        handle.cancel()
    assert result.metrics["restarts"] == 1
    events = result.metrics["operators"]["source_0"]["records_out"]
    assert events > 0
    assert sum(r["count"] for r in sink.rows()) > 0
    wait_until(lambda: not job_actors(job), timeout_s=30, what="no actor of the job left")


def test_cancel_while_a_restarted_attempt_deploys_leaves_no_actor_and_the_job_can_run_again(
        tmp_path: Path) -> None:
    """cancel() lands while the new attempt's actors are being created: none of them may outlive the job."""
    job = "cancel-restart"
    handle = of.submit(feature_flow(job, None, of.sinks.TestingSink(), rate=50_000), parallelism=2,
                       checkpoint=of.CheckpointConfig(interval_s=0.2, storage=str(tmp_path / "chk")),
                       restart=of.RestartStrategy.fixed_delay(attempts=3, delay_s=0.0))
    wait_until(lambda: CheckpointStorage(str(tmp_path / "chk"), job).completed_ids(), what="a checkpoint")
    killed = actor_id(f"{job}/window/1")
    assert kill(f"{job}/window/1")
    # The killed actor is the one the restart must create anew (the others are reset in place):
    # once it exists, the new attempt is being deployed.
    wait_until(lambda: actor_id(f"{job}/window/1") not in (None, killed), timeout_s=60,
               what="the restarted attempt's new actor")
    handle.cancel()
    assert handle.status() is of.JobStatus.CANCELLED
    wait_until(lambda: not job_actors(job), timeout_s=30, what="no actor of the job left")
    sink = of.sinks.TestingSink()
    of.run(feature_flow(job, 20_000, sink), parallelism=2)
    assert_feature_reference(sink.table(), 20_000)


def _release_when(job: str, point: str, handle_or_done: Any) -> tuple[threading.Thread, list[BaseException]]:
    """Release the held manifest write once the job is fencing (it waits for it) or it already ended."""

    def release() -> None:
        wait_until(lambda: handle_or_done(), timeout_s=120, what="the job to fence or end")
        failpoints.release(job, point)

    return in_background(release)


def test_cancel_while_a_manifest_is_written_commits_what_completed_and_leaves_nothing_pending(
        tmp_path: Path) -> None:
    """Checkpoint n is pre-committed (pending files exist) and its manifest write is held when cancel() lands.

    The cancel must settle n first: n completes, its files are committed, and
    nothing hidden is left; no window row is committed twice.
    """
    job, out, storage = "cancel-ends", tmp_path / "out", str(tmp_path / "chk")
    point = "coordinator.before_manifest"
    failpoints.disarm_all()
    try:
        handle = of.submit(feature_flow(job, None, of.sinks.ParquetSink(str(out)), rate=50_000), parallelism=2,
                           checkpoint=of.CheckpointConfig(interval_s=0.2, storage=storage))
        # Hold a checkpoint taken after windows fired, so the one cancel() settles has rows to commit.
        wait_until(lambda: out.exists() and parquet_rows(out).num_rows > 0, timeout_s=60, what="committed rows")
        failpoints.arm_pause(job, point)
        wait_until(lambda: failpoints.paused(job, point), timeout_s=60, what="a held manifest write")
        cancelled = threading.Event()
        thread, errors = _release_when(job, point, lambda: cancelled.is_set() or str(
            getattr(handle, "phase", "")) in ("JobPhase.FENCING", "JobPhase.ENDING", "JobPhase.CANCELLED"))
        canceller, cancel_errors = in_background(lambda: (handle.cancel(), cancelled.set()))
        canceller.join(timeout=120)
        thread.join(timeout=10)
    finally:
        failpoints.disarm_all()
    assert not errors and not cancel_errors, (errors, cancel_errors)
    assert hidden_files(out) == []
    assert not job_actors(job)
    committed = parquet_rows(out)
    keys = committed.group_by(["user_id", "window_start"]).aggregate([("count", "count")])
    assert pa.compute.max(keys["count_count"]).as_py() == 1, "a window row was committed twice"


def test_a_failed_job_keeps_only_its_newest_checkpoints_transactions_and_resume_commits_them(tmp_path: Path) -> None:
    """Bad input fails the job while checkpoint n's manifest write is held (n's pending files exist).

    The failed job settles n, keeps exactly the transactions of its newest
    completed checkpoint (pending files, which a resume commits) and removes
    every other file; a resume with the input fixed commits the exact output.
    """
    job, out, storage, total = "fail-ends", tmp_path / "out", str(tmp_path / "chk"), 100_000
    point = "coordinator.before_manifest"
    stop_at = 60_000

    def poisoned(offset: int, n: int) -> pa.RecordBatch:
        batch = feature_events(offset, n)
        if offset < stop_at or Path(tmp_path / "fixed").exists():
            return batch
        return batch.set_column(2, "event_time", pa.array([None] * n, pa.int64()))

    def flow() -> of.Dataflow:
        flow = of.Dataflow(job)
        events = flow.source(of.sources.GeneratorSource(poisoned, total=total, batch_size=5_000,
                                                        max_events_per_s=50_000),
                             watermark=of.BoundedOutOfOrderness("event_time"))
        (events.key_by("user_id").window(of.windows.Tumbling(size_ms=10_000))
         .aggregate(count=of.agg.count(), total=of.agg.sum("amount"), name="window")
         .sink(of.sinks.ParquetSink(str(out)), name="sink"))
        return flow

    config = of.CheckpointConfig(interval_s=0.1, storage=storage)
    failpoints.disarm_all()
    failpoints.arm_pause(job, point)
    ended = threading.Event()
    try:
        handle = of.submit(flow(), parallelism=2, checkpoint=config)
        thread, errors = _release_when(job, point, lambda: ended.is_set() or str(
            getattr(handle, "phase", "")) in ("JobPhase.FENCING", "JobPhase.ENDING", "JobPhase.FAILED"))
        with pytest.raises(of.JobFailedError, match="null"):
            try:
                handle.wait(timeout_s=120)
            finally:
                ended.set()
        thread.join(timeout=10)
    finally:
        failpoints.disarm_all()
    assert not errors, errors
    wait_until(lambda: not job_actors(job), timeout_s=30, what="no actor of the job left")
    newest = CheckpointStorage(storage, job).latest_manifest()
    assert newest is not None
    left = hidden_files(out)
    # What is left is exactly what the newest checkpoint recorded as pre-committed and not yet committed.
    recorded = {Path(c.fields["pending"]).name for c in _sink_committables(storage, job)}
    assert set(left) <= recorded, f"left behind beyond the newest checkpoint: {set(left) - recorded}"
    (tmp_path / "fixed").touch()
    of.run(flow(), parallelism=2, checkpoint=config, resume=True)
    assert_feature_reference(parquet_rows(out), total)
    assert hidden_files(out) == []


def _sink_committables(storage: str, job: str) -> list[CommittableRecord]:
    from onceflow.checkpoint.state import read_sink_state

    store = CheckpointStorage(storage, job)
    manifest = store.latest_manifest()
    assert manifest is not None
    found = []
    for entry in manifest["tasks"].values():
        for operator, state in entry["states"].items():
            if operator == "sink":
                found += [c for items in read_sink_state(store.read_state(state["path"])).values() for c in items]
    return found
