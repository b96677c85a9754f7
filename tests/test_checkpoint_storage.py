"""CheckpointStorage: Arrow state round trips, atomic manifests, retention, history, URIs."""

from __future__ import annotations

import json
import os
import pickle
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from onceflow.checkpoint.storage import CheckpointStorage, CheckpointStorageError, StateHandle
from onceflow.errors import OnceflowError, PlanError


@pytest.fixture
def storage(tmp_path: Path) -> CheckpointStorage:
    return CheckpointStorage(str(tmp_path), "job")


def keyed(n: int) -> pa.Table:
    return pa.table({"key_group": pa.array([i % 4 for i in range(n)], pa.int32()),
                     "user_id": pa.array(range(n), pa.int64()),
                     "total": pa.array([i / 2 for i in range(n)], pa.float64())})


def complete(storage: CheckpointStorage, checkpoint_id: int) -> dict[str, object]:
    """Write one state file and the manifest of ``checkpoint_id``."""
    handle = storage.write_state(checkpoint_id, "window_2/0", "keyed", keyed(3))
    manifest = {"checkpoint_id": checkpoint_id, "states": {"window_2/0": handle.path}}
    storage.write_manifest(manifest)
    return manifest


def chk_dir(storage: CheckpointStorage, checkpoint_id: int) -> Path:
    return Path(storage.root) / f"chk-{checkpoint_id:08d}"


# -- state files ------------------------------------------------------------------------------------------------


def test_state_round_trip_keeps_schema_metadata(storage: CheckpointStorage) -> None:
    table = keyed(1000).replace_schema_metadata({"onceflow.state": "keyed", "v": "1"})
    handle = storage.write_state(7, "window_2/1", "keyed", table)
    data = Path(handle.path).read_bytes()
    assert handle == StateHandle(path=handle.path, bytes=len(data), rows=1000, crc32=zlib.crc32(data))
    assert handle.path == f"{storage.root}/chk-00000007/window_2-1.keyed.arrow"
    restored = storage.read_state(handle.path)
    assert restored.equals(table)
    assert restored.schema.metadata == {b"onceflow.state": b"keyed", b"v": b"1"}
    assert storage.read_state(handle).equals(table)


def test_empty_table_round_trip(storage: CheckpointStorage) -> None:
    empty = keyed(0).replace_schema_metadata({"k": "v"})
    handle = storage.write_state(1, "src/0", "source", empty)
    assert handle.rows == 0 and handle.bytes > 0
    restored = storage.read_state(handle.path)
    assert restored.num_rows == 0
    assert restored.schema.equals(empty.schema, check_metadata=True)


def test_binary_and_nested_columns_round_trip(storage: CheckpointStorage) -> None:
    table = pa.table({"bits": pa.array([b"\x00\xff" * 10, b""], pa.binary()),
                      "offsets": pa.array([[1, 2], []], pa.list_(pa.int64()))})
    assert storage.read_state(storage.write_state(2, "dedupe_3/0", "bloom", table).path).equals(table)


def test_read_missing_state_names_the_path(storage: CheckpointStorage) -> None:
    missing = f"{storage.root}/chk-00000001/nope-0.keyed.arrow"
    with pytest.raises(CheckpointStorageError, match="does not exist") as caught:
        storage.read_state(missing)
    assert missing in str(caught.value)
    assert caught.value.path == missing
    assert isinstance(caught.value, OnceflowError)


def test_read_corrupt_state_raises(storage: CheckpointStorage) -> None:
    handle = storage.write_state(1, "map_1/0", "state", keyed(100))
    data = Path(handle.path).read_bytes()
    Path(handle.path).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointStorageError, match="restore from an older checkpoint") as caught:
        storage.read_state(handle.path)
    assert handle.path in str(caught.value)
    Path(handle.path).write_bytes(b"not arrow at all")
    with pytest.raises(CheckpointStorageError, match=handle.path):
        storage.read_state(handle.path)


def test_read_with_handle_checks_size(storage: CheckpointStorage) -> None:
    handle = storage.write_state(1, "map_1/0", "state", keyed(10))
    with pytest.raises(CheckpointStorageError, match="the manifest says"):
        storage.read_state(StateHandle(handle.path, handle.bytes + 1, handle.rows))


def test_bad_names_are_plan_errors(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="job name"):
        CheckpointStorage(str(tmp_path), "a/b")
    storage = CheckpointStorage(str(tmp_path), "job")
    with pytest.raises(PlanError, match="checkpoint id"):
        storage.write_state(-1, "t/0", "s", keyed(1))
    with pytest.raises(PlanError, match="task"):
        storage.write_state(1, "", "s", keyed(1))


# -- manifests ------------------------------------------------------------------------------------------------


def test_manifest_round_trip(storage: CheckpointStorage) -> None:
    assert storage.latest_manifest() is None
    assert storage.completed_ids() == []
    manifest = complete(storage, 1)
    path = storage.write_manifest(manifest)
    assert path == f"{storage.root}/chk-00000001/_manifest.json"
    assert storage.manifest(1) == manifest
    assert storage.manifest(2) is None
    assert storage.latest_manifest() == manifest
    assert [p.name for p in chk_dir(storage, 1).iterdir() if p.name.endswith(".tmp")] == []


def test_crash_before_manifest_keeps_previous(storage: CheckpointStorage) -> None:
    first = complete(storage, 1)
    storage.write_state(2, "window_2/0", "keyed", keyed(5))
    storage.write_state(2, "window_2/1", "keyed", keyed(5))  # crash here: no manifest for 2
    assert storage.latest_manifest() == first
    assert storage.completed_ids() == [1]


def test_leftover_temp_manifest_is_ignored(storage: CheckpointStorage) -> None:
    first = complete(storage, 1)
    storage.write_state(2, "window_2/0", "keyed", keyed(5))
    (chk_dir(storage, 2) / "_manifest.json.0123abcd.tmp").write_text(json.dumps({"checkpoint_id": 2}))
    assert storage.latest_manifest() == first
    assert storage.completed_ids() == [1]
    assert storage.manifest(2) is None


def test_truncated_manifest_is_ignored(storage: CheckpointStorage) -> None:
    first = complete(storage, 1)
    complete(storage, 2)
    manifest_file = chk_dir(storage, 2) / "_manifest.json"
    manifest_file.write_bytes(manifest_file.read_bytes()[:10])
    assert storage.latest_manifest() == first
    assert storage.completed_ids() == [1]
    manifest_file.write_bytes(b"")
    assert storage.latest_manifest() == first


def test_manifest_naming_another_checkpoint_is_ignored(storage: CheckpointStorage) -> None:
    first = complete(storage, 1)
    complete(storage, 2)
    (chk_dir(storage, 2) / "_manifest.json").write_text(json.dumps({"checkpoint_id": 9}))
    assert storage.latest_manifest() == first


def test_failed_rename_leaves_no_temp_and_previous_latest(storage: CheckpointStorage,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    first = complete(storage, 1)
    storage.write_state(2, "window_2/0", "keyed", keyed(5))

    def fail(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(CheckpointStorageError, match="cannot write checkpoint manifest"):
        storage.write_manifest({"checkpoint_id": 2})
    monkeypatch.undo()
    assert storage.latest_manifest() == first
    assert sorted(p.name for p in chk_dir(storage, 2).iterdir()) == ["window_2-0.keyed.arrow"]


def test_manifest_validation(storage: CheckpointStorage) -> None:
    with pytest.raises(PlanError, match="checkpoint id"):
        storage.write_manifest({"states": {}})
    with pytest.raises(CheckpointStorageError, match="not json-serialisable"):
        storage.write_manifest({"checkpoint_id": 1, "handle": object()})
    assert storage.completed_ids() == []


def test_foreign_entries_are_ignored(storage: CheckpointStorage) -> None:
    complete(storage, 3)
    (Path(storage.root) / "chk-3").mkdir()  # not the chk-%08d form
    (Path(storage.root) / "chk-00000009").write_text("a file, not a directory")
    (Path(storage.root) / "savepoints").mkdir()
    assert storage.completed_ids() == [3]
    assert storage.discard_incomplete() == []


# -- deletion -------------------------------------------------------------------------------------------------


def test_discard(storage: CheckpointStorage) -> None:
    complete(storage, 1)
    storage.discard(1)
    assert not chk_dir(storage, 1).exists()
    storage.discard(1)  # missing is fine
    storage.discard(42)
    assert storage.completed_ids() == []


def test_discard_incomplete(storage: CheckpointStorage) -> None:
    complete(storage, 1)
    storage.write_state(2, "a/0", "s", keyed(1))
    complete(storage, 3)
    storage.write_state(4, "a/0", "s", keyed(1))
    storage.write_state(5, "a/0", "s", keyed(1))  # in flight
    assert storage.discard_incomplete(older_than=5) == [2, 4]
    assert chk_dir(storage, 5).exists()
    assert storage.discard_incomplete() == [5]
    assert storage.completed_ids() == [1, 3]
    assert sorted(p.name for p in Path(storage.root).iterdir()) == ["chk-00000001", "chk-00000003"]


def test_retain_keeps_newest(storage: CheckpointStorage) -> None:
    complete(storage, 1)
    storage.write_state(2, "a/0", "s", keyed(1))  # incomplete, older than the oldest kept
    for checkpoint_id in (3, 4, 5, 6):
        complete(storage, checkpoint_id)
    storage.write_state(7, "a/0", "s", keyed(1))  # incomplete and newer: may be in flight
    assert storage.retain(3) == [1, 2, 3]
    assert storage.completed_ids() == [4, 5, 6]
    assert chk_dir(storage, 7).exists()
    assert storage.retain(3) == []
    assert storage.retain(1) == [4, 5]
    assert storage.latest_manifest() == {"checkpoint_id": 6, "states": {"window_2/0":
                                         f"{storage.root}/chk-00000006/window_2-0.keyed.arrow"}}


def test_retain_without_complete_checkpoints_deletes_nothing(storage: CheckpointStorage) -> None:
    storage.write_state(1, "a/0", "s", keyed(1))
    assert storage.retain(2) == []
    assert chk_dir(storage, 1).exists()
    with pytest.raises(PlanError, match="keep at least"):
        storage.retain(0)


# -- history --------------------------------------------------------------------------------------------------


def test_history(storage: CheckpointStorage) -> None:
    assert storage.history() == []
    storage.append_history({"checkpoint_id": 1, "duration_s": 0.25})
    storage.append_history({"checkpoint_id": 2, "duration_s": 0.5})
    assert storage.history() == [{"checkpoint_id": 1, "duration_s": 0.25}, {"checkpoint_id": 2, "duration_s": 0.5}]
    history_file = Path(storage.root) / "checkpoint-history.jsonl"
    assert len(history_file.read_text().splitlines()) == 2


def test_history_skips_a_torn_last_line(storage: CheckpointStorage) -> None:
    storage.append_history({"checkpoint_id": 1})
    history_file = Path(storage.root) / "checkpoint-history.jsonl"
    with history_file.open("ab") as out:
        out.write(b'{"checkpoint_id": 2, "dur')  # crash mid-append
    assert storage.history() == [{"checkpoint_id": 1}]
    storage.append_history({"checkpoint_id": 3})  # a later append stays readable
    assert storage.history() == [{"checkpoint_id": 1}, {"checkpoint_id": 3}]


# -- filesystems ----------------------------------------------------------------------------------------------


def test_file_uri(tmp_path: Path) -> None:
    storage = CheckpointStorage(tmp_path.as_uri(), "job")
    assert storage.uri == tmp_path.as_uri()
    assert storage.root == f"{tmp_path}/job"
    manifest = complete(storage, 1)
    assert (tmp_path / "job" / "chk-00000001" / "_manifest.json").exists()
    assert CheckpointStorage(str(tmp_path), "job").latest_manifest() == manifest


def test_relative_path_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    storage = CheckpointStorage("checkpoints", "job")
    assert storage.root == f"{tmp_path}/checkpoints/job"
    assert (tmp_path / "checkpoints" / "job").is_dir()


def test_pickled_storage_sees_the_same_checkpoints(storage: CheckpointStorage) -> None:
    manifest = complete(storage, 1)
    assert pickle.loads(pickle.dumps(storage)).latest_manifest() == manifest
    error = CheckpointStorageError("x; y", path="/p")
    assert pickle.loads(pickle.dumps(error)).path == "/p"


def test_non_local_filesystem() -> None:
    """The object-store path (open_output_stream + move, history rewritten) on Arrow's mock filesystem."""
    storage = CheckpointStorage("mock:///bucket/prefix", "job")
    assert not isinstance(storage.filesystem, pafs.LocalFileSystem)
    assert storage.root == "bucket/prefix/job"
    first = complete(storage, 1)
    storage.write_state(2, "a/0", "s", keyed(2))
    assert storage.latest_manifest() == first
    handle = storage.write_state(3, "a/0", "s", keyed(4))
    storage.write_manifest({"checkpoint_id": 3, "state": handle.path})
    assert storage.read_state(handle.path).equals(keyed(4))
    assert storage.completed_ids() == [1, 3]
    assert storage.retain(1) == [1, 2]
    storage.append_history({"checkpoint_id": 1})
    storage.append_history({"checkpoint_id": 3})
    assert [entry["checkpoint_id"] for entry in storage.history()] == [1, 3]
    names = [info.base_name for info in storage.filesystem.get_file_info(pafs.FileSelector(storage.root))]
    assert sorted(names) == ["checkpoint-history.jsonl", "chk-00000003"]


def test_configured_filesystem(tmp_path: Path) -> None:
    subtree = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    storage = CheckpointStorage("store", "job", filesystem=subtree)
    manifest = complete(storage, 1)
    assert storage.latest_manifest() == manifest
    assert (tmp_path / "store" / "job" / "chk-00000001" / "_manifest.json").exists()


def test_unknown_scheme() -> None:
    with pytest.raises(CheckpointStorageError, match="cannot open checkpoint storage"):
        CheckpointStorage("nosuchscheme://x/y", "job")


# -- integrity -----------------------------------------------------------------------------------------------


def checkpoint_with_state(storage: CheckpointStorage, checkpoint_id: int) -> StateHandle:
    """A complete checkpoint whose manifest records one state file, as the runtime writes it."""
    handle = storage.write_state(checkpoint_id, "window_2/0", "keyed", keyed(2_000))
    storage.write_manifest({"checkpoint_id": checkpoint_id,
                            "tasks": {"window_2/0": {"states": {"keyed": handle.to_manifest()}}}})
    return handle


def damage(path: str, offset_fraction: float, data: bytes) -> None:
    """Overwrite bytes in the middle of a file, keeping its size (as a bad disk block would)."""
    content = bytearray(Path(path).read_bytes())
    at = int(len(content) * offset_fraction)
    content[at:at + len(data)] = data
    Path(path).write_bytes(bytes(content))


def test_a_state_file_with_zeroed_bytes_is_never_restored(storage: CheckpointStorage) -> None:
    handle = checkpoint_with_state(storage, 1)
    damage(handle.path, 0.5, bytes(64))
    storage.read_state(handle.path)  # without its handle the damage goes unseen: Arrow reads it
    with pytest.raises(CheckpointStorageError, match="is damaged: CRC-32") as caught:
        storage.read_state(handle)
    assert caught.value.path == handle.path
    assert storage.verify(1) == [f"{handle.path}: {caught.value.args[0].split('damaged: ')[1].split(';')[0]} "
                                 "(state 'keyed' of window_2/0)"]


def test_verify_names_flipped_bits_a_missing_file_and_a_damaged_manifest(storage: CheckpointStorage) -> None:
    flipped, missing, _ = (checkpoint_with_state(storage, i) for i in (1, 2, 3))
    content = bytearray(Path(flipped.path).read_bytes())
    for i in range(100, 1_124):
        content[i] ^= 0x5A
    Path(flipped.path).write_bytes(bytes(content))
    Path(missing.path).unlink()
    assert storage.verify(3) == []
    assert storage.verify(1)[0].startswith(f"{flipped.path}: CRC-32")
    assert storage.verify(2) == [f"{missing.path}: missing (state 'keyed' of window_2/0)"]
    manifest = chk_dir(storage, 3) / "_manifest.json"
    manifest.write_text(manifest.read_text().replace('"rows": 2000', '"rows": 2001'))  # still valid JSON
    assert storage.manifest(3) is None
    assert storage.verify(3) == [f"{manifest}: the manifest does not match its own CRC-32 (damaged)"]
    assert storage.damaged_manifest(3) is not None and storage.damaged_manifest(1) is None
    assert storage.discard_incomplete() == []  # a damaged manifest is not an incomplete checkpoint: kept
    assert storage.verify(4) == ["checkpoint 4 has no manifest: it never completed"]


def test_the_manifest_records_its_format_and_checksum_and_reads_back_without_them(storage: CheckpointStorage) -> None:
    handle = checkpoint_with_state(storage, 1)
    on_disk = json.loads((chk_dir(storage, 1) / "_manifest.json").read_text())
    assert on_disk["_integrity"]["format"] == 2 and isinstance(on_disk["_integrity"]["crc32"], int)
    assert storage.manifest(1) == {"checkpoint_id": 1,
                                   "tasks": {"window_2/0": {"states": {"keyed": handle.to_manifest()}}}}


def test_a_format_1_checkpoint_still_restores(storage: CheckpointStorage) -> None:
    handle = storage.write_state(1, "window_2/0", "keyed", keyed(10))
    old = {"checkpoint_id": 1, "tasks": {"window_2/0": {"states": {"keyed": {"path": handle.path,
                                                                            "bytes": handle.bytes, "rows": 10}}}}}
    (chk_dir(storage, 1) / "_manifest.json").write_text(json.dumps(old))
    assert storage.manifest(1) == old
    assert storage.verify(1) == []
    restored = StateHandle.from_manifest(old["tasks"]["window_2/0"]["states"]["keyed"])
    assert restored.crc32 is None and storage.read_state(restored).num_rows == 10
