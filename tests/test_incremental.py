"""Incremental checkpoints: only new state pieces are written, shared pieces live exactly as long as a checkpoint
names them, and restores (after failures, from savepoints) are exact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import onceflow as of
from onceflow.checkpoint.savepoint import read_savepoint
from onceflow.checkpoint.storage import SHARED_DIR, CheckpointStorage, state_handles
from onceflow.testing.workload import feature_events, feature_window_reference
from tests.helpers import assert_feature_reference, fails_once_after, wait_until


def feature_flow(name: str, total: int, sink: of.sinks.TestingSink, *, window_ms: int = 10_000,
                 fail_after: int | None = None, rate: int | None = None) -> of.Dataflow:
    flow = of.Dataflow(name)
    events = flow.source(of.sources.GeneratorSource(feature_events, total=total, batch_size=2_000,
                                                    max_events_per_s=rate),
                         watermark=of.BoundedOutOfOrderness("event_time"))
    (events.map_batches(fails_once_after(fail_after), name="flaky").key_by("user_id")
     .window(of.windows.Tumbling(size_ms=window_ms))
     .aggregate(count=of.agg.count(), total=of.agg.sum("amount"), name="features").sink(sink))
    return flow


def named_files(storage: CheckpointStorage) -> set[str]:
    return {h.path for c in storage.completed_ids() for entry in storage.manifest(c)["tasks"].values()  # type: ignore[index]
            for state in entry["states"].values() for h in state_handles(state)}


def assert_shared_pieces_are_exactly_the_named_ones(storage: CheckpointStorage) -> None:
    shared = {str(p) for p in Path(storage.root, SHARED_DIR).glob("*")}
    named = {p for p in named_files(storage) if f"/{SHARED_DIR}/" in p}
    assert shared == named, (sorted(shared - named)[:3], sorted(named - shared)[:3])
    for checkpoint_id in storage.completed_ids():
        assert storage.verify(checkpoint_id) == []


def test_a_failure_restores_exactly_from_incremental_checkpoints_and_no_piece_leaks(tmp_path: Path) -> None:
    sink = of.sinks.TestingSink()
    config = of.CheckpointConfig(interval_s=0.01, storage=str(tmp_path), incremental=True, retain=2)
    result = of.run(feature_flow("inc-fail", 150_000, sink, fail_after=90_000, rate=150_000), parallelism=2,
                    executor="local",
                    checkpoint=config, restart=of.RestartStrategy.fixed_delay(attempts=2, delay_s=0.0))
    assert result.metrics["restarts"] == 1 and result.metrics["restored_from"]
    assert_feature_reference(sink.table(), 150_000)
    storage = CheckpointStorage(str(tmp_path), "inc-fail")
    manifest = storage.manifest(storage.completed_ids()[-1])
    assert manifest is not None
    assert any("pieces" in s for e in manifest["tasks"].values() for s in e["states"].values())
    assert_shared_pieces_are_exactly_the_named_ones(storage)


def test_checkpoints_write_only_what_changed(tmp_path: Path) -> None:
    """A long window keeps its partial tables open: each checkpoint writes the new ones, not the whole state."""
    history = {}
    for incremental in (False, True):
        storage = tmp_path / str(incremental)
        handle = of.submit(feature_flow(f"inc-{incremental}", None, of.sinks.TestingSink(),  # type: ignore[arg-type]
                                        window_ms=10**9, rate=100_000),
                           executor="local",
                           checkpoint=of.CheckpointConfig(interval_s=0.05, storage=str(storage),
                                                          incremental=incremental))
        wait_until(lambda h=handle: h.metrics()["checkpoints_completed"] >= 20, timeout_s=60, what="checkpoints")
        handle.cancel()
        history[incremental] = CheckpointStorage(str(storage), f"inc-{incremental}").history()[10:]

    def median_share(entries: list[dict[str, float]]) -> float:
        return float(np.median([h["written_bytes"] / h["state_bytes"] for h in entries]))

    assert median_share(history[False]) == pytest.approx(1.0)  # a full checkpoint writes its whole state
    share = median_share(history[True])
    assert share < 0.35, f"incremental checkpoints wrote a median {share:.0%} of their state"


def test_retention_deletes_a_shared_piece_only_when_no_checkpoint_names_it(tmp_path: Path) -> None:
    storage = CheckpointStorage(str(tmp_path), "gc")
    old = storage.write_shared("w/0", "features", pa.table({"k": [1]}))
    kept = storage.write_shared("w/0", "features", pa.table({"k": [2]}))
    orphan = storage.write_shared("w/0", "features", pa.table({"k": [3]}))

    def complete(checkpoint_id: int, pieces: list) -> None:
        head = storage.write_state(checkpoint_id, "w/0", "features", pa.table({"k": pa.array([], pa.int64())}))
        entry = {"pieces": [h.to_manifest() for h in [head, *pieces]], "bytes": 0, "rows": 0}
        storage.write_manifest({"checkpoint_id": checkpoint_id, "tasks": {"w/0": {"states": {"features": entry}}}})

    complete(1, [old, kept])
    complete(2, [kept])
    storage.discard(1)
    assert not Path(old.path).exists() and Path(kept.path).exists()
    manifest = Path(storage.checkpoint_path(2)) / "_manifest.json"
    manifest.write_text(manifest.read_text().replace('"rows": 0}', '"rows": 7}', 1))  # parses, fails its CRC-32
    assert storage.damaged_manifest(2)
    assert storage.discard_unreferenced_shared() == [orphan.path]  # not `kept`: a damaged manifest protects it
    assert Path(kept.path).exists()


def test_a_savepoint_of_incremental_checkpoints_copies_its_pieces(tmp_path: Path) -> None:
    total = 60_000
    first = of.sinks.TestingSink()
    handle = of.submit(feature_flow("inc-sp", total, first, rate=40_000), parallelism=2, executor="local",
                       checkpoint=of.CheckpointConfig(interval_s=0.02, storage=str(tmp_path / "cp"), incremental=True))
    wait_until(lambda: handle.metrics()["events_in"] >= 20_000, timeout_s=30, what="input")
    location = handle.stop(savepoint=True)
    assert not any("shared" in path for _, _, h in read_savepoint(location).files() for path in [h.path])
    of.run(feature_flow("inc-sp", total, first), parallelism=3, executor="local", from_savepoint=location,
           checkpoint=of.CheckpointConfig(storage=str(tmp_path / "cp2"), incremental=True))
    assert_feature_reference(first.table(), total)  # the same sink: see tests/test_savepoints.py


@pytest.mark.usefixtures("ray_session")
def test_on_ray_a_killed_window_subtask_restores_exactly_from_shared_pieces(tmp_path: Path) -> None:
    sink = of.sinks.TestingSink()
    flow = feature_flow("inc-ray", 240_000, sink, window_ms=10**9, rate=60_000)

    def reused() -> bool:  # a checkpoint named pieces an earlier one wrote
        return any(h["written_bytes"] < h["state_bytes"] for h in CheckpointStorage(str(tmp_path), "inc-ray").history())

    handle = of.submit(flow, parallelism=2, restart=of.RestartStrategy.fixed_delay(attempts=3, delay_s=0.1),
                       checkpoint=of.CheckpointConfig(interval_s=0.2, storage=str(tmp_path), incremental=True))
    try:
        wait_until(reused, timeout_s=60, what="a checkpoint that reuses pieces")
        import ray

        ray.kill(ray.get_actor("inc-ray/features/1", namespace="onceflow"), no_restart=True)
        result = handle.wait(120)
    finally:
        handle.cancel()
    assert result.metrics["restarts"] == 1 and result.metrics["restored_from"]
    order = [("window_start", "ascending"), ("user_id", "ascending")]
    got, expected = sink.table().sort_by(order), feature_window_reference(240_000, window_ms=10**9).sort_by(order)
    assert got.num_rows == expected.num_rows
    for column in ("user_id", "window_start", "count"):
        assert got[column].equals(expected[column]), column
    assert_shared_pieces_are_exactly_the_named_ones(CheckpointStorage(str(tmp_path), "inc-ray"))


def test_incremental_needs_one_checkpoint_at_a_time() -> None:
    with pytest.raises(of.PlanError, match="max_concurrent=1"):
        of.CheckpointConfig(incremental=True, max_concurrent=2)
