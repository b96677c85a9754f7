"""The live view of a job: a hook ``of.run`` calls, and a ``rich`` rendering of a job's view.

``onceflow run JOB.py`` installs :class:`RichProgress` before it runs the
script; every ``of.run``/``of.submit`` in the script then shows the job live,
a few times a second, until it ends. ``onceflow watch JOB`` shows the same
view of a job running elsewhere on the cluster (through its monitor actor).

What a frame shows (:func:`render_view`): the status, attempt and uptime, and
while restarting the cause; events in and out, events/s over the last seconds
(the job's average once it ended); the watermark and its lag; the checkpoint
in progress and the last completed one; every restart with its time, the
failed actor, its node, the cause and how long recovery took; and one row per
operator (records in and out, back-pressured time, state size and alignment at
the last checkpoint, and the age of figures that could not be refreshed).
"""

from __future__ import annotations

import datetime
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Group

    from onceflow.runtime.job import JobHandle

__all__ = ["RichProgress", "current", "install", "render_view", "watermark_lag"]

_installed: Callable[[JobHandle], Any] | None = None

_LIVE_EVENT_TIME_S = 7 * 24 * 3600.0
"""A watermark within this much of the wall clock is live event time: its lag is measured against the clock."""

_STATUS_STYLE = {"RUNNING": "green", "RESTARTING": "yellow", "FINISHED": "green", "FAILED": "red",
                 "CANCELLED": "red", "STARTING": "cyan"}


def install(factory: Callable[[JobHandle], Any] | None) -> None:
    """Make every job started from now on report to ``factory(handle)`` (``None`` removes it)."""
    global _installed
    _installed = factory


def current() -> Callable[[JobHandle], Any] | None:
    """The installed progress factory, if any."""
    return _installed


def watermark_lag(view: dict[str, Any], now: float | None = None) -> tuple[float, str] | None:
    """How far the watermark trails, in seconds, and behind what: ``"wall clock"`` or ``"newest event"``.

    A watermark near the wall clock (live data) is compared with the clock; an
    older one (a replay, a synthetic time axis) with the newest event time the
    sources read. ``None`` before there is a watermark.

    Example:
        >>> watermark_lag({"watermark": 9_000, "max_event_time": 12_000})
        (3.0, 'newest event')
        >>> watermark_lag({"watermark": 1_000_000_000_000 - 1_500, "max_event_time": None}, now=1_000_000_000.0)
        (1.5, 'wall clock')
    """
    watermark = view.get("watermark")
    if watermark is None:
        return None
    now = time.time() if now is None else now
    if abs(now - watermark / 1000) < _LIVE_EVENT_TIME_S:
        return now - watermark / 1000, "wall clock"
    newest = view.get("max_event_time")
    if newest is None:
        return None
    return max(newest - watermark, 0) / 1000, "newest event"


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _clock(at: float) -> str:
    return datetime.datetime.fromtimestamp(at).strftime("%H:%M:%S")


def _seconds(s: float | None) -> str:
    return "-" if s is None else f"{s:,.3f} s" if s < 10 else f"{s:,.1f} s"


def render_view(view: dict[str, Any]) -> Group:
    """A ``rich`` rendering of a job's view (:meth:`JobHandle.view <onceflow.runtime.job.JobHandle.view>`)."""
    from rich.console import Group
    from rich.table import Table

    status = view.get("status", "STARTING")
    phase = view.get("phase", "")
    detail = f" ({phase})" if status in ("RUNNING", "RESTARTING") and phase not in ("", "running") else ""
    title = (f"onceflow job {view.get('job')!r}  [{_STATUS_STYLE.get(status, 'white')}]{status}[/]{detail}"
             f"  attempt {view.get('attempt', 1)}  ({view.get('uptime_s', 0.0):.1f} s)")
    summary = Table(title=title, show_header=False, min_width=60)
    summary.add_column("figure", style="cyan")
    summary.add_column("value", justify="right")
    if view.get("cause"):
        summary.add_row("cause", f"[yellow]{view['cause']}[/]")
    summary.add_row("events in", f"{view.get('events_in', 0):,}")
    summary.add_row("events out", f"{view.get('events_out', 0):,}")
    label = "events/s (average)" if view.get("ended") else "events/s (last 5 s)"
    summary.add_row(label, f"{view.get('events_per_s', 0.0):,.0f}")
    watermark = view.get("watermark")
    if watermark is None and status == "FINISHED":
        summary.add_row("watermark", "end of input (every window fired)")
    else:
        summary.add_row("watermark", "-" if watermark is None else f"{watermark:,}")
    lag = watermark_lag(view)
    summary.add_row("watermark lag", "-" if lag is None else f"{lag[0]:,.3f} s behind the {lag[1]}")
    if view.get("late_events"):
        summary.add_row("late events", f"{view['late_events']:,}")
    if view.get("dead_letters"):
        summary.add_row("dead letters", f"{view['dead_letters']:,}")
    summary.add_row("backpressure", f"{view.get('backpressure_s', 0.0):,.1f} s")
    checkpoints = view.get("checkpoints") or {}
    if view.get("checkpointing", True):
        flight = checkpoints.get("in_progress") or []
        summary.add_row("checkpoint in progress", ", ".join(
            f"{c['checkpoint_id']} ({c['acknowledged']}/{c['tasks']} acks, {c['age_s']:.1f} s)" for c in flight)
            or "-")
        last = checkpoints.get("last")
        latest = checkpoints.get("latest")
        if last:
            summary.add_row("last checkpoint", f"{last['checkpoint_id']} at {_clock(last['completed_at'])} in "
                            f"{_seconds(last['duration_s'])}, {_size(last['state_bytes'])}")
        else:
            summary.add_row("last checkpoint", "-" if latest is None else str(latest))
        summary.add_row("checkpoints", f"{checkpoints.get('completed', 0)} completed, "
                        f"{checkpoints.get('failed', 0)} failed")
    else:
        summary.add_row("checkpoints", "off")
    restarts = view.get("restarts") or []
    summary.add_row("restarts", str(len(restarts)))
    parts: list[Any] = [summary]
    if restarts:
        table = Table(title="restarts", min_width=60)
        for column in ("at", "attempt", "failed actor", "node", "cause", "restored", "recovery"):
            table.add_column(column, justify="right" if column in ("attempt", "recovery") else "left")
        for r in restarts[-5:]:
            table.add_row(_clock(r["at"]), str(r["attempt"]), r.get("actor") or "-", (r.get("node") or "-")[:8],
                          r.get("cause") or "-", "-" if r.get("restored_from") is None else str(r["restored_from"]),
                          _seconds(r.get("recovery_s")))
        parts.append(table)
    operators = view.get("operators") or {}
    if operators:
        table = Table(title=f"operators (attempt {view.get('attempt', 1)})", min_width=60)
        for column in ("operator", "task", "records in", "records out", "backpressure", "state", "alignment",
                       "figures age"):
            table.add_column(column, justify="left" if column in ("operator", "task") else "right")
        for name, op in operators.items():
            age = op.get("age_s")
            table.add_row(name, f"{op['task']} x{op['subtasks']}", f"{op['records_in']:,}", f"{op['records_out']:,}",
                          f"{op['backpressure_s']:,.1f} s", _size(op.get("state_bytes")),
                          _seconds(op.get("alignment_s")),
                          f"[yellow]{age:.1f} s[/]" if age is not None and age >= 2 else "fresh")
        parts.append(table)
    return Group(*parts)


class RichProgress:
    """Renders a job's view with ``rich.live`` a few times a second, and its final view when it ends."""

    def __init__(self, handle: JobHandle, period_s: float = 0.25) -> None:
        self._handle = handle
        self._period_s = period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="onceflow-progress")
        self._thread.start()

    def _run(self) -> None:
        from rich.live import Live

        with Live(render_view(self._handle.view()), refresh_per_second=4, transient=False) as live:
            while not self._stop.wait(self._period_s):
                live.update(render_view(self._handle.view()))
            live.update(render_view(self._handle.view()))

    def close(self) -> None:
        """Render the final view and stop."""
        self._stop.set()
        self._thread.join(timeout=5)
