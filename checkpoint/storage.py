"""Durable checkpoint storage: Arrow IPC state files and atomic manifests on any ``pyarrow.fs``.

Layout under ``<storage>/<job>``::

    chk-00000007/
        window_2-0.keyed.arrow      one Arrow IPC file per (subtask, state)
        window_2-1.keyed.arrow
        _manifest.json              written last, atomically: the checkpoint is complete
    checkpoint-history.jsonl        one JSON line per completed checkpoint

A checkpoint is complete only when its ``_manifest.json`` exists and parses.
On a filesystem the manifest is written to a temporary name in the same
directory, flushed, fsynced and renamed over the final name (and, on a local
disk, the directory is fsynced after the rename). An object store (S3, GCS,
Azure) has no atomic rename but creates or replaces an object whole, so the
manifest is put once under its final name: no reader ever sees part of it.
Either way a crash at any point leaves either the whole manifest or none: the
previous complete checkpoint stays the recovery point. The lease and the
history are replaced the same way. Deleting a checkpoint removes its manifest
first, so a half-deleted checkpoint is never mistaken for a complete one.

Every state file's size and CRC-32 are recorded in its :class:`StateHandle`
(and so in the manifest), and :meth:`CheckpointStorage.read_state` checks both:
a damaged file never restores. The manifest carries its own CRC-32 and format
version under ``"_integrity"`` (stripped when it is read): a manifest that
parses but does not match is *damaged*, unlike a missing one (the checkpoint
never completed). :meth:`CheckpointStorage.verify` checks a checkpoint's
manifest and every file it names without restoring anything.

The Ray object store only caches these files (an object there dies with its
owner and cannot be rebuilt), so a restore falls back to them; this module is
plain Python and ``pyarrow.fs`` and imports no Ray.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import uuid
import zlib
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.ipc as ipc

from onceflow.checkpoint.lease import JobLease
from onceflow.errors import OnceflowError, PlanError
from onceflow.redaction import dsn_secrets, redact_uri, scrub

__all__ = ["CheckpointStorage", "CheckpointStorageError", "StateHandle", "ipc_file_bytes", "job_names", "matches",
           "open_uri", "state_handles"]

MANIFEST_NAME = "_manifest.json"
LEASE_NAME = "_lease.json"
"""The job's storage lease, beside its checkpoint directories (see :mod:`onceflow.checkpoint.lease`)."""
HISTORY_NAME = "checkpoint-history.jsonl"
EVENTS_NAME = "events.jsonl"
SAVEPOINTS_NAME = "savepoints.jsonl"
SHARED_DIR = "shared"
"""Where the pieces of incremental snapshots live, named by the checkpoints that hold them."""
MANIFEST_FORMAT = 2
"""The manifest's format: 2 adds ``"_integrity"`` (format and CRC-32) and each state file's ``"crc32"``."""
_INTEGRITY = "_integrity"
_CHECKPOINT_DIR = re.compile(r"chk-(\d+)")
_LEASE_READS = 3
"""How often a lease that does not parse is read before it counts as damaged."""
_OBJECT_STORES = frozenset({"s3", "gcs", "abfs"})
"""``pyarrow.fs`` type names of object stores: no directories, no atomic rename, an object is put whole."""


class CheckpointStorageError(OnceflowError):
    """Durable checkpoint storage could not be read or written.

    Attributes:
        path: the file or directory (a path within the filesystem) concerned.

    """

    def __init__(self, message: str, *, path: str = "") -> None:
        super().__init__(message)
        self.path = path


@dataclass(frozen=True, slots=True)
class StateHandle:
    """Where one subtask's snapshot of one state lies in durable storage.

    Attributes:
        path: the Arrow IPC file, as a path within the storage's filesystem.
        bytes: the file's size in bytes.
        rows: the number of rows in the snapshot table.
        crc32: the CRC-32 of the file's bytes (``None``: not recorded, a checkpoint of format 1).

    Example:
        >>> StateHandle(path="/chk/job/chk-00000001/map_1-0.state.arrow", bytes=520, rows=3).rows
        3

    """

    path: str
    bytes: int
    rows: int
    crc32: int | None = None

    def to_manifest(self) -> dict[str, Any]:
        """The handle as the manifest records it."""
        return {"path": self.path, "bytes": self.bytes, "rows": self.rows, "crc32": self.crc32}

    @classmethod
    def from_manifest(cls, entry: dict[str, Any]) -> StateHandle:
        """A handle from a manifest entry (format 1 entries have no ``crc32``)."""
        crc32 = entry.get("crc32")
        return cls(str(entry["path"]), int(entry["bytes"]), int(entry.get("rows", -1)),
                   None if crc32 is None else int(crc32))


def state_handles(entry: dict[str, Any]) -> list[StateHandle]:
    """Every file a manifest's state entry names: one, or an incremental snapshot's pieces (head first).

    An incremental entry (:meth:`CheckpointStorage.write_pieces`) is
    ``{"pieces": [...], "bytes": total, "rows": total}``; its first piece is
    the snapshot's head (written for this checkpoint), the others may be
    shared with earlier checkpoints.

    Example:
        >>> [h.path for h in state_handles({"path": "a.arrow", "bytes": 3, "rows": 1})]
        ['a.arrow']
        >>> entry = {"pieces": [{"path": "h", "bytes": 1, "rows": 0}, {"path": "p", "bytes": 2, "rows": 1}]}
        >>> [h.path for h in state_handles(entry)]
        ['h', 'p']
    """
    if "pieces" in entry:
        return [StateHandle.from_manifest(piece) for piece in entry["pieces"]]
    return [StateHandle.from_manifest(entry)]


def _file_part(name: str, what: str) -> str:
    """``name`` made safe as part of a file name (``/`` becomes ``-``)."""
    if not isinstance(name, str) or not name:
        msg = f"checkpoint state {what} must be a non-empty string, got {name!r}; pass the subtask and state names"
        raise PlanError(msg)
    part = name.replace("/", "-").replace("\\", "-")
    if part in (".", ".."):
        msg = f"checkpoint state {what} {name!r} is not a usable file name; rename it"
        raise PlanError(msg)
    return part


def _fsync_path(path: str) -> None:
    """Make a local file or directory durable with fsync (directories only where the OS allows it)."""
    if os.name != "posix":  # Windows cannot open a directory; its rename is durable enough.
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_or_empty(fs: pafs.FileSystem, path: str) -> bytes:
    try:
        with fs.open_input_stream(path) as source:
            return bytes(source.read())
    except FileNotFoundError:
        return b""


def _ended(existing: bytes) -> bytes:
    """``existing`` lines with a torn last line (a crash mid-append) ended, so a new line stays readable."""
    return existing + b"\n" if existing and not existing.endswith(b"\n") else existing


class _LocalWrites:
    """Writes on a local disk: each file fsynced, a file replaced by renaming a fsynced temporary over it.

    Args:
        root: the job's directory, fsynced after a rename in it.
    """

    def __init__(self, fs: pafs.FileSystem, root: str) -> None:
        self._fs = fs
        self._root = root

    def write(self, directory: str, path: str, data: pa.Buffer) -> None:
        self._fs.create_dir(directory, recursive=True)
        with self._fs.open_output_stream(path) as sink:
            sink.write(data)
        _fsync_path(path)

    def replace(self, directory: str, final: str, data: bytes) -> None:
        self._fs.create_dir(directory, recursive=True)
        temporary = f"{final}.{uuid.uuid4().hex}.tmp"
        try:
            with open(temporary, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, final)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        _fsync_path(os.path.dirname(final))
        _fsync_path(self._root)

    def append(self, path: str, lines: bytes) -> None:
        with open(path, "ab+") as out:
            if out.seek(0, os.SEEK_END) > 0:
                out.seek(-1, os.SEEK_END)
                if out.read(1) != b"\n":
                    lines = b"\n" + lines
            out.write(lines)
            out.flush()
            os.fsync(out.fileno())


class _RenamingWrites:
    """Writes on another filesystem with directories and a rename (HDFS...): a temporary moved over the file."""

    def __init__(self, fs: pafs.FileSystem) -> None:
        self._fs = fs

    def write(self, directory: str, path: str, data: pa.Buffer) -> None:
        self._fs.create_dir(directory, recursive=True)
        with self._fs.open_output_stream(path) as sink:
            sink.write(data)

    def replace(self, directory: str, final: str, data: bytes) -> None:
        self._fs.create_dir(directory, recursive=True)
        temporary = f"{final}.{uuid.uuid4().hex}.tmp"
        try:
            with self._fs.open_output_stream(temporary) as out:
                out.write(data)
            self._fs.move(temporary, final)
        except OSError:
            with contextlib.suppress(OSError):
                self._fs.delete_file(temporary)
            raise

    def append(self, path: str, lines: bytes) -> None:
        self.replace(path.rpartition("/")[0], path, _ended(_read_or_empty(self._fs, path)) + lines)


class _ObjectStoreWrites:
    """Writes on an object store (S3, GCS, Azure): an object is created or replaced whole by one upload.

    There is no rename to make a write atomic and no need for one: readers see
    the old object or the new one, never part of either. Directories are only
    key prefixes, so none is created.
    """

    def __init__(self, fs: pafs.FileSystem) -> None:
        self._fs = fs

    def write(self, directory: str, path: str, data: pa.Buffer | bytes) -> None:
        with self._fs.open_output_stream(path) as sink:
            sink.write(data)

    def replace(self, directory: str, final: str, data: bytes) -> None:
        self.write(directory, final, data)

    def append(self, path: str, lines: bytes) -> None:
        self.write("", path, _ended(_read_or_empty(self._fs, path)) + lines)


_Writes = _LocalWrites | _RenamingWrites | _ObjectStoreWrites


def _writes_for(fs: pafs.FileSystem, root: str) -> _Writes:
    if isinstance(fs, pafs.LocalFileSystem):
        return _LocalWrites(fs, root)
    if fs.type_name in _OBJECT_STORES:
        return _ObjectStoreWrites(fs)
    return _RenamingWrites(fs)


def open_uri(uri: str, what: str = "checkpoint storage") -> tuple[pafs.FileSystem, str]:
    """The filesystem and base path of a local directory or ``pyarrow.fs`` URI (``what`` it is, for errors).

    Raises:
        CheckpointStorageError: it cannot be opened; the message names it with its credentials masked.
    """
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, OSError, ValueError) as error:
        secrets = dsn_secrets(uri)
        why = scrub(str(error), [uri, *secrets, *(unquote(secret) for secret in secrets)])
        msg = f"cannot open {what} {redact_uri(uri)!r}: {why}; pass a local directory or a pyarrow.fs uri"
        raise CheckpointStorageError(msg, path=redact_uri(uri)) from None


def job_names(uri: str) -> list[str]:
    """The jobs with a directory under checkpoint storage ``uri`` (a local directory or ``pyarrow.fs`` URI).

    Raises:
        CheckpointStorageError: the storage cannot be opened or listed.

    """
    fs, base = open_uri(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(base.rstrip("/"), allow_not_found=True))
    except OSError as error:
        msg = f"cannot list checkpoint storage {redact_uri(uri)!r}: {error}; check that it is reachable"
        raise CheckpointStorageError(msg, path=redact_uri(uri)) from error
    return sorted(info.base_name for info in infos if info.type == pafs.FileType.Directory)


class CheckpointStorage:
    """Checkpoint files of one job under a local directory or a ``pyarrow.fs`` URI.

    Args:
        uri: a local directory (made absolute; ``~`` is expanded) or a
            ``pyarrow.fs`` URI such as ``file:///data/chk`` or ``s3://bucket/prefix``.
            With ``filesystem``, a path within that filesystem.
        job: the job name; the job's checkpoints live in ``<uri>/<job>``.
        filesystem: an already configured filesystem (credentials, region...)
            to use instead of resolving ``uri``.

    Raises:
        PlanError: ``job`` is not a usable directory name.
        CheckpointStorageError: the URI cannot be resolved or the directory created.

    Example:
        >>> import tempfile
        >>> import pyarrow as pa
        >>> storage = CheckpointStorage(tempfile.mkdtemp(), "features")
        >>> handle = storage.write_state(1, "window_2/0", "keyed", pa.table({"count": [3, 4]}))
        >>> handle.rows, handle.path.endswith("/features/chk-00000001/window_2-0.keyed.arrow")
        (2, True)
        >>> storage.latest_manifest() is None       # no manifest: not complete
        True
        >>> _ = storage.write_manifest({"checkpoint_id": 1, "states": [handle.path]})
        >>> storage.completed_ids(), storage.read_state(handle.path).column("count").to_pylist()
        ([1], [3, 4])

    """

    def __init__(self, uri: str, job: str, *, filesystem: pafs.FileSystem | None = None) -> None:
        if not isinstance(job, str) or not job or "/" in job or "\\" in job or job in (".", ".."):
            msg = f"job name {job!r} cannot name a checkpoint directory; use a non-empty name without '/'"
            raise PlanError(msg)
        self._uri = uri
        self._job = job
        self._given_filesystem = filesystem
        fs, base = (filesystem, uri) if filesystem is not None else open_uri(uri)
        self._fs: pafs.FileSystem = fs
        base = base.rstrip("/")
        self._root = f"{base}/{job}" if base else job
        self._writes = _writes_for(fs, self._root)
        try:
            self._fs.create_dir(self._root, recursive=True)
        except OSError as error:
            msg = f"cannot create checkpoint directory {self._root!r}: {error}; check that the storage is writable"
            raise CheckpointStorageError(msg, path=self._root) from error

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_storage, (self._uri, self._job, self._given_filesystem))

    def __repr__(self) -> str:
        return f"CheckpointStorage({self.uri!r}, {self._job!r})"

    @property
    def uri(self) -> str:
        """The storage URI (or path) this storage was opened with, without the job, credentials masked."""
        return redact_uri(self._uri)

    @property
    def job(self) -> str:
        """The job whose checkpoints this storage holds."""
        return self._job

    @property
    def root(self) -> str:
        """The job's checkpoint directory, as a path within :attr:`filesystem`."""
        return self._root

    @property
    def filesystem(self) -> pafs.FileSystem:
        """The ``pyarrow.fs`` filesystem the files live on."""
        return self._fs

    def checkpoint_path(self, checkpoint_id: int) -> str:
        """The directory of checkpoint ``checkpoint_id`` (``<root>/chk-<id:08d>``)."""
        if isinstance(checkpoint_id, bool) or not isinstance(checkpoint_id, int) or checkpoint_id < 0:
            msg = f"checkpoint id must be an integer >= 0, got {checkpoint_id!r}; pass the coordinator's checkpoint id"
            raise PlanError(msg)
        return f"{self._root}/chk-{checkpoint_id:08d}"

    # -- state files -------------------------------------------------------------------------------------------

    def write_state(self, checkpoint_id: int, task: str, operator: str, table: pa.Table) -> StateHandle:
        """Write one subtask's snapshot ``table`` as an Arrow IPC file of checkpoint ``checkpoint_id``.

        The file is ``<root>/chk-<id:08d>/<task>.<operator>.arrow`` with ``/`` in
        the names replaced by ``-``; on a local disk it is fsynced before this returns.

        Args:
            checkpoint_id: the checkpoint the snapshot belongs to.
            task: the subtask, such as ``"window_2/1"``.
            operator: the state's name within the subtask (``"keyed"``, ``"source"``...).
            table: the snapshot.

        Returns:
            The file's handle, to record in the manifest.

        Raises:
            CheckpointStorageError: the file cannot be written.

        """
        directory = self.checkpoint_path(checkpoint_id)
        return self._put(directory, f"{directory}/{_file_part(task, 'task')}.{_file_part(operator, 'operator')}.arrow",
                         table)

    def write_shared(self, task: str, operator: str, table: pa.Table) -> StateHandle:
        """Write one piece of an incremental snapshot as ``<root>/shared/<task>.<operator>.<random>.arrow``.

        A piece is immutable: later checkpoints that still hold it name the
        same file. :meth:`discard` deletes it once no complete checkpoint names it.

        Raises:
            CheckpointStorageError: the file cannot be written.
        """
        name = f"{_file_part(task, 'task')}.{_file_part(operator, 'operator')}.{uuid.uuid4().hex}.arrow"
        return self._put(f"{self._root}/{SHARED_DIR}", f"{self._root}/{SHARED_DIR}/{name}", table)

    def _put(self, directory: str, path: str, table: pa.Table | pa.Buffer, rows: int = -1) -> StateHandle:
        """Write a state file (a table as Arrow IPC, or a file's bytes with ``rows``); its handle."""
        try:
            data = ipc_file_bytes(table) if isinstance(table, pa.Table) else table
            self._writes.write(directory, path, data)
        except (OSError, pa.ArrowException) as error:
            msg = f"cannot write checkpoint state file {path!r}: {error}; check that the checkpoint storage is writable"
            raise CheckpointStorageError(msg, path=path) from error
        rows = table.num_rows if isinstance(table, pa.Table) else rows
        return StateHandle(path=path, bytes=data.size, rows=rows, crc32=zlib.crc32(data))

    def read_state(self, path: str | StateHandle) -> pa.Table:
        """Read a snapshot written by :meth:`write_state`.

        The file is read into memory rather than memory-mapped: a mapping of a
        file that is later rewritten in place would crash the process (SIGBUS).

        Args:
            path: the file's path within the filesystem, or its handle (then
                the file's size, and its CRC-32 where the handle has one, are
                checked against the handle's).

        Raises:
            CheckpointStorageError: the file is missing, truncated, does not
                match its handle or is not an Arrow IPC file.

        """
        handle = path if isinstance(path, StateHandle) else None
        path = path.path if isinstance(path, StateHandle) else path
        try:
            data = self._read_bytes(path)
            if handle is not None:
                problem = _mismatch(handle, data)
                if problem:
                    msg = (f"checkpoint state file {path!r} is damaged: {problem}; it is not restored: "
                           "restore from an older checkpoint")
                    raise CheckpointStorageError(msg, path=path)
            return ipc.open_file(pa.BufferReader(data)).read_all()
        except FileNotFoundError as error:
            msg = (f"checkpoint state file {path!r} does not exist; the checkpoint was deleted or never completed: "
                   "restore from the latest complete checkpoint")
            raise CheckpointStorageError(msg, path=path) from error
        except (OSError, pa.ArrowException) as error:
            msg = (f"cannot read checkpoint state file {path!r}: {error}; the file is damaged or not an arrow ipc "
                   "file: restore from an older checkpoint")
            raise CheckpointStorageError(msg, path=path) from error

    def read_bytes(self, handle: StateHandle) -> pa.Buffer:
        """A state file's bytes, checked against ``handle`` (its size, and its CRC-32 where recorded).

        Raises:
            CheckpointStorageError: the file is missing, damaged or unreadable.
        """
        try:
            data = self._read_bytes(handle.path)
        except FileNotFoundError as error:
            msg = f"checkpoint state file {handle.path!r} does not exist; the checkpoint was deleted"
            raise CheckpointStorageError(msg, path=handle.path) from error
        except OSError as error:
            msg = f"cannot read checkpoint state file {handle.path!r}: {error}; check that the storage is reachable"
            raise CheckpointStorageError(msg, path=handle.path) from error
        problem = _mismatch(handle, data)
        if problem:
            msg = f"checkpoint state file {handle.path!r} is damaged: {problem}"
            raise CheckpointStorageError(msg, path=handle.path)
        return data

    def write_bytes(self, checkpoint_id: int, name: str, data: pa.Buffer | bytes,
                    expected: StateHandle | None = None) -> StateHandle:
        """Write a state file's bytes as ``<checkpoint directory>/<name>`` (a copy, as a savepoint's import makes).

        Args:
            checkpoint_id: the checkpoint the file belongs to.
            name: the file name.
            data: the Arrow IPC file's bytes.
            expected: the handle the bytes came with: they are checked against it first.

        Raises:
            CheckpointStorageError: the bytes do not match ``expected``, or cannot be written.
        """
        directory = self.checkpoint_path(checkpoint_id)
        path = f"{directory}/{_file_part(name, 'file')}"
        buffer = data if isinstance(data, pa.Buffer) else pa.py_buffer(data)
        if expected is not None:
            problem = _mismatch(expected, buffer)
            if problem:
                msg = f"state file {expected.path!r} is damaged: {problem}; it was not copied"
                raise CheckpointStorageError(msg, path=expected.path)
        return self._put(directory, path, buffer, expected.rows if expected is not None else -1)

    def record_savepoint(self, entry: dict[str, Any]) -> None:
        """Note a savepoint taken of this job (``<root>/savepoints.jsonl``), for ``onceflow checkpoints list``."""
        self._append_line(SAVEPOINTS_NAME, entry, "savepoint list")

    def savepoints(self) -> list[dict[str, Any]]:
        """The savepoints taken of this job, oldest first (as recorded; a savepoint moved since is still listed)."""
        return self._read_lines(SAVEPOINTS_NAME, "savepoint list")

    def _read_bytes(self, path: str) -> pa.Buffer:
        with self._fs.open_input_file(path) as source:
            return source.read_buffer()

    def verify(self, checkpoint_id: int) -> list[str]:
        """Check checkpoint ``checkpoint_id`` without restoring it: its manifest and every state file it names.

        Returns:
            What is wrong, one line per damaged or missing file (empty when the
            checkpoint verifies); a checkpoint that never completed (no
            manifest) is one line too.

        Raises:
            CheckpointStorageError: the storage could not be read (not damage: it may be unreachable).

        """
        manifest, problem = self._manifest_and_problem(checkpoint_id)
        if manifest is None:
            return [problem or f"checkpoint {checkpoint_id} has no manifest: it never completed"]
        problems = []
        for task, entry in sorted(manifest.get("tasks", {}).items()):
            for operator, state in sorted(entry.get("states", {}).items()):
                for handle in state_handles(state):
                    try:
                        data = self._read_bytes(handle.path)
                    except FileNotFoundError:
                        problems.append(f"{handle.path}: missing (state {operator!r} of {task})")
                        continue
                    except OSError as error:
                        msg = f"cannot read {handle.path!r}: {error}; check that the checkpoint storage is reachable"
                        raise CheckpointStorageError(msg, path=handle.path) from error
                    mismatch = _mismatch(handle, data)
                    if mismatch:
                        problems.append(f"{handle.path}: {mismatch} (state {operator!r} of {task})")
        return problems

    # -- manifests ---------------------------------------------------------------------------------------------

    def write_manifest(self, manifest: dict[str, Any]) -> str:
        """Write checkpoint ``manifest["checkpoint_id"]``'s manifest atomically, completing the checkpoint.

        On a local disk: write to a temporary name in the checkpoint's
        directory, flush, fsync, rename over ``_manifest.json`` and fsync the
        directories; on another filesystem with a rename, write the temporary
        whole and move it. On an object store, put ``_manifest.json`` in one
        upload, which creates the object whole or not at all.

        Args:
            manifest: a JSON-serialisable mapping with at least ``checkpoint_id``.

        Returns:
            The manifest's path within the filesystem.

        Raises:
            PlanError: ``checkpoint_id`` is missing or not an integer.
            CheckpointStorageError: the manifest is not JSON-serialisable or cannot be written.

        """
        checkpoint_id = manifest.get("checkpoint_id") if isinstance(manifest, dict) else None
        directory = self.checkpoint_path(checkpoint_id)  # type: ignore[arg-type]  # validates the id
        final = f"{directory}/{MANIFEST_NAME}"
        try:
            body = {k: v for k, v in manifest.items() if k != _INTEGRITY}
            checksum = zlib.crc32(_canonical(body))
            data = json.dumps({**body, _INTEGRITY: {"format": MANIFEST_FORMAT, "crc32": checksum}},
                              allow_nan=False).encode()
        except (TypeError, ValueError) as error:
            msg = (f"manifest of checkpoint {checkpoint_id} is not json-serialisable: {error}; "
                   "store only str, int, float, bool, None, list and dict values")
            raise CheckpointStorageError(msg, path=final) from error
        self._write_atomically(directory, final, data, "checkpoint manifest")
        return final

    def _write_atomically(self, directory: str, final: str, data: bytes, what: str) -> None:
        """Create or replace ``final`` with ``data`` so that a reader sees all of it or the previous version."""
        try:
            self._writes.replace(directory, final, data)
        except OSError as error:
            msg = f"cannot write {what} {final!r}: {error}; check that the checkpoint storage is writable and has space"
            raise CheckpointStorageError(msg, path=final) from error

    # -- the lease ---------------------------------------------------------------------------------------------

    def read_lease(self) -> JobLease | None:
        """The job's storage lease (:mod:`onceflow.checkpoint.lease`), or ``None`` if no run holds one."""
        path = f"{self._root}/{LEASE_NAME}"
        for attempt in range(_LEASE_READS):
            try:
                with self._fs.open_input_stream(path) as source:
                    return JobLease.from_json(json.loads(source.read()))
            except FileNotFoundError:
                return None
            except (ValueError, KeyError, TypeError) as error:
                # An object store's read (size, then bytes) can meet a renewal replacing the object: read again.
                if attempt + 1 < _LEASE_READS:
                    continue
                if not self._exists(path):
                    return None
                msg = f"the job's lease {path!r} does not parse: {error}; delete it if no run of the job is running"
                raise CheckpointStorageError(msg, path=path) from error
            except OSError as error:
                if not self._exists(path):
                    return None
                msg = f"cannot read the job's lease {path!r}: {error}; check that the checkpoint storage is reachable"
                raise CheckpointStorageError(msg, path=path) from error
        return None  # not reached: the last attempt returns or raises

    def write_lease(self, lease: JobLease) -> None:
        """Replace the job's storage lease atomically (as a manifest is written)."""
        self._write_atomically(self._root, f"{self._root}/{LEASE_NAME}", json.dumps(lease.to_json()).encode(),
                               "the job's lease")

    def release_lease(self, run: str) -> None:
        """Give up ``run``'s lease (the job ended); a lease another run holds stays."""
        lease = self.read_lease()
        if lease is not None and lease.run == run:
            with contextlib.suppress(FileNotFoundError):
                self._fs.delete_file(f"{self._root}/{LEASE_NAME}")

    def _exists(self, path: str) -> bool:
        return bool(self._fs.get_file_info(path).type != pafs.FileType.NotFound)

    def manifest(self, checkpoint_id: int) -> dict[str, Any] | None:
        """Checkpoint ``checkpoint_id``'s manifest, or ``None`` if the checkpoint is not complete or is damaged.

        A missing, truncated or unparseable manifest (or one naming another
        checkpoint id) counts as not complete; one that parses but does not
        match its own CRC-32 is damaged (:meth:`verify` says so). The
        ``"_integrity"`` entry is not part of the returned mapping.

        Raises:
            CheckpointStorageError: the storage failed for another reason (so a
                transient error is never mistaken for an incomplete checkpoint).

        """
        return self._manifest_and_problem(checkpoint_id)[0]

    def _manifest_and_problem(self, checkpoint_id: int) -> tuple[dict[str, Any] | None, str | None]:
        """The manifest, or ``None`` with why: ``None`` when there is none, a line naming the file when damaged."""
        path = f"{self.checkpoint_path(checkpoint_id)}/{MANIFEST_NAME}"
        try:
            with self._fs.open_input_stream(path) as source:
                data = source.read()
        except FileNotFoundError:
            return None, None
        except OSError as error:
            msg = f"cannot read checkpoint manifest {path!r}: {error}; check that the checkpoint storage is reachable"
            raise CheckpointStorageError(msg, path=path) from error
        try:
            manifest = json.loads(data)
        except ValueError:  # truncated, torn or not utf-8
            return None, None
        if not isinstance(manifest, dict) or manifest.get("checkpoint_id") != checkpoint_id:
            return None, None
        integrity = manifest.pop(_INTEGRITY, None)
        if integrity is not None:
            expected = integrity.get("crc32") if isinstance(integrity, dict) else None
            if expected != zlib.crc32(_canonical(manifest)):
                return None, f"{path}: the manifest does not match its own CRC-32 (damaged)"
        return manifest, None

    def damaged_manifest(self, checkpoint_id: int) -> str | None:
        """A line naming checkpoint ``checkpoint_id``'s manifest if it is there but damaged, else ``None``."""
        return self._manifest_and_problem(checkpoint_id)[1]

    def latest_manifest(self, run: str | None = None) -> dict[str, Any] | None:
        """The newest complete checkpoint's manifest (the recovery point), or ``None`` if there is none.

        Args:
            run: only a checkpoint taken by this run of the job (its manifest's ``"run"``); ``None``: any run.
        """
        for checkpoint_id in reversed(self._checkpoint_ids()):
            manifest = self.manifest(checkpoint_id)
            if manifest is not None and (run is None or manifest.get("run") == run):
                return manifest
        return None

    def latest_id(self, run: str, otherwise: int | None = None) -> int | None:
        """The id of ``run``'s newest complete checkpoint, or ``otherwise`` (the one it resumed from) if none."""
        manifest = self.latest_manifest(run=run)
        return int(manifest["checkpoint_id"]) if manifest is not None else otherwise

    def written_ids(self) -> list[int]:
        """The ids of the checkpoints whose manifest was written (complete, or damaged since), ascending."""
        return [checkpoint_id for checkpoint_id in self._checkpoint_ids()
                if self._manifest_and_problem(checkpoint_id) != (None, None)]

    def completed_ids(self) -> list[int]:
        """The ids of the complete checkpoints (with a valid manifest), ascending."""
        return [checkpoint_id for checkpoint_id in self._checkpoint_ids() if self.manifest(checkpoint_id) is not None]

    def _checkpoint_ids(self) -> list[int]:
        """The ids of every checkpoint directory, complete or not, ascending."""
        try:
            infos = self._fs.get_file_info(pafs.FileSelector(self._root, allow_not_found=True))
        except OSError as error:
            msg = (f"cannot list checkpoint directory {self._root!r}: {error}; "
                   "check that the checkpoint storage is reachable")
            raise CheckpointStorageError(msg, path=self._root) from error
        ids = []
        for info in infos:
            match = _CHECKPOINT_DIR.fullmatch(info.base_name)
            if info.type == pafs.FileType.Directory and match and info.base_name == f"chk-{int(match[1]):08d}":
                ids.append(int(match[1]))
        return sorted(ids)

    # -- deletion ----------------------------------------------------------------------------------------------

    def discard(self, checkpoint_id: int) -> None:
        """Delete checkpoint ``checkpoint_id`` (its manifest first); a missing checkpoint is fine.

        Shared pieces of incremental snapshots it names are deleted too, unless
        another checkpoint's manifest (complete or damaged) names them.

        Raises:
            CheckpointStorageError: the files cannot be deleted.

        """
        directory = self.checkpoint_path(checkpoint_id)
        shared = self._shared_paths(checkpoint_id)
        self._discard_directory(directory)
        if shared:
            still = set().union(*(self._shared_paths(other) for other in self._checkpoint_ids()))
            for path in sorted(shared - still):
                with contextlib.suppress(FileNotFoundError):
                    self._delete(path)

    def discard_unreferenced_shared(self) -> list[str]:
        """Delete the shared pieces no checkpoint's manifest names (left by checkpoints that never completed).

        Call it only while no checkpoint is in flight (a piece written for one
        is not named by any manifest yet): the coordinator does, when it starts.

        Returns:
            The deleted paths.
        """
        try:
            infos = self._fs.get_file_info(pafs.FileSelector(f"{self._root}/{SHARED_DIR}", allow_not_found=True))
        except OSError as error:
            msg = f"cannot list {self._root}/{SHARED_DIR!r}: {error}; check that the checkpoint storage is reachable"
            raise CheckpointStorageError(msg, path=self._root) from error
        named = set().union(*(self._shared_paths(c) for c in self._checkpoint_ids()))
        orphans = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path not in named)
        for path in orphans:
            with contextlib.suppress(FileNotFoundError):
                self._delete(path)
        return orphans

    def _shared_paths(self, checkpoint_id: int) -> set[str]:
        """The shared pieces checkpoint ``checkpoint_id``'s manifest names (none without a readable manifest)."""
        manifest, _ = self._manifest_and_problem(checkpoint_id)
        if manifest is None:
            manifest = self._raw_manifest(checkpoint_id)  # a damaged manifest still protects its files
        prefix = f"{self._root}/{SHARED_DIR}/"
        return {handle.path for entry in (manifest or {}).get("tasks", {}).values()
                for state in entry.get("states", {}).values() for handle in state_handles(state)
                if handle.path.startswith(prefix)}

    def _raw_manifest(self, checkpoint_id: int) -> dict[str, Any] | None:
        try:
            with self._fs.open_input_stream(f"{self.checkpoint_path(checkpoint_id)}/{MANIFEST_NAME}") as source:
                manifest = json.loads(source.read())
        except (OSError, ValueError):
            return None
        return manifest if isinstance(manifest, dict) else None

    def _delete(self, path: str) -> None:
        try:
            self._fs.delete_file(path)
        except FileNotFoundError:
            raise
        except OSError as error:
            msg = f"cannot delete {path!r}: {error}; check the storage's permissions"
            raise CheckpointStorageError(msg, path=path) from error

    def _discard_directory(self, directory: str) -> None:
        try:
            with contextlib.suppress(FileNotFoundError):
                self._fs.delete_file(f"{directory}/{MANIFEST_NAME}")
            with contextlib.suppress(FileNotFoundError):
                self._fs.delete_dir(directory)
        except OSError as error:
            msg = f"cannot delete checkpoint directory {directory!r}: {error}; check the storage's permissions"
            raise CheckpointStorageError(msg, path=directory) from error

    def discard_incomplete(self, older_than: int | None = None) -> list[int]:
        """Delete the checkpoints without a valid manifest (only those with id < ``older_than``, if given).

        Pass ``older_than`` while a checkpoint may be in flight: an in-flight
        checkpoint has no manifest yet either.

        Returns:
            The deleted ids, ascending.

        """
        deleted = [checkpoint_id for checkpoint_id in self._checkpoint_ids()
                   if (older_than is None or checkpoint_id < older_than)
                   and self._manifest_and_problem(checkpoint_id) == (None, None)]
        for checkpoint_id in deleted:
            self.discard(checkpoint_id)
        return deleted

    def retain(self, keep: int) -> list[int]:
        """Keep the newest ``keep`` complete checkpoints; delete older complete and incomplete ones.

        Incomplete checkpoints newer than the oldest one kept are left alone
        (they may be in flight); older ones are subsumed by a newer complete one.

        Returns:
            The deleted ids, ascending.

        Raises:
            PlanError: ``keep`` is below 1.

        """
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            msg = f"retain keep must be an integer >= 1, got {keep!r}; keep at least the newest complete checkpoint"
            raise PlanError(msg)
        all_ids = self._checkpoint_ids()
        completed = [checkpoint_id for checkpoint_id in all_ids if self.manifest(checkpoint_id) is not None]
        if not completed:
            return []
        kept = set(completed[-keep:])
        oldest_kept = min(kept)
        deleted = [checkpoint_id for checkpoint_id in all_ids
                   if checkpoint_id not in kept and (checkpoint_id in completed or checkpoint_id < oldest_kept)]
        for checkpoint_id in deleted:
            self.discard(checkpoint_id)
        return deleted

    # -- history -----------------------------------------------------------------------------------------------

    def append_history(self, entry: dict[str, Any]) -> None:
        """Append ``entry`` as one JSON line to ``<root>/checkpoint-history.jsonl``.

        Raises:
            CheckpointStorageError: the entry is not JSON-serialisable or cannot be written.

        """
        self._append_line(HISTORY_NAME, entry, "checkpoint history")

    def history(self) -> list[dict[str, Any]]:
        """The history entries, oldest first; torn or unparseable lines are skipped.

        Raises:
            CheckpointStorageError: the history exists but cannot be read.

        """
        return self._read_lines(HISTORY_NAME, "checkpoint history")

    def append_events(self, entries: list[dict[str, Any]]) -> None:
        """Append ``entries`` (a job's lifecycle events) as JSON lines to ``<root>/events.jsonl``.

        Raises:
            CheckpointStorageError: an entry is not JSON-serialisable or cannot be written.

        """
        self._append_line(EVENTS_NAME, entries, "event log")

    def events(self) -> list[dict[str, Any]]:
        """The job's lifecycle events, oldest first; torn or unparseable lines are skipped.

        Raises:
            CheckpointStorageError: the event log exists but cannot be read.

        """
        return self._read_lines(EVENTS_NAME, "event log")

    def _append_line(self, name: str, entries: dict[str, Any] | list[dict[str, Any]], what: str) -> None:
        """Append JSON lines to ``<root>/<name>``.

        A torn last line left by a crash is ended first, so the new line stays readable.
        Filesystems without appends rewrite the file whole (one upload on an object store).
        """
        path = f"{self._root}/{name}"
        try:
            lines = b"".join(json.dumps(entry, allow_nan=False).encode() + b"\n"
                             for entry in (entries if isinstance(entries, list) else [entries]))
        except (TypeError, ValueError) as error:
            msg = (f"{what} entry is not json-serialisable: {error}; "
                   "store only str, int, float, bool, None, list and dict values")
            raise CheckpointStorageError(msg, path=path) from error
        try:
            self._writes.append(path, lines)
        except OSError as error:
            msg = f"cannot append to {what} {path!r}: {error}; check that the checkpoint storage is writable"
            raise CheckpointStorageError(msg, path=path) from error

    def _read_lines(self, name: str, what: str) -> list[dict[str, Any]]:
        path = f"{self._root}/{name}"
        try:
            with self._fs.open_input_stream(path) as source:
                data = source.read()
        except FileNotFoundError:
            return []
        except OSError as error:
            msg = f"cannot read {what} {path!r}: {error}; check that the checkpoint storage is reachable"
            raise CheckpointStorageError(msg, path=path) from error
        entries = []
        for line in data.splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict):
                entries.append(entry)
        return entries


def ipc_file_bytes(table: pa.Table) -> pa.Buffer:
    """``table`` as the bytes of an Arrow IPC file, as :meth:`CheckpointStorage.write_state` writes it.

    The same table always gives the same bytes, so a copy of a snapshot kept
    elsewhere (the Ray object store) can be checked against the file's CRC-32.
    """
    buffer = pa.BufferOutputStream()
    with ipc.new_file(buffer, table.schema) as writer:
        writer.write(table)
    return buffer.getvalue()


def matches(handle: StateHandle, table: pa.Table) -> bool:
    """Whether ``table`` is the snapshot ``handle`` recorded (its IPC bytes have the recorded size and CRC-32)."""
    return _mismatch(handle, ipc_file_bytes(table)) is None


def _canonical(manifest: dict[str, Any]) -> bytes:
    """The bytes a manifest's CRC-32 covers: its JSON with sorted keys."""
    return json.dumps(manifest, sort_keys=True, allow_nan=False, separators=(",", ":")).encode()


def _mismatch(handle: StateHandle, data: pa.Buffer) -> str | None:
    """Why ``data`` is not the file ``handle`` describes, or ``None`` when it is."""
    if data.size != handle.bytes:
        return f"{data.size} bytes, the manifest says {handle.bytes}"
    if handle.crc32 is not None and zlib.crc32(data) != handle.crc32:
        return f"CRC-32 {zlib.crc32(data):08x}, the manifest says {handle.crc32:08x}"
    return None


def _rebuild_storage(uri: str, job: str, filesystem: pafs.FileSystem | None) -> CheckpointStorage:
    return CheckpointStorage(uri, job, filesystem=filesystem)
