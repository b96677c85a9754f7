"""A damaged checkpoint never restores: resume=True falls back only when that commits nothing twice, else it says so.

Each test cancels a windowed job after a few checkpoints, damages the
newest checkpoint's window state on disk as a bad block would (bytes zeroed
in the middle, the size unchanged: Arrow itself reads such a file without
complaint), and resumes.
"""

from __future__ import annotations

import collections
import logging
from pathlib import Path

import pyarrow as pa
import pytest

import onceflow as of
from onceflow.checkpoint.storage import CheckpointStorage
from tests.helpers import wait_until

pytestmark = pytest.mark.usefixtures("ray_session")

TOTAL, KEYS = 8_000, 4


def timed_rows(offset: int, n: int) -> pa.RecordBatch:
    ids = list(range(offset, offset + n))
    return pa.record_batch({"k": [i % KEYS for i in ids], "t": ids})


def window_flow(job: str, sink: of.sinks.TestingSink, window_ms: int) -> of.Dataflow:
    flow = of.Dataflow(job)
    events = flow.source(of.sources.GeneratorSource(timed_rows, total=TOTAL, batch_size=100, max_events_per_s=2_000),
                         watermark=of.BoundedOutOfOrderness("t"), name="events")
    (events.key_by("k").window(of.windows.Tumbling(size_ms=window_ms))
     .aggregate(n=of.agg.count(), name="counts").sink(sink, name="out"))
    return flow


def reference(window_ms: int) -> collections.Counter[tuple[int, int, int]]:
    return collections.Counter((i % KEYS, i // window_ms * window_ms, 1) for i in range(TOTAL))


def counted(sink: of.sinks.TestingSink, window_ms: int) -> collections.Counter[tuple[int, int, int]]:
    """The committed windows, expanded back into one (key, window, 1) per counted row."""
    found: collections.Counter[tuple[int, int, int]] = collections.Counter()
    for row in sink.rows():
        found[(row["k"], row["window_start"], 1)] += row["n"]
    return found


def cancelled_after_checkpoints(job: str, storage: str, sink: of.sinks.TestingSink, window_ms: int) -> list[int]:
    """Run the job until three checkpoints completed, cancel it; return the completed ids."""
    store = CheckpointStorage(storage, job)
    handle = of.submit(window_flow(job, sink, window_ms), parallelism=2,
                       checkpoint=of.CheckpointConfig(interval_s=0.2, storage=storage))
    try:
        wait_until(lambda: len(store.completed_ids()) >= 3, timeout_s=60, what="three checkpoints")
    finally:
        handle.cancel()
    return store.completed_ids()


def damage_window_state(storage: str, job: str, checkpoint_id: int) -> str:
    """Zero 64 bytes in the middle of one window subtask's state file of ``checkpoint_id``; return its path."""
    manifest = CheckpointStorage(storage, job).manifest(checkpoint_id)
    assert manifest is not None
    task = next(t for t in sorted(manifest["tasks"]) if t.startswith("counts/"))
    path = max((s["path"] for s in manifest["tasks"][task]["states"].values()), key=lambda p: Path(p).stat().st_size)
    content = bytearray(Path(path).read_bytes())
    middle = len(content) // 2
    content[middle:middle + 64] = bytes(64)
    Path(path).write_bytes(bytes(content))
    return path


def test_a_damaged_newest_checkpoint_falls_back_when_it_committed_nothing(tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    # One window over the whole input: nothing reaches the sink before the end, so no checkpoint records a
    # transaction and the older checkpoint replays nothing that was committed.
    job, storage, window_ms = "integrity-fallback", str(tmp_path / "chk"), 10**9
    sink = of.sinks.TestingSink()
    ids = cancelled_after_checkpoints(job, storage, sink, window_ms)
    assert sink.rows() == []
    path = damage_window_state(storage, job, ids[-1])
    with caplog.at_level(logging.WARNING, logger="onceflow"):
        result = of.run(window_flow(job, sink, window_ms), parallelism=2, resume=True, timeout_s=120,
                        checkpoint=of.CheckpointConfig(interval_s=0.2, storage=storage))
    assert result.metrics["restored_from"][0] == ids[-2], "the damaged checkpoint was restored"
    assert any(path in r.getMessage() and "do not verify" in r.getMessage() for r in caplog.records)
    assert counted(sink, window_ms) == reference(window_ms)


def test_a_damaged_newest_checkpoint_is_refused_when_falling_back_would_commit_twice(tmp_path: Path) -> None:
    job, storage, window_ms = "integrity-refused", str(tmp_path / "chk"), 100
    sink = of.sinks.TestingSink()
    ids = cancelled_after_checkpoints(job, storage, sink, window_ms)
    committed = len(sink.rows())
    assert committed, "no window was committed before the cancel: the case is not the one named"
    path = damage_window_state(storage, job, ids[-1])
    flow = window_flow(job, sink, window_ms)
    config = of.CheckpointConfig(interval_s=0.2, storage=storage)
    with pytest.raises(of.CheckpointError, match="would commit their rows again") as caught:
        of.submit(flow, parallelism=2, resume=True, checkpoint=config)
    assert path in str(caught.value) and f"Checkpoint {ids[-2]} verifies" in str(caught.value)
    assert len(sink.rows()) == committed, "the refused resume committed something"
    # The way out the message gives: move the damaged checkpoint aside, accepting rows committed twice.
    directory = CheckpointStorage(storage, job).checkpoint_path(ids[-1])
    Path(directory).rename(tmp_path / "aside")
    result = of.run(flow, parallelism=2, resume=True, checkpoint=config, timeout_s=120)
    assert result.metrics["restored_from"][0] == ids[-2]


def test_a_resume_where_no_checkpoint_verifies_fails_naming_the_files(tmp_path: Path) -> None:
    job, storage, window_ms = "integrity-none", str(tmp_path / "chk"), 10**9
    sink = of.sinks.TestingSink()
    ids = cancelled_after_checkpoints(job, storage, sink, window_ms)
    paths = [damage_window_state(storage, job, c) for c in ids]
    with pytest.raises(of.CheckpointError, match="no checkpoint .* verifies") as caught:
        of.submit(window_flow(job, sink, window_ms), parallelism=2, resume=True,
                  checkpoint=of.CheckpointConfig(interval_s=0.2, storage=storage))
    assert all(p in str(caught.value) for p in paths)


def test_an_object_store_copy_that_differs_from_its_file_is_not_restored(tmp_path: Path) -> None:
    import ray

    from onceflow.runtime.deployment import RestoredState, SubtaskRestore, load_restored

    storage = CheckpointStorage(str(tmp_path), "integrity-cache")
    table = pa.table({"k": list(range(100)), "n": [1] * 100})
    handle = storage.write_state(1, "counts/0", "keyed", table)
    altered = table.set_column(1, "n", pa.array([2] * 100))
    for cached, expected in ((table, table), (altered, table)):
        restore = SubtaskRestore(1, {"keyed": [RestoredState(handle.path, ray.put(cached), handle)]})
        assert load_restored(restore, storage)["keyed"][0].equals(expected)
