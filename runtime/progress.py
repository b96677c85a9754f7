"""Live progress of running jobs: a hook ``of.run`` calls, and a ``rich`` display.

``onceflow run JOB.py`` installs :class:`RichProgress` before it runs the
script; every ``of.run``/``JobHandle.wait`` in the script then shows events in
and out, events/s, the watermark lag, the last checkpoint and restarts, updated
a few times a second.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from onceflow.runtime.job import JobHandle

__all__ = ["RichProgress", "current", "install", "render_table"]

_installed: Callable[[JobHandle], Any] | None = None


def install(factory: Callable[[JobHandle], Any] | None) -> None:
    """Make every job started from now on report to ``factory(handle)`` (``None`` removes it)."""
    global _installed
    _installed = factory


def current() -> Callable[[JobHandle], Any] | None:
    """The installed progress factory, if any."""
    return _installed


def render_table(job: str, metrics: dict[str, Any], rate: float, elapsed: float) -> Any:
    """A ``rich`` table of a job's live figures."""
    from rich.table import Table

    table = Table(title=f"onceflow job {job!r}  ({elapsed:.1f} s)", show_header=False, min_width=48)
    table.add_column("figure", style="cyan")
    table.add_column("value", justify="right")
    watermark = metrics.get("watermark")
    lag = f"{time.time() * 1000 - watermark:,.0f} ms" if isinstance(watermark, int) and watermark > 0 else "-"
    latest = metrics.get("latest_checkpoint")
    last = metrics.get("checkpoint_history") or [{}]
    table.add_row("events in", f"{metrics.get('events_in', 0):,}")
    table.add_row("events out", f"{metrics.get('events_out', 0):,}")
    table.add_row("events/s", f"{rate:,.0f}")
    table.add_row("watermark", f"{watermark:,}" if isinstance(watermark, int) else "-")
    table.add_row("watermark lag (wall clock)", lag)
    table.add_row("last checkpoint", "-" if latest is None else
                  f"{latest} in {last[-1].get('duration_s', 0.0):.3f} s")
    table.add_row("restarts", str(metrics.get("restarts", 0)))
    table.add_row("backpressure", f"{metrics.get('backpressure_s', 0.0):.1f} s")
    return table


class RichProgress:
    """Polls a job's metrics in a thread and renders them with ``rich.live``."""

    def __init__(self, handle: JobHandle, period_s: float = 0.25) -> None:
        self._handle = handle
        self._period_s = period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="onceflow-progress")
        self._thread.start()

    def _run(self) -> None:
        from rich.live import Live

        started = time.monotonic()
        previous = (started, 0)
        with Live(render_table(self._handle.job, {}, 0.0, 0.0), refresh_per_second=4, transient=False) as live:
            while not self._stop.wait(self._period_s):
                try:
                    metrics = self._handle.metrics(timeout_s=2.0)
                except Exception:  # noqa: BLE001, S112 - restarting: show the last figures
                    continue
                now = time.monotonic()
                rate = (metrics["events_in"] - previous[1]) / max(now - previous[0], 1e-9)
                previous = (now, metrics["events_in"])
                live.update(render_table(self._handle.job, metrics, max(rate, 0.0), now - started))

    def close(self) -> None:
        """Stop updating."""
        self._stop.set()
        self._thread.join(timeout=5)
