"""A job's lifecycle events in ``<storage>/<job>/events.jsonl`` (in-process executor: the same driver, no Ray)."""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa
import pytest

import onceflow as of
from onceflow.checkpoint.storage import CheckpointStorage
from onceflow.runtime.figures import LastKnown
from onceflow.runtime.metrics import SubtaskCounters
from onceflow.runtime.monitor import Observer
from onceflow.testing.workload import feature_events
from tests.helpers import fails_once_after


def flow_with(name: str, fn: object, total: int = 60_000) -> of.Dataflow:
    flow = of.Dataflow(name)
    events = flow.source(of.sources.GeneratorSource(feature_events, total=total, batch_size=5_000),
                         watermark=of.BoundedOutOfOrderness("event_time"))
    (events.map_batches(fn, name="step").key_by("user_id").window(of.windows.Tumbling(size_ms=10_000))  # type: ignore[arg-type]
     .aggregate(count=of.agg.count()).sink(of.sinks.TestingSink()))
    return flow


def events_of(storage: Path, job: str) -> list[dict[str, object]]:
    return CheckpointStorage(str(storage), job).events()


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_a_restart_and_a_finish_are_recorded_in_order_and_logged(tmp_path: Path) -> None:
    # The local executor's actors set the onceflow logger up in this process (not propagating): listen on it.
    logger = logging.getLogger("onceflow.events")
    collect, level = Collect(), logger.level
    logger.addHandler(collect)
    logger.setLevel(logging.INFO)
    try:
        result = of.run(flow_with("ev-restart", fails_once_after(30_000)), parallelism=2, executor="local",
                        checkpoint=of.CheckpointConfig(interval_s=0.02, storage=str(tmp_path)),
                        restart=of.RestartStrategy.fixed_delay(attempts=2, delay_s=0.0))
    finally:
        logger.removeHandler(collect)
        logger.setLevel(level)
    events = events_of(tmp_path, "ev-restart")
    kinds = [e["event"] for e in events]
    assert kinds[0] == "started" and kinds[-1] == "finished", kinds
    failure = next(e for e in events if e["event"] == "failure")
    assert failure["attempt"] == 1 and failure["retryable"] is True
    assert "the network blinked" in str(failure["cause"]) and "ConnectionError" in str(failure["traceback"])
    assert str(failure["actor"]).startswith("ev-restart/source_0/")  # the step runs chained to the source
    assert "operator 'step'" in str(failure["cause"])
    restart = next(e for e in events if e["event"] == "restart")
    assert restart["attempt"] == 2 and float(restart["recovery_s"]) >= 0  # type: ignore[arg-type]
    assert restart["restored_from"] in result.metrics["restored_from"] + [None]
    finished = events[-1]
    assert finished["events_in"] == result.metrics["events_in"] and finished["restarts"] == 1
    completed = [e["checkpoint_id"] for e in events if e["event"] == "checkpoint_completed"]
    assert completed and result.metrics["latest_checkpoint"] in completed
    assert {e["run"] for e in events} == {events[0]["run"]} and {e["job"] for e in events} == {"ev-restart"}
    logged = collect.messages
    assert any("failure" in m and "the network blinked" in m for m in logged), logged
    assert any(m.startswith("job ev-restart: finished") for m in logged)


def test_a_failed_job_records_why_and_a_second_run_appends(tmp_path: Path) -> None:
    def bad(batch: pa.RecordBatch) -> pa.RecordBatch:
        msg = "the amount column is broken"
        raise of.DataError(msg, operator="step", column="amount")

    for _ in range(2):
        with pytest.raises(of.JobFailedError):
            of.run(flow_with("ev-fail", bad), executor="local", restart=of.RestartStrategy.no_restart(),
                   checkpoint=of.CheckpointConfig(interval_s=0.05, storage=str(tmp_path)))
    events = events_of(tmp_path, "ev-fail")
    runs = list(dict.fromkeys(str(e["run"]) for e in events))
    assert len(runs) == 2, "each run appends its own lines"
    for run in runs:
        kinds = [e["event"] for e in events if e["run"] == run]
        assert kinds[:2] == ["started", "failure"] and kinds[-1] == "failed", kinds
        assert set(kinds[2:-1]) <= {"checkpoint_failed"}, kinds  # a checkpoint in flight when it failed
    failed = events[-1]
    assert "the amount column is broken" in str(failed["cause"]) and failed["restarts"] == 0


def test_a_cancelled_job_records_the_request_and_the_end(tmp_path: Path) -> None:
    flow = of.Dataflow("ev-cancel")
    events = flow.source(of.sources.GeneratorSource(feature_events, total=None, batch_size=1_000,
                                                    max_events_per_s=10_000))
    events.sink(of.sinks.TestingSink())
    handle = of.submit(flow, executor="local", checkpoint=of.CheckpointConfig(interval_s=0.05, storage=str(tmp_path)))
    handle.cancel()
    kinds = [e["event"] for e in events_of(tmp_path, "ev-cancel")]
    assert kinds[0] == "started" and kinds[-1] == "cancelled", kinds
    after = kinds[kinds.index("cancel_requested") + 1:-1]
    assert set(after) <= {"checkpoint_failed"}, kinds  # a checkpoint in flight is aborted by the cancel
    assert handle.view()["status"] == "CANCELLED" and handle.metrics()["status"] == "CANCELLED"


def test_last_known_figures_ignore_a_retired_attempt_reporting_late() -> None:
    now = [0.0]
    known = LastKnown({"src"}, clock=lambda: now[0])

    def figures(out: int, attempt_task: str = "src/0") -> list[SubtaskCounters]:
        return [SubtaskCounters(attempt_task, True, {"src": {"records_in": 0, "records_out": out}},
                                backpressure_s=1.5)]

    known.update(1, figures(100))
    now[0] = 4.0
    known.retire(1)  # fenced: 100 counted once
    known.update(1, figures(120))  # a late answer of the dead attempt
    totals, ages = known.totals()
    assert totals.events_in == 100 and ages == {"src/0": 4.0}
    assert totals.operators["src"]["age_s"] == 4.0 and totals.operators["src"]["backpressure_s"] == 1.5
    known.update(2, figures(30))
    totals, ages = known.totals()
    assert totals.events_in == 130 and ages == {"src/0": 0.0}


def test_a_restart_faster_than_a_sample_is_still_shown_to_watchers_as_restarting(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every restart reaches watchers as a RESTARTING frame with its cause, however fast it is over.

    On the local executor a restart takes milliseconds, far less than the
    observer's 0.5 s sampling period; what the observer publishes is recorded.
    """
    published: list[dict[str, object]] = []
    original = Observer._publish

    def record(self: Observer, view: dict[str, object]) -> None:
        published.append(dict(view))
        original(self, view)

    monkeypatch.setattr(Observer, "_publish", record)
    result = of.run(flow_with("ev-fast-restart", fails_once_after(30_000)), parallelism=2, executor="local",
                    checkpoint=of.CheckpointConfig(interval_s=0.02, storage=str(tmp_path)),
                    restart=of.RestartStrategy.fixed_delay(attempts=2, delay_s=0.0))
    assert result.metrics["restarts"] == 1
    restarting = [v for v in published if v.get("status") == "RESTARTING"]
    assert restarting, [v.get("status") for v in published]
    assert "the network blinked" in str(restarting[0]["cause"]), restarting[0]
    assert restarting[0]["attempt"] == 1 and restarting[0]["phase"] == "fencing", restarting[0]
