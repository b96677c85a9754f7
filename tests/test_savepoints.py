"""Savepoints: taken from a running job, stop with one, start from one at another parallelism, read old formats."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import onceflow as of
from onceflow.checkpoint.savepoint import (
    SAVEPOINT_FORMAT,
    SAVEPOINT_META,
    import_savepoint,
    read_savepoint,
    write_savepoint,
)
from onceflow.checkpoint.storage import CheckpointStorage, CheckpointStorageError
from onceflow.testing.workload import feature_events, feature_window_reference
from tests.helpers import wait_until

FIXTURE = Path(__file__).parent / "data" / "savepoint-format-1"
"""A savepoint written by format 1 (see `test_regenerate_the_format_1_fixture`) and the output committed before it."""

USERS = 1_000


def small_events(offset: int, n: int) -> pa.RecordBatch:
    return feature_events(offset, n, users=USERS)


def window_flow(name: str, total: int, sink: of.sinks.TestingSink, *, rate: int | None = None,
                window_parallelism: int | None = None) -> of.Dataflow:
    flow = of.Dataflow(name)
    events = flow.source(of.sources.GeneratorSource(small_events, total=total, batch_size=1_000,
                                                    max_events_per_s=rate),
                         watermark=of.BoundedOutOfOrderness("event_time"), name="events")
    (events.key_by("user_id").window(of.windows.Tumbling(size_ms=10_000))
     .aggregate(count=of.agg.count(), total=of.agg.sum("amount"), name="features", parallelism=window_parallelism)
     .sink(sink, name="out"))
    return flow


def assert_reference(tables: list[pa.Table], total: int) -> None:
    """The runs' committed rows together are the reference: every (user, window) once, with its exact figures."""
    got = pa.concat_tables(tables).sort_by([("window_start", "ascending"), ("user_id", "ascending")])
    expected = feature_window_reference(total, users=USERS)
    assert got.num_rows == expected.num_rows, f"{got.num_rows} rows, {expected.num_rows} expected"
    for column in ("user_id", "window_start", "count"):
        assert got[column].equals(expected[column]), column
    assert got["total"].to_pylist() == pytest.approx(expected["total"].to_pylist(), rel=1e-9)


def written_checkpoint(tmp_path: Path) -> CheckpointStorage:
    storage = CheckpointStorage(str(tmp_path / "cp"), "job")
    handle = storage.write_state(4, "window_2/0", "features", pa.table({"k": [1, 2, 3]}))
    storage.write_manifest({"checkpoint_id": 4, "run": "r1", "tasks": {
        "window_2/0": {"states": {"features": handle.to_manifest()}, "metrics": {}}}})
    return storage


# -- the format, without a job -----------------------------------------------------------------------------------


def test_a_savepoint_is_a_relocatable_copy_that_imports_as_a_checkpoint(tmp_path: Path) -> None:
    storage = written_checkpoint(tmp_path)
    location = write_savepoint(storage, 4, str(tmp_path / "sp"))
    meta = json.loads((tmp_path / "sp" / SAVEPOINT_META).read_text())
    assert meta["format"] == SAVEPOINT_FORMAT and meta["checkpoint_id"] == 4 and meta["operators"] == ["features"]
    shutil.move(location, tmp_path / "moved")  # the files are named relative to the directory
    storage.discard(4)  # retention may delete the checkpoint: the savepoint is the user's
    other = CheckpointStorage(str(tmp_path / "other"), "job2")
    imported = import_savepoint(read_savepoint(str(tmp_path / "moved")), other, "r2")
    assert imported == 4  # never below the savepoint's id: sink transactions are recorded by it
    manifest = other.manifest(imported)
    assert manifest is not None and manifest["run"] == "r2" and manifest["savepoint"]["checkpoint_id"] == 4
    assert other.verify(imported) == []
    state = manifest["tasks"]["window_2/0"]["states"]["features"]
    assert other.read_state(state["path"]).column("k").to_pylist() == [1, 2, 3]
    assert import_savepoint(read_savepoint(str(tmp_path / "moved")), other, "r3") == 5  # after what is there


def test_incomplete_newer_or_damaged_savepoints_are_refused_by_name(tmp_path: Path) -> None:
    storage = written_checkpoint(tmp_path)
    location = Path(write_savepoint(storage, 4, str(tmp_path / "sp")))
    with pytest.raises(of.PlanError, match="holds a savepoint already"):
        write_savepoint(storage, 4, str(location))
    with pytest.raises(of.PlanError, match="no savepoint at"):
        read_savepoint(str(tmp_path / "nothing"))
    meta = json.loads((location / SAVEPOINT_META).read_text())
    (location / SAVEPOINT_META).write_text(json.dumps({**meta, "format": SAVEPOINT_FORMAT + 1}))
    with pytest.raises(of.PlanError, match=f"format {SAVEPOINT_FORMAT + 1}.*newer onceflow"):
        read_savepoint(str(location))
    (location / SAVEPOINT_META).write_text(json.dumps(meta))
    state = next(location.glob("*.arrow"))
    state.write_bytes(state.read_bytes()[:-1] + b"!")
    with pytest.raises(CheckpointStorageError, match="damaged"):
        import_savepoint(read_savepoint(str(location)), CheckpointStorage(str(tmp_path / "x"), "job"), "r")


# -- jobs (in process) ---------------------------------------------------------------------------------------------


def test_stop_with_a_savepoint_then_resume_at_another_parallelism_commits_the_reference(tmp_path: Path) -> None:
    total = 60_000
    first = of.sinks.TestingSink()
    handle = of.submit(window_flow("sp-job", total, first, rate=40_000), parallelism=2, executor="local",
                       checkpoint=of.CheckpointConfig(interval_s=0.05, storage=str(tmp_path / "cp")))
    wait_until(lambda: handle.metrics()["events_in"] >= 15_000, timeout_s=30, what="the first run to read")
    location = handle.stop(savepoint=True, timeout_s=60)
    result = handle.wait()
    assert handle.status() is of.JobStatus.FINISHED and result.metrics["events_in"] < total
    assert Path(location, SAVEPOINT_META).exists()
    assert first.pending_ids() == []  # nothing past the savepoint is left prepared
    # The same sink: a restore commits the savepoint's transactions again, which a real sink (one database,
    # one directory) takes as already committed; a second TestingSink would take them as new.
    resumed = of.run(window_flow("sp-job", total, first, window_parallelism=2), parallelism=3, executor="local",
                     from_savepoint=location,
                     checkpoint=of.CheckpointConfig(interval_s=0.05, storage=str(tmp_path / "cp2")))
    assert resumed.metrics["restored_from"], "the second run restored the savepoint"
    assert_reference([first.table()], total)
    events = CheckpointStorage(str(tmp_path / "cp"), "sp-job").events()
    written = [e for e in events if e["event"] == "savepoint"]
    assert [e["path"] for e in written] == [location]
    assert events[-1]["event"] == "stopped"


@pytest.mark.usefixtures("ray_session")
def test_on_ray_a_savepoint_through_a_kill_then_stop_with_one_and_rescale_commit_the_reference(tmp_path: Path) -> None:
    import ray

    total = 120_000
    first = of.sinks.TestingSink()
    handle = of.submit(window_flow("sp-ray", total, first, rate=30_000), parallelism=2,
                       checkpoint=of.CheckpointConfig(interval_s=0.2, storage=str(tmp_path / "cp")),
                       restart=of.RestartStrategy.fixed_delay(attempts=3, delay_s=0.1))
    try:
        wait_until(lambda: handle.metrics()["events_in"] >= 20_000, timeout_s=60, what="the first run to read")
        early = handle.savepoint()  # the job goes on
        ray.kill(ray.get_actor("sp-ray/features/1", namespace="onceflow"), no_restart=True)
        wait_until(lambda: handle.attempt == 2 and handle.status() is of.JobStatus.RUNNING, timeout_s=60,
                   what="the restart")
        wait_until(lambda: handle.metrics()["events_in"] >= 50_000, timeout_s=60, what="more input")
        location = handle.stop(savepoint=True, timeout_s=120)
    finally:
        handle.cancel()
    assert handle.status() is of.JobStatus.FINISHED
    assert read_savepoint(location).checkpoint_id > read_savepoint(early).checkpoint_id
    of.run(window_flow("sp-ray", total, first), parallelism=3, from_savepoint=location,  # the same sink (see above)
           checkpoint=of.CheckpointConfig(interval_s=0.2, storage=str(tmp_path / "cp")))
    assert_reference([first.table()], total)
    assert first.pending_ids() == []


def test_a_savepoint_of_a_running_job_leaves_it_running_and_is_listed(tmp_path: Path) -> None:
    sink = of.sinks.TestingSink()
    handle = of.submit(window_flow("sp-live", 40_000, sink, rate=40_000), executor="local",
                       checkpoint=of.CheckpointConfig(interval_s=0.01, storage=str(tmp_path / "cp"), retain=1))
    wait_until(lambda: handle.metrics()["events_in"] >= 5_000, timeout_s=30, what="the job to read")
    location = handle.savepoint(str(tmp_path / "mine"))
    assert location == str(tmp_path / "mine") and handle.status() is of.JobStatus.RUNNING
    result = handle.wait(60)
    assert result.metrics["events_in"] == 40_000
    assert_reference([sink.table()], 40_000)
    savepoint = read_savepoint(location)  # retain=1 deleted its checkpoint long ago; the copy stays
    assert not (tmp_path / "cp" / "sp-live" / f"chk-{savepoint.checkpoint_id:08d}").exists()
    assert [e["path"] for e in CheckpointStorage(str(tmp_path / "cp"), "sp-live").savepoints()] == [location]
    with pytest.raises(of.PlanError, match="no savepoints"):
        of.submit(window_flow("sp-none", 10, of.sinks.TestingSink()), executor="local").savepoint()


def test_a_savepoint_needs_checkpoints_and_excludes_resume() -> None:
    with pytest.raises(of.PlanError, match="from_savepoint needs checkpoint"):
        of.JobOptions(from_savepoint="/somewhere")
    with pytest.raises(of.PlanError, match="not both"):
        of.JobOptions(from_savepoint="/somewhere", resume=True, checkpoint=of.CheckpointConfig())


# -- the previous format -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("manifest_format", [2, 1])
def test_a_savepoint_written_by_format_1_restores_at_any_parallelism(tmp_path: Path, manifest_format: int) -> None:
    """The fixture was written by savepoint format 1 (manifest format 2); format 1 manifests (no CRC) restore too."""
    copy = tmp_path / "savepoint"
    shutil.copytree(FIXTURE / "savepoint", copy)
    if manifest_format == 1:  # as checkpoints before CRC-32s were recorded
        manifest = json.loads((copy / "_manifest.json").read_text())
        manifest.pop("_integrity", None)
        for entry in manifest["tasks"].values():
            for state in entry["states"].values():
                state.pop("crc32", None)
        (copy / "_manifest.json").write_text(json.dumps(manifest))
    before = pq.read_table(FIXTURE / "committed-before.parquet")
    total = json.loads((FIXTURE / "job.json").read_text())["total"]
    for parallelism in (1, 3):
        sink = of.sinks.TestingSink()
        of.run(window_flow("sp-old", total, sink), parallelism=parallelism, executor="local",
               from_savepoint=str(copy), checkpoint=of.CheckpointConfig(storage=str(tmp_path / f"cp{parallelism}")))
        assert_reference([before, sink.table()], total)


@pytest.mark.skipif(not FIXTURE.joinpath("REGENERATE").exists(), reason="regenerates the fixture on request only")
def test_regenerate_the_format_1_fixture(tmp_path: Path) -> None:
    """``touch tests/data/savepoint-format-1/REGENERATE`` and run this to write the fixture again (format 1 only)."""
    total = 40_000
    sink = of.sinks.TestingSink()
    handle = of.submit(window_flow("sp-old", total, sink, rate=20_000), parallelism=2, executor="local",
                       checkpoint=of.CheckpointConfig(interval_s=0.05, storage=str(tmp_path / "cp")))
    wait_until(lambda: handle.metrics()["events_in"] >= 25_000, timeout_s=30, what="the job to read")
    shutil.rmtree(FIXTURE / "savepoint", ignore_errors=True)
    handle.stop(savepoint=True, path=str(FIXTURE / "savepoint"))
    assert sink.table().num_rows > 0, "windows fired before the savepoint"
    pq.write_table(sink.table(), FIXTURE / "committed-before.parquet")
    (FIXTURE / "job.json").write_text(json.dumps({"total": total, "flow": "window_flow in tests/test_savepoints.py"}))


