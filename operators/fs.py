"""Filesystem helpers the file sources and sinks share, over any ``pyarrow.fs`` filesystem.

A path option is a plain local path or a ``pyarrow.fs`` URI (``file:///data``,
``s3://bucket/prefix``): :func:`absolute_path` fixes a local one on the driver
(so workers in other directories see the same files) and
:func:`resolve_filesystem` turns either into a filesystem and a path in it.
Names starting with ``_`` or ``.`` are *hidden* (:data:`HIDDEN_PREFIXES`), as
for :func:`pyarrow.dataset.dataset`: sources skip them
(:func:`list_data_files`) and the Parquet sink keeps its uncommitted files
under such names. :func:`fsync_file` and :func:`fsync_directory` make a
local write or rename durable; other filesystems are durable on close.

Example:
    >>> import os, tempfile
    >>> folder = tempfile.mkdtemp()
    >>> for name in ("b.parquet", "a.parquet", "_pending.parquet", "notes.txt"):
    ...     open(os.path.join(folder, name), "w").close()
    >>> fs, path = resolve_filesystem(folder)
    >>> [os.path.basename(f) for f in list_data_files(fs, path, (".parquet",), operator="source_0", kind="parquet")]
    ['a.parquet', 'b.parquet']
    >>> delete_file(fs, os.path.join(folder, "a.parquet")), exists(fs, os.path.join(folder, "a.parquet"))
    (None, False)

"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

import pyarrow.fs as pafs

from onceflow.errors import PlanError

__all__ = [
    "HIDDEN_PREFIXES",
    "absolute_path",
    "delete_file",
    "exists",
    "fsync_directory",
    "fsync_file",
    "is_hidden",
    "list_data_files",
    "resolve_filesystem",
]

HIDDEN_PREFIXES = ("_", ".")
"""Name prefixes of hidden files and directories: readers skip them, writers stage files under them."""


def absolute_path(path: str | os.PathLike[str]) -> str:
    """Return ``path`` as a string, made absolute unless it is a URI.

    Example:
        >>> absolute_path("s3://bucket/out"), absolute_path("/data/../out")
        ('s3://bucket/out', '/out')

    """
    text = os.fspath(path)
    return text if "://" in text else os.path.abspath(os.path.expanduser(text))


def resolve_filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """Return the filesystem and the path in it for a plain path or a URI.

    Args:
        path: a local path (made absolute) or a ``pyarrow.fs`` URI
            (``file:///data``, ``s3://bucket/key``).

    Returns:
        ``(filesystem, path inside it)``.

    """
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), absolute_path(path)


def is_hidden(relative: str) -> bool:
    """Whether a path relative to a searched directory has a hidden part (a name starting with ``_`` or ``.``).

    Example:
        >>> is_hidden("2024/_tmp/a.parquet"), is_hidden("2024/a.parquet")
        (True, False)

    """
    return any(part.startswith(HIDDEN_PREFIXES) for part in relative.split("/"))


def list_data_files(fs: pafs.FileSystem, path: str, suffixes: Sequence[str], *, operator: str, kind: str) -> list[str]:
    """Return the data files at ``path``: the file itself, or a directory's files.

    A directory is searched recursively for names ending in one of
    ``suffixes``; hidden names and directories (:func:`is_hidden`) are
    skipped. The result is sorted.

    Args:
        fs: the filesystem.
        path: a file or directory in ``fs``.
        suffixes: the file name endings to keep (``".parquet"``).
        operator: the source operator's name, for errors.
        kind: the source kind (``"parquet"``), for errors.

    Returns:
        The sorted file paths.

    Raises:
        PlanError: ``path`` does not exist.

    """
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        msg = f"{kind} source {operator}: path '{path}' does not exist; pass an existing file or directory"
        raise PlanError(msg)
    if info.type != pafs.FileType.Directory:
        return [path]
    base = path.rstrip("/")
    files = []
    for entry in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
        if entry.type != pafs.FileType.File or not entry.path.endswith(tuple(suffixes)):
            continue
        if is_hidden(entry.path[len(base) :].lstrip("/")):
            continue
        files.append(entry.path)
    return sorted(files)


def exists(fs: pafs.FileSystem, path: str) -> bool:
    """Whether anything (a file or a directory) is at ``path``."""
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def delete_file(fs: pafs.FileSystem, path: str) -> None:
    """Delete the file at ``path``; a missing file is no error (deleting is idempotent)."""
    with contextlib.suppress(FileNotFoundError):
        fs.delete_file(path)


def fsync_file(fs: pafs.FileSystem, path: str) -> None:
    """Flush a closed local file to disk (other filesystems are durable on close)."""
    if isinstance(fs, pafs.LocalFileSystem):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_directory(fs: pafs.FileSystem, directory: str) -> None:
    """Make renames in a local directory durable (other filesystems need nothing)."""
    if isinstance(fs, pafs.LocalFileSystem) and hasattr(os, "O_DIRECTORY"):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
