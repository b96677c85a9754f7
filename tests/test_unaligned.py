"""Unaligned checkpoints on real Ray: in-flight batches are recorded, and a restore replays them exactly once."""

from __future__ import annotations

import collections
import time
from pathlib import Path

import pytest

import onceflow as of
from onceflow.checkpoint.storage import CheckpointStorage
from onceflow.testing.workload import feature_events
from tests.helpers import wait_until

pytestmark = pytest.mark.usefixtures("ray_session")

TOTAL = 150_000


def running_count(state: int | None, row: dict) -> tuple[int, dict]:
    """Row by row, far slower than the source: batches queue up in front of it (backpressure)."""
    time.sleep(100e-6)
    seen = (state or 0) + 1
    return seen, {"user_id": row["user_id"], "seen": seen}


def counting_flow(name: str, sink: of.sinks.TestingSink, *, total: int | None = TOTAL) -> of.Dataflow:
    flow = of.Dataflow(name)
    events = flow.source(of.sources.GeneratorSource(feature_events, total=total, batch_size=2_000,
                                                    max_events_per_s=20_000), name="events")
    events.key_by("user_id").process(running_count, name="count").sink(sink, name="out")
    return flow


def expected_rows() -> collections.Counter[tuple[int, int]]:
    users = collections.Counter(feature_events(0, TOTAL).column("user_id").to_pylist())
    return collections.Counter((user, seen) for user, n in users.items() for seen in range(1, n + 1))


@pytest.mark.parametrize(("before", "after"), [(2, 2), (2, 3)])
def test_a_resume_from_an_unaligned_checkpoint_replays_its_in_flight_batches_exactly_once(
        tmp_path: Path, before: int, after: int) -> None:
    storage = str(tmp_path / "checkpoints")
    job = f"unaligned-resume-{before}-{after}"
    sink = of.sinks.TestingSink()
    config = of.CheckpointConfig(interval_s=0.1, storage=storage, mode="unaligned")
    store = CheckpointStorage(storage, job)

    def newest_holds_channel_state() -> bool:
        history = store.history()
        return bool(history) and history[-1]["channel_state_bytes"] > 0

    # The counting operator is slower than the sources: batches queue in front of it, and every
    # unaligned checkpoint records some. The first run reads without end (it cannot finish first, with a
    # final checkpoint that holds nothing in flight); cancel it once such a checkpoint is complete.
    handle = of.submit(counting_flow(job, sink, total=None), parallelism=before, checkpoint=config)
    try:
        wait_until(newest_holds_channel_state, timeout_s=120, what="an unaligned checkpoint with channel state")
    finally:
        handle.cancel()
    newest = store.completed_ids()[-1]
    recorded = next(h for h in store.history() if h["checkpoint_id"] == newest)
    assert recorded["unaligned"] and recorded["channel_state_bytes"] > 0, recorded
    result = of.run(counting_flow(job, sink), parallelism=after, checkpoint=config, resume=True)
    assert result.metrics["restored_from"] == [newest]
    committed = collections.Counter((r["user_id"], r["seen"]) for r in sink.rows())
    assert committed == expected_rows()
    assert sink.pending_ids() == []


def test_a_stop_while_unaligned_checkpoints_record_commits_every_event_read_exactly_once(tmp_path: Path) -> None:
    """``stop()`` under backpressure, with checkpoints recording in-flight batches: each user's counts 1..n, once."""
    storage = str(tmp_path / "checkpoints")
    job = "unaligned-stop"
    sink = of.sinks.TestingSink()
    store = CheckpointStorage(storage, job)
    handle = of.submit(counting_flow(job, sink, total=None), parallelism=2,
                       checkpoint=of.CheckpointConfig(interval_s=0.1, storage=storage, mode="unaligned"))
    try:
        wait_until(lambda: any(h["channel_state_bytes"] > 0 for h in store.history()), timeout_s=120,
                   what="an unaligned checkpoint with channel state")
        result = handle.stop(timeout_s=180)
    finally:
        if handle.status() is of.JobStatus.RUNNING:
            handle.cancel()
    per_user: dict[int, list[int]] = collections.defaultdict(list)
    for row in sink.rows():
        per_user[row["user_id"]].append(row["seen"])
    assert all(sorted(seen) == list(range(1, len(seen) + 1)) for seen in per_user.values())
    assert sum(len(seen) for seen in per_user.values()) == result.metrics["events_in"] > 0
    assert sink.pending_ids() == []
