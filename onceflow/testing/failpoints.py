"""One-shot crash points for failure tests (as FoundationDB's and TiKV's failpoints).

A test *arms* a failpoint with :func:`arm`; the next process that reaches
``crash_point(job, name)`` removes the flag and exits at once with
``os._exit`` (no cleanup, no exception handling: a real crash). A *pause*
point (:func:`arm_pause`) instead holds the first process that reaches it
until the test calls :func:`release`, so a test can make a failure land while
a step (a manifest write, say) is in flight. Flags are
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

import contextvars
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["CRASH", "PAUSE_POINTS", "POINTS", "arm", "arm_pause", "armed", "crash_point", "disarm", "disarm_all",
           "pause_point", "paused", "release"]

POINTS = (
    "sink.after_write",
    "sink.after_pre_commit",
    "sink.before_commit",
    "sink.mid_commit",
    "coordinator.after_manifest",
    "subtask.fence",
    "subtask.reset",
)
"""The crash points the runtime and the sinks pass through (``subtask.fence`` and ``subtask.reset``: a surviving
actor fenced, or reset for the next attempt, during a restart in place)."""

PAUSE_POINTS = ("coordinator.before_manifest",)
"""The pause points: ``coordinator.before_manifest`` holds a fully acknowledged checkpoint's manifest write."""

_DIRECTORY = os.path.join(tempfile.gettempdir(), "onceflow-failpoints")


def _exit() -> None:
    os._exit(70)


CRASH: contextvars.ContextVar[Callable[[], None]] = contextvars.ContextVar("onceflow_crash", default=_exit)
"""What a crash point does when it fires: exit the process (an actor of the in-process executor kills itself)."""


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


def disarm(job: str, name: str, *, directory: str | None = None) -> None:
    """Remove failpoint ``name`` of ``job`` if it is still armed (it never fired); other jobs' stay armed."""
    _flag(job, name, directory).unlink(missing_ok=True)


def crash_point(job: str, name: str, subtask: int | None = None) -> None:
    """Crash this process here if ``name`` (or ``name.<subtask>``) is armed for ``job``.

    In an actor of the in-process executor (``executor="local"``), the actor
    dies instead of the process: its pending calls fail as an actor death.
    """
    for candidate in (name, f"{name}.{subtask}") if subtask is not None else (name,):
        flag = _flag(job, candidate, None)
        if flag.exists():
            try:
                flag.unlink()
            except FileNotFoundError:
                continue  # another process took it
            CRASH.get()()


def arm_pause(job: str, name: str, *, directory: str | None = None) -> None:
    """Make the first process that reaches pause point ``name`` in ``job`` wait until :func:`release`."""
    if name not in PAUSE_POINTS:
        msg = f"unknown pause point {name!r}; use one of {', '.join(PAUSE_POINTS)}"
        raise ValueError(msg)
    flag = _flag(job, f"{name}.pause", directory)
    flag.parent.mkdir(parents=True, exist_ok=True)
    flag.touch()


def paused(job: str, name: str, *, directory: str | None = None) -> str | None:
    """What the process held at pause point ``name`` said of itself (a checkpoint id...), or ``None``."""
    try:
        return _flag(job, f"{name}.reached", directory).read_text()
    except FileNotFoundError:
        return None


def release(job: str, name: str, *, directory: str | None = None) -> None:
    """Let the process held at pause point ``name`` go on (and disarm it)."""
    _flag(job, f"{name}.pause", directory).unlink(missing_ok=True)


def pause_point(job: str, name: str, detail: str = "") -> None:
    """Wait here while pause point ``name`` is armed for ``job`` (only the first process to arrive waits)."""
    flag = _flag(job, f"{name}.pause", None)
    if not flag.exists():
        return
    reached = _flag(job, f"{name}.reached", None)
    try:
        with reached.open("x") as marker:  # the first to arrive holds; later ones pass
            marker.write(detail)
    except FileExistsError:
        return
    while flag.exists():
        time.sleep(0.01)
