"""Savepoints: a completed checkpoint copied out of the job's storage, owned by the user, relocatable.

A savepoint is a directory (any ``pyarrow.fs`` URI or local path) holding a
copy of one completed checkpoint's state files, the checkpoint's manifest with
the files named *relative* to the directory (so the directory can be moved or
copied elsewhere and still restores), and ``_savepoint.json``, written last:
a savepoint without it is incomplete and is refused. Retention never deletes
a savepoint; its state files are keyed by operator uid and, for keyed state,
by key group, so it restores at any parallelism, as a checkpoint does
(:mod:`onceflow.runtime.restore`).

Restoring one (``of.run(flow, from_savepoint=path)``) *imports* it: its files
are copied into the job's checkpoint storage as a new checkpoint, numbered
after every checkpoint there and no lower than the savepoint's own id (sink
transactions are recorded by checkpoint id, and a restore commits those up to
the restored id). From then on it is an ordinary restore point.

``_savepoint.json``'s ``format`` is :data:`SAVEPOINT_FORMAT`. A reader
accepts every format up to its own and refuses a newer one by name; the
manifest inside keeps its own format (1: sizes only, 2: sizes and CRC-32s),
and both restore.
"""

from __future__ import annotations

import json
import posixpath
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.fs as pafs

from onceflow.checkpoint.storage import (
    CheckpointStorage,
    CheckpointStorageError,
    StateHandle,
    open_uri,
    state_handles,
)
from onceflow.errors import CheckpointError, PlanError
from onceflow.redaction import redact_uri

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

__all__ = ["SAVEPOINT_FORMAT", "SAVEPOINT_META", "Savepoint", "import_savepoint", "read_savepoint",
           "write_savepoint"]

SAVEPOINT_FORMAT = 1
"""The layout of a savepoint directory this version writes (and the newest it reads)."""

SAVEPOINT_META = "_savepoint.json"
"""The file that describes a savepoint; written last, so its presence means the savepoint is complete."""

MANIFEST = "_manifest.json"


@dataclass(frozen=True, slots=True)
class Savepoint:
    """A savepoint as read from its directory.

    Attributes:
        uri: where it is (credentials masked).
        meta: ``_savepoint.json``: ``format``, ``job``, ``run``, ``checkpoint_id``, ``created_at``,
            ``operators`` (the uids with state).
        manifest: the checkpoint's manifest, state paths relative to the directory.
    """

    uri: str
    meta: dict[str, Any]
    manifest: dict[str, Any]
    fs: pafs.FileSystem
    root: str

    @property
    def checkpoint_id(self) -> int:
        """The id of the checkpoint it was taken as."""
        return int(self.meta["checkpoint_id"])

    def files(self) -> Iterator[tuple[str, str, StateHandle]]:
        """Every state file: (task, operator uid, its handle with the path inside the savepoint's filesystem)."""
        for task, entry in sorted(self.manifest["tasks"].items()):
            for operator, state in sorted(entry["states"].items()):
                for handle in state_handles(state):
                    yield task, operator, StateHandle(posixpath.join(self.root, handle.path), handle.bytes,
                                                      handle.rows, handle.crc32)


def _with_paths(state: dict[str, Any], path: Callable[[StateHandle], StateHandle]) -> dict[str, Any]:
    """A manifest state entry with each file replaced by ``path(handle)`` (the entry's shape kept)."""
    if "pieces" in state:
        pieces = [path(h).to_manifest() for h in state_handles(state)]
        return {**state, "pieces": pieces}
    return {**state, **path(StateHandle.from_manifest(state)).to_manifest()}


def _open(uri: str) -> tuple[pafs.FileSystem, str]:
    try:
        fs, root = open_uri(uri, "savepoint location")
    except CheckpointStorageError as error:
        raise PlanError(str(error)) from None
    return fs, root.rstrip("/")


def write_savepoint(storage: CheckpointStorage, checkpoint_id: int, target: str | None = None) -> str:
    """Copy completed checkpoint ``checkpoint_id`` of ``storage`` into a new savepoint; return its location.

    Args:
        storage: the job's checkpoint storage.
        checkpoint_id: a completed checkpoint (the caller keeps retention from deleting it meanwhile).
        target: the savepoint directory (must not hold a savepoint already); by default
            ``<storage>/<job>/savepoints/savepoint-<id>-<random>``.

    Raises:
        CheckpointError: the checkpoint is not complete, or a file of it does not verify.
        CheckpointStorageError: a file cannot be read or written.
        PlanError: ``target`` holds a savepoint already.
    """
    manifest = storage.manifest(checkpoint_id)
    if manifest is None:
        msg = f"checkpoint {checkpoint_id} of job {storage.job!r} is not complete; no savepoint was written"
        raise CheckpointError(msg, reason="missing")
    name = f"savepoint-{checkpoint_id:08d}-{uuid.uuid4().hex[:8]}"
    if target is None:
        fs, root = storage.filesystem, f"{storage.root}/savepoints/{name}"
        location = root if "://" not in storage.uri else f"{storage.uri.rstrip('/')}/{storage.job}/savepoints/{name}"
    else:
        fs, root = _open(target)
        location = target
    if fs.get_file_info(f"{root}/{SAVEPOINT_META}").type != pafs.FileType.NotFound:
        msg = f"{redact_uri(location)!r} holds a savepoint already; choose another directory"
        raise PlanError(msg)
    fs.create_dir(root, recursive=True)
    def copy(handle: StateHandle) -> StateHandle:
        data = storage.read_bytes(handle)  # checked against its size and CRC-32
        base = posixpath.basename(handle.path)
        _write(fs, f"{root}/{base}", data)
        return StateHandle(base, handle.bytes, handle.rows, handle.crc32)

    tasks: dict[str, Any] = {task: {**entry, "states": {op: _with_paths(state, copy)
                                                        for op, state in entry["states"].items()}}
                             for task, entry in manifest["tasks"].items()}
    copied = {**manifest, "tasks": tasks}
    _write(fs, f"{root}/{MANIFEST}", json.dumps(copied, allow_nan=False).encode())
    meta = {"format": SAVEPOINT_FORMAT, "job": storage.job, "run": manifest.get("run"),
            "checkpoint_id": checkpoint_id, "created_at": time.time(),
            "operators": sorted({op for entry in tasks.values() for op in entry["states"]})}
    _write(fs, f"{root}/{SAVEPOINT_META}", json.dumps(meta).encode())  # last: the savepoint is complete
    return location


def _write(fs: pafs.FileSystem, path: str, data: bytes | pa.Buffer) -> None:
    try:
        with fs.open_output_stream(path) as out:
            out.write(data)
    except OSError as error:
        msg = f"cannot write savepoint file {path!r}: {error}; check that the location is writable"
        raise CheckpointStorageError(msg, path=path) from error


def read_savepoint(uri: str) -> Savepoint:
    """Read the savepoint at ``uri`` (its description and manifest; the state files stay where they are).

    Raises:
        PlanError: there is no complete savepoint there, or it was written by a newer format.
    """
    fs, root = _open(uri)
    shown = redact_uri(uri)
    try:
        with fs.open_input_stream(f"{root}/{SAVEPOINT_META}") as source:
            meta = json.loads(source.read())
        with fs.open_input_stream(f"{root}/{MANIFEST}") as source:
            manifest = json.loads(source.read())
    except FileNotFoundError:
        msg = (f"no savepoint at {shown!r} (no {SAVEPOINT_META}: none was written there, or writing it did not "
               "finish); pass the location handle.savepoint() returned")
        raise PlanError(msg) from None
    except (OSError, ValueError) as error:
        msg = f"cannot read the savepoint at {shown!r}: {error}; check the location"
        raise PlanError(msg) from None
    version = meta.get("format") if isinstance(meta, dict) else None
    if not isinstance(version, int) or version > SAVEPOINT_FORMAT:
        msg = (f"the savepoint at {shown!r} has format {version!r}; this onceflow reads formats up to "
               f"{SAVEPOINT_FORMAT}: restore it with a newer onceflow")
        raise PlanError(msg)
    manifest.pop("_integrity", None)
    return Savepoint(shown, meta, manifest, fs, root)


def import_savepoint(savepoint: Savepoint, storage: CheckpointStorage, run: str) -> int:
    """Copy ``savepoint`` into ``storage`` as a completed checkpoint of run ``run``; return its id.

    The id is the next one in ``storage`` and at least the savepoint's own.

    Raises:
        CheckpointStorageError: a file is missing or damaged, or cannot be written.
    """
    existing = storage.written_ids() or [0]
    checkpoint_id = max(existing[-1] + 1, savepoint.checkpoint_id)
    storage.discard(checkpoint_id)  # an incomplete leftover of that id
    def copy(relative: StateHandle) -> StateHandle:
        path = posixpath.join(savepoint.root, relative.path)
        try:
            with savepoint.fs.open_input_file(path) as source:
                data = source.read_buffer()
        except OSError as error:
            msg = f"cannot read savepoint file {path!r}: {error}; the savepoint is incomplete or moved"
            raise CheckpointStorageError(msg, path=path) from error
        return storage.write_bytes(checkpoint_id, posixpath.basename(path), data,
                                   expected=StateHandle(path, relative.bytes, relative.rows, relative.crc32))

    tasks: dict[str, Any] = {task: {**entry, "states": {op: _with_paths(state, copy)
                                                        for op, state in entry["states"].items()}}
                             for task, entry in savepoint.manifest["tasks"].items()}
    manifest = {**savepoint.manifest, "checkpoint_id": checkpoint_id, "run": run, "tasks": tasks,
                "savepoint": {"uri": savepoint.uri, "checkpoint_id": savepoint.checkpoint_id,
                              "job": savepoint.meta.get("job"), "run": savepoint.meta.get("run")}}
    storage.write_manifest(manifest)
    return checkpoint_id
