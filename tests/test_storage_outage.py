"""The checkpoint store goes away for a while: checkpoints fail within tolerable_failures, the job keeps
processing, checkpoints complete again when the store is back, and the output is exact.

The outage is a real filesystem fault, not a mock: the job's checkpoint directory is moved aside and a
plain file put in its place, so every write under it fails with ``ENOTDIR``/``EEXIST`` (permissions would
not do: the tests may run as root).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import onceflow as of
from onceflow.checkpoint.storage import CheckpointStorage
from onceflow.testing.workload import feature_events
from tests.helpers import assert_feature_reference, wait_until

pytestmark = pytest.mark.usefixtures("ray_session")

TOTAL = 100_000


def test_the_checkpoint_store_away_for_three_seconds_costs_checkpoints_not_the_job(tmp_path: Path) -> None:
    job, storage = "storage-outage", str(tmp_path / "chk")
    flow = of.Dataflow(job)
    events = flow.source(of.sources.GeneratorSource(feature_events, total=TOTAL, batch_size=2_000,
                                                    max_events_per_s=10_000),
                         watermark=of.BoundedOutOfOrderness("event_time"))
    sink = of.sinks.TestingSink()
    (events.key_by("user_id").window(of.windows.Tumbling(size_ms=10_000))
     .aggregate(count=of.agg.count(), total=of.agg.sum("amount")).sink(sink))
    handle = of.submit(flow, parallelism=2, checkpoint=of.CheckpointConfig(interval_s=0.2, storage=storage,
                                                                           tolerable_failures=1_000))
    store = CheckpointStorage(storage, job)
    try:
        wait_until(lambda: len(store.completed_ids()) >= 2, timeout_s=60, what="two checkpoints")
        directory, aside = Path(storage) / job, tmp_path / "aside"
        directory.rename(aside)
        directory.write_text("the storage is away")
        away = time.monotonic()
        time.sleep(3.0)  # the outage under test lasts this long, whatever the job does meanwhile
        directory.unlink()
        aside.rename(directory)
        back = max(store.completed_ids())
        assert handle.phase is of.JobPhase.RUNNING, f"the outage ended the run: {handle.phase}"
        wait_until(lambda: max(store.completed_ids()) > back, timeout_s=30, what="a checkpoint after the outage")
        outage_s = time.monotonic() - away
    finally:
        result = handle.wait(timeout_s=120)
    assert outage_s >= 3.0
    assert result.metrics["restarts"] == 0, "the outage restarted the job"
    assert result.metrics["checkpoints_failed"] >= 1, "no checkpoint failed: the store was not away"
    assert_feature_reference(sink.table(), TOTAL)
