"""The in-process executor: the same subtasks, channels, checkpoints and commits, without Ray."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import onceflow as of
from onceflow.testing import failpoints
from onceflow.testing.workload import feature_events
from tests.helpers import assert_feature_reference, fails_once_after, wait_until


def feature_flow(name: str, total: int, sink: of.sinks.TestingSink, *, fail_after: int | None = None) -> of.Dataflow:
    """The feature-window pipeline; with ``fail_after``, a map raises once after that many rows."""
    flaky = fails_once_after(fail_after)
    flow = of.Dataflow(name)
    events = flow.source(of.sources.GeneratorSource(feature_events, total=total, batch_size=5_000),
                         watermark=of.BoundedOutOfOrderness("event_time"))
    (events.map_batches(flaky, name="flaky").key_by("user_id").window(of.windows.Tumbling(size_ms=10_000))
     .aggregate(count=of.agg.count(), total=of.agg.sum("amount")).sink(sink))
    return flow


@pytest.mark.parametrize("parallelism", [1, 3])
def test_the_feature_window_runs_in_process_and_equals_the_reference(parallelism: int) -> None:
    sink = of.sinks.TestingSink()
    result = of.run(feature_flow(f"local-fw-{parallelism}", 100_000, sink), parallelism=parallelism,
                    executor="local")
    assert_feature_reference(sink.table(), 100_000)
    assert result.metrics["events_in"] == 100_000
    assert result.metrics["events_out"] == sink.table().num_rows


def test_with_checkpoints_a_failure_restarts_from_the_newest_checkpoint_and_commits_exactly_once(
        tmp_path: Path) -> None:
    sink = of.sinks.TestingSink()
    flow = feature_flow("local-restart", 200_000, sink, fail_after=120_000)
    result = of.run(flow, parallelism=2, executor="local",
                    checkpoint=of.CheckpointConfig(interval_s=0.02, storage=str(tmp_path)),
                    restart=of.RestartStrategy.fixed_delay(attempts=2, delay_s=0.0))
    assert result.metrics["restarts"] == 1
    assert result.metrics["checkpoints_completed"] >= 1
    assert_feature_reference(sink.table(), 200_000)
    assert sink.pending_ids() == []  # nothing of the failed attempt is left pre-committed


def test_without_checkpoints_a_failure_fails_the_job_naming_the_operator_and_commits_nothing() -> None:
    sink = of.sinks.TestingSink()
    with pytest.raises(of.JobFailedError, match="flaky") as info:
        of.run(feature_flow("local-fail", 50_000, sink, fail_after=20_000), executor="local")
    assert "the network blinked" in str(info.value)
    assert sink.rows() == [] and sink.pending_ids() == []


def test_an_unknown_executor_is_a_plan_error() -> None:
    with pytest.raises(of.PlanError, match="executor must be one of 'ray', 'local'"):
        of.run(of.Dataflow("x"), executor="threads")


def test_a_local_job_never_starts_ray(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import ray
        import onceflow as of
        flow = of.Dataflow("no-ray")
        sink = of.sinks.TestingSink()
        items = [{{"x": i}} for i in range(10)]
        flow.source(of.sources.TestingSource(items)).map(lambda r: {{"y": r["x"] * 2}}).sink(sink)
        of.run(flow, executor="local", checkpoint=of.CheckpointConfig(interval_s=0.01, storage={str(tmp_path)!r}))
        assert sorted(r["y"] for r in sink.rows()) == [i * 2 for i in range(10)], sink.rows()
        assert not ray.is_initialized()
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


MODES = {"aligned": {}, "unaligned": {"mode": "unaligned"}, "timeout": {"aligned_timeout_s": 0.0}}


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("point", ["sink.after_write", "sink.after_pre_commit", "sink.before_commit",
                                   "coordinator.after_manifest"])
def test_a_crash_at_any_point_kills_only_its_actor_and_the_job_commits_exactly_once(tmp_path: Path,
                                                                                      point: str, mode: str) -> None:
    job = f"local-crash-{mode}-{point.replace('.', '-')}"
    sink = of.sinks.TestingSink()
    failpoints.arm(job, point)
    try:
        result = of.run(feature_flow(job, 150_000, sink), parallelism=2, executor="local",
                        checkpoint=of.CheckpointConfig(interval_s=0.02, storage=str(tmp_path), **MODES[mode]),
                        restart=of.RestartStrategy.fixed_delay(attempts=3, delay_s=0.0))
    finally:
        fired = not failpoints.armed(job, point)
        failpoints.disarm(job, point)
    assert fired, f"the job never reached {point}"
    assert result.metrics["restarts"] == 1
    assert_feature_reference(sink.table(), 150_000)
    assert sink.pending_ids() == []


def test_an_unbounded_local_job_is_watched_and_stopped_through_its_handle(tmp_path: Path) -> None:
    sink = of.sinks.TestingSink()
    flow = of.Dataflow("local-unbounded")
    events = flow.source(of.sources.GeneratorSource(feature_events, total=None, batch_size=1_000,
                                                    max_events_per_s=50_000),
                         watermark=of.BoundedOutOfOrderness("event_time"))
    events.key_by("user_id").window(of.windows.Tumbling(size_ms=10_000)).aggregate(count=of.agg.count()).sink(sink)
    handle = of.submit(flow, parallelism=2, executor="local",
                       checkpoint=of.CheckpointConfig(interval_s=0.05, storage=str(tmp_path)))
    try:
        wait_until(lambda: handle.metrics()["events_in"] >= 5_000, timeout_s=60, what="events to flow")
        assert handle.status() is of.JobStatus.RUNNING
        result = handle.stop(timeout_s=60)
    finally:
        handle.cancel()
    assert result.metrics["events_in"] >= 5_000
    assert sum(r["count"] for r in sink.rows()) == result.metrics["events_in"]
    assert sink.pending_ids() == []
