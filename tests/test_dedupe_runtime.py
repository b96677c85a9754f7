"""Dedupe end to end on real Ray: resent ids through a killed dedupe subtask, committed exactly once.

The source resends every id: row ``3i`` carries id ``i``, row ``3i + 1`` id
``i - 100`` and row ``3i + 2`` id ``i - 2000`` (ids below those offsets are
repeated at once instead), so each id arrives 2 to 5 times, up to 6,000 ms of
event time apart. A dedupe subtask actor is killed once a checkpoint has
completed; the job restores from it and replays, and the committed output must
hold every id exactly once.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import ray

import onceflow as of
from onceflow.checkpoint.storage import CheckpointStorage

pytestmark = pytest.mark.usefixtures("ray_session")

ROWS = 240_000
IDS = ROWS // 3


def resent_events(offset: int, n: int) -> pa.RecordBatch:
    rows = np.arange(offset, offset + n, dtype=np.int64)
    original, copy = rows // 3, rows % 3
    lag = np.where(copy == 1, 100, np.where(copy == 2, 2_000, 0))
    ids = np.where(original >= lag, original - lag, original)
    return pa.record_batch({"id": ids, "event_time": rows, "copy": copy})


def completed(storage: str, job: str) -> int:
    ids = CheckpointStorage(storage, job).completed_ids()
    return ids[-1] if ids else 0


def run_killing_a_dedupe_subtask(tmp_path: Path, job: str, **dedupe: Any) -> tuple[list[int], of.JobResult]:
    storage = str(tmp_path / "chk")
    sink = of.sinks.TestingSink()
    flow = of.Dataflow(job)
    events = flow.source(of.sources.GeneratorSource(resent_events, total=ROWS, batch_size=4_000,
                                                    max_events_per_s=80_000),
                         watermark=of.BoundedOutOfOrderness("event_time"))
    events.dedupe("id", within_ms=30_000, name="dedupe", **dedupe).sink(sink)
    handle = of.submit(flow, parallelism=2, checkpoint=of.CheckpointConfig(interval_s=0.5, storage=storage),
                       restart=of.RestartStrategy.fixed_delay(attempts=3, delay_s=0.1))
    errors: list[BaseException] = []

    def killer() -> None:
        # Kill once the sources read rows past the newest completed checkpoint (at least its second), so
        # that the restart replays them: a restart fences the survivors at once, so the sources read
        # nothing more after the kill itself.
        try:
            deadline = time.monotonic() + 60
            while True:
                if time.monotonic() > deadline:
                    raise AssertionError("no checkpoint completed with rows read after it")
                newest = completed(storage, job)
                if newest < 2:
                    time.sleep(0.02)
                    continue
                seen = handle.metrics()["events_in"]
                while handle.metrics()["events_in"] < seen + 8_000 and time.monotonic() < deadline:
                    time.sleep(0.01)
                if completed(storage, job) == newest:
                    break
            ray.kill(ray.get_actor(f"{job}/dedupe/1", namespace="onceflow"))
        except BaseException as error:  # reported by the test
            errors.append(error)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    result = handle.wait(timeout_s=120)
    thread.join(timeout=10)
    assert not errors, errors
    assert result.metrics["restarts"] == 1
    assert result.metrics["restored_from"], "the restart did not restore a checkpoint"
    assert result.metrics["events_in"] > ROWS, "nothing was replayed: the kill came too late"
    return sink.table().column("id").to_pylist(), result


def test_exact_mode_commits_every_id_once_through_a_killed_subtask(tmp_path: Path) -> None:
    committed, result = run_killing_a_dedupe_subtask(tmp_path, "dedupe-exact", mode="exact")
    assert len(committed) == IDS and sorted(committed) == list(range(IDS))
    counters = result.metrics["operators"]["dedupe"]
    assert counters["items_seen"] == ROWS  # restored counters plus the replay: every row once
    assert counters["duplicates_dropped"] == ROWS - IDS


def test_bloom_mode_never_passes_a_repeat_through_a_killed_subtask(tmp_path: Path) -> None:
    committed, result = run_killing_a_dedupe_subtask(tmp_path, "dedupe-bloom", mode="bloom",
                                                     expected_items=1_000_000, fp_rate=0.001)
    assert len(committed) == len(set(committed)), "a repeated id passed"
    assert set(committed) <= set(range(IDS))
    counters = result.metrics["operators"]["dedupe"]
    assert counters["items_seen"] == ROWS
    # A unique id goes missing only if every copy of it was a false positive. With filters sized for
    # 1,000,000 ids per 30 s and 80,000 ids in 240 s, the estimated fp rate is below 1e-12: none expected.
    false_positives = IDS - len(committed)
    assert counters["duplicates_dropped"] == ROWS - IDS + false_positives
    assert false_positives == 0
