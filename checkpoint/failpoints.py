"""One-shot crash points for failure tests (as FoundationDB's and TiKV's failpoints).

A test *arms* a failpoint with :func:`arm`; the next process that reaches
``crash_point(job, name)`` removes the flag and exits at once with
``os._exit`` (no cleanup, no exception handling: a real crash). Flags are
files in a directory on this machine, so a failpoint armed in the test
process fires in whichever Ray worker reaches it first. Unarmed, a crash
point costs one ``os.path.exists`` call on a path that does not exist.

Example:
    >>> import tempfile
    >>> directory = tempfile.mkdtemp()
    >>> arm("job", "sink.after_pre_commit", directory=directory)
    >>> armed("job", "sink.after_pre_commit", directory=directory)
    True
    >>> disarm_all(directory=directory)
    >>> armed("job", "sink.after_pre_commit", directory=directory)
    False
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["POINTS", "arm", "armed", "crash_point", "disarm_all"]

POINTS = (
    "sink.after_write",
    "sink.after_pre_commit",
    "sink.before_commit",
    "sink.mid_commit",
    "coordinator.after_manifest",
)
"""The crash points the runtime and the sinks pass through."""

_DIRECTORY = os.path.join(tempfile.gettempdir(), "onceflow-failpoints")


def _flag(job: str, name: str, directory: str | None) -> Path:
    return Path(directory or _DIRECTORY) / f"{job}.{name}"


def arm(job: str, name: str, *, directory: str | None = None) -> None:
    """Make the next process that reaches ``name`` in ``job`` crash.

    ``name`` is one of :data:`POINTS`, optionally followed by ``.<subtask>``
    to crash only that subtask (``"sink.before_commit.1"``).
    """
    base = name.rsplit(".", 1)[0] if name.rsplit(".", 1)[-1].isdigit() else name
    if base not in POINTS:
        msg = f"unknown failpoint {name!r}; use one of {', '.join(POINTS)}"
        raise ValueError(msg)
    flag = _flag(job, name, directory)
    flag.parent.mkdir(parents=True, exist_ok=True)
    flag.touch()


def armed(job: str, name: str, *, directory: str | None = None) -> bool:
    """Whether ``name`` is armed for ``job``."""
    return _flag(job, name, directory).exists()


def disarm_all(*, directory: str | None = None) -> None:
    """Remove every armed failpoint."""
    for flag in Path(directory or _DIRECTORY).glob("*"):
        flag.unlink(missing_ok=True)


def crash_point(job: str, name: str, subtask: int | None = None) -> None:
    """Crash this process here if ``name`` (or ``name.<subtask>``) is armed for ``job``."""
    for candidate in (name, f"{name}.{subtask}") if subtask is not None else (name,):
        flag = _flag(job, candidate, None)
        if flag.exists():
            try:
                flag.unlink()
            except FileNotFoundError:
                continue  # another process took it
            os._exit(70)
