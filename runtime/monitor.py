"""Watching a job from anywhere: the ``<job>/monitor`` actor, the driver's observer, and the clients of both.

A job's driver runs an :class:`Observer` thread. Twice a second it asks the
job for a *view* (a JSON-able dict: status, attempt and cause, counts,
events/s, watermark, checkpoints in flight and completed, restarts, one row
per operator; see :meth:`JobHandle.view <onceflow.runtime.job.JobHandle.view>`),
records the checkpoint outcomes in the job's event log, and publishes the view
to the job's :class:`JobMonitor`, a small named actor in the ``onceflow``
namespace. Any process connected to the cluster finds a job's monitor by name:
``onceflow jobs`` lists them, ``onceflow watch JOB`` shows one live, and
``onceflow stop JOB`` and ``onceflow cancel JOB`` leave a request there, which
the observer hands to the job's supervisor as if the handle's own ``stop()``
or ``cancel()`` had been called.

The monitor only observes and relays: killing it loses nothing of the job
(the observer starts a new one), and it is removed with the job's other actors.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from onceflow.runtime.ray_env import NAMESPACE

if TYPE_CHECKING:
    from collections.abc import Callable

    from onceflow.runtime.events import JobEvents
    from onceflow.runtime.executor import Executor

__all__ = ["MONITOR", "REQUESTS", "JobMonitor", "Observer", "find_monitor", "list_monitors"]

log = logging.getLogger("onceflow")

MONITOR = "monitor"
"""The last part of a monitor actor's name: ``<job>/monitor``."""

REQUESTS = ("stop", "cancel")
"""What another process may ask of a job through its monitor."""

_RATE_WINDOW_S = 5.0
"""Events/s while running are averaged over this many recent seconds."""

_WATCHED_S = 3.0
"""A monitor asked for the view this recently has a watcher that should see the final view."""

_FINAL_HOLD_S = 1.5
"""The longest a watched monitor holds the final view for a watcher to fetch it."""


class JobMonitor:
    """The ``<job>/monitor`` actor: the job's newest view for other processes, and their requests to it."""

    def __init__(self, view: dict[str, Any]) -> None:
        """Serve a job's ``view``, and the newer ones published after it."""
        self._view: dict[str, Any] = {**view, "version": 0}
        self._changed: asyncio.Event | None = None
        self._requests: asyncio.Queue[str] | None = None
        self._watched_at = float("-inf")  # when another process last asked for the view
        self._final_fetched: asyncio.Event | None = None

    def _queue(self) -> asyncio.Queue[str]:
        if self._requests is None:  # created on the actor's event loop
            self._requests = asyncio.Queue()
        return self._requests

    def _event(self) -> asyncio.Event:
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    async def publish(self, view: dict[str, Any], final: bool = False) -> None:
        """Take ``view`` as the job's newest (the observer calls this).

        The ``final`` view of an ended job is held until a watcher fetched it,
        at most :data:`_FINAL_HOLD_S`, when one watched in the last
        :data:`_WATCHED_S` (the job removes this actor once the call returns).
        """
        self._view = {**view, "version": self._view["version"] + 1}
        if final:
            self._final_fetched = asyncio.Event()
        changed = self._event()
        changed.set()
        self._changed = asyncio.Event()
        if final and time.monotonic() - self._watched_at < _WATCHED_S:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._final_fetched.wait(), _FINAL_HOLD_S)  # type: ignore[union-attr]

    async def view(self, newer_than: int = -1, timeout_s: float = 0.0) -> dict[str, Any]:
        """The newest view; waits up to ``timeout_s`` for one newer than version ``newer_than``."""
        self._watched_at = time.monotonic()
        if self._view["version"] <= newer_than and timeout_s > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event().wait(), timeout_s)
        if self._final_fetched is not None:
            self._final_fetched.set()
        return self._view

    async def ready(self) -> bool:
        """Answer once the actor runs (the observer's probe: it is not a watcher)."""
        return True

    async def request(self, kind: str) -> str:
        """Ask the job to ``stop`` (drain and commit) or ``cancel``; returns at once, the job acts on it soon.

        Raises:
            ValueError: ``kind`` is neither.
        """
        if kind not in REQUESTS:
            msg = f"a job can be asked to {' or '.join(REQUESTS)}, not {kind!r}"
            raise ValueError(msg)
        await self._queue().put(kind)
        return kind

    async def next_request(self) -> str:
        """Wait for the next request (the observer keeps one such call in flight)."""
        return await self._queue().get()


class Observer:
    """The driver's thread that samples a job's view, publishes it to the monitor, and relays requests.

    Args:
        job: the job name.
        run: the run id.
        executor: where the monitor actor lives.
        sample: returns the job's view (``since``: the last checkpoint outcome recorded, so the view
            carries only newer ones); must not raise.
        on_request: called with ``"stop"`` or ``"cancel"`` when another process asks for it.
        events: the job's event log, where checkpoint outcomes go.
        deployed: whether the job's first attempt runs: the monitor starts then, so that its
            process does not compete with the subtasks' for the cores while they start.
        period_s: how often to sample.
    """

    def __init__(self, job: str, run: str, executor: Executor, sample: Callable[[int], dict[str, Any]],
                 on_request: Callable[[str], None], events: JobEvents, deployed: Callable[[], bool],
                 period_s: float = 0.5) -> None:
        self._job = job
        self._run = run
        self._executor = executor
        self._sample = sample
        self._on_request = on_request
        self._events = events
        self._deployed = deployed
        self._period_s = period_s
        self._rates: collections.deque[tuple[float, int]] = collections.deque()
        self._outcome_seq = 0
        self._outcome_source: Any = None
        self.latest: dict[str, Any] = {"job": job, "run": run, "status": "STARTING"}
        self.monitor: Any = None
        self._request: Any = None
        self._ready_probe: Any = None  # answered once the monitor's process runs
        self._stop = threading.Event()
        self._wake = threading.Event()  # sample now, not at the end of the period
        self._shown = 0  # frames published by show(): a sample begun before the newest is stale
        self._lock = threading.Lock()  # one sample at a time: the thread's, or the final one
        self._thread = threading.Thread(target=self._run_loop, daemon=True, name=f"onceflow-observer-{job}")
        self._thread.start()

    def _start_monitor(self) -> None:
        try:
            self.monitor = self._executor.create(JobMonitor, f"{self._job}/{MONITOR}",
                                                 {"num_cpus": 0, "max_restarts": 0, "max_concurrency": 100},
                                                 self.latest)
            self._request = self.monitor.next_request.remote()
            self._ready_probe = self.monitor.ready.remote()
        except Exception as error:  # noqa: BLE001 - the job runs on without being watchable from elsewhere
            log.warning("job %s: could not start its monitor actor (onceflow jobs/watch/stop will not find it): %s",
                        self._job, error)
            self.monitor = self._request = None

    def _run_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._period_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.tick()
            except Exception:
                log.exception("job %s: the observer failed to sample the job; trying again", self._job)

    def tick(self) -> dict[str, Any]:
        """Sample the view, record checkpoint outcomes, publish, relay a request; return the view."""
        with self._lock:
            shown = self._shown
            since = self._outcome_seq
            view = self._sample(since)
            self._record_outcomes(view, since)
            now = time.monotonic()
            self._rates.append((now, int(view.get("events_in", 0))))
            while len(self._rates) > 2 and now - self._rates[1][0] >= _RATE_WINDOW_S:
                self._rates.popleft()
            if not view.get("ended"):
                (t0, n0), (t1, n1) = self._rates[0], self._rates[-1]
                view["events_per_s"] = max(n1 - n0, 0) / (t1 - t0) if t1 > t0 else 0.0
            if shown == self._shown:  # else show() published a newer phase while this sampled: sample again
                self.latest = view
                self._publish(view)
            if not self._stop.is_set():
                self._relay_requests()
            return view

    def _record_outcomes(self, view: dict[str, Any], since: int) -> None:
        checkpoints = view.get("checkpoints") or {}
        source = checkpoints.get("coordinator")
        if source != self._outcome_source:  # a new coordinator numbers its outcomes from 1 again
            self._outcome_source, self._outcome_seq = source, 0
            if since:  # asked for those after the old coordinator's number: ask the new one for all
                checkpoints.pop("outcomes", None)
                return
        for outcome in checkpoints.pop("outcomes", []):
            self._outcome_seq = max(self._outcome_seq, int(outcome["seq"]))
            fields = {k: v for k, v in outcome.items() if k not in ("seq", "event")}
            self._events.emit(outcome.pop("event"), **fields)

    def _publish(self, view: dict[str, Any]) -> None:
        if self.monitor is not None:
            self.monitor.publish.remote(view)  # fire and forget: a dead monitor is found by its request call

    def _relay_requests(self) -> None:
        if self._request is None:
            if self.monitor is None and self._deployed():
                self._start_monitor()
            return
        ready, _ = self._executor.wait([self._request], num_returns=1, timeout=0)
        if not ready:
            return
        try:
            kind = self._executor.get(self._request, timeout=0)
        except Exception:  # noqa: BLE001 - the monitor died: start another (it is only a window on the job)
            log.warning("job %s: its monitor actor died; starting a new one", self._job)
            self._executor.kill([self.monitor])
            self._executor.confirm_dead([self.monitor])
            self._start_monitor()
            return
        self._request = self.monitor.next_request.remote()
        self._on_request(kind)

    def nudge(self) -> None:
        """Sample now rather than at the end of the period (a restart is done: show it)."""
        self._wake.set()

    def show(self, fields: dict[str, Any]) -> None:
        """Publish the newest view with ``fields`` (status, attempt, cause) changed, at once; sample soon after.

        For a phase change: a restart can be over in a fraction of the
        sampling period (0.3 s with a spare worker), and this frame is what
        shows it to watchers as ``RESTARTING``, with its cause. It takes no
        lock and makes no call that waits (the job's driver calls it on its
        way to fencing); a sample begun before it is not published.
        """
        self._shown += 1
        self.latest = {**self.latest, **fields}
        self._publish(self.latest)
        self._wake.set()

    def close(self, final: dict[str, Any] | None = None) -> Any:
        """Stop sampling; publish ``final`` (the ended job's view) and wait briefly for it; return the monitor."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)
        with self._lock:
            if final is not None:
                self.latest = final
                if self.monitor is not None and self._answered():  # else nobody can be watching yet
                    with contextlib.suppress(Exception):
                        self._executor.get(self.monitor.publish.remote(final, final=True), timeout=_FINAL_HOLD_S + 1)
        return self.monitor

    def _answered(self) -> bool:
        ready, _ = self._executor.wait([self._ready_probe], num_returns=1, timeout=0)
        return bool(ready)


def list_monitors() -> list[str]:
    """The names of the jobs on the connected Ray cluster that have a monitor (running jobs)."""
    import ray

    suffix = f"/{MONITOR}"
    return sorted(a["name"][: -len(suffix)] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == NAMESPACE and a["name"].endswith(suffix))


def find_monitor(job: str) -> Any:
    """The monitor actor of running job ``job`` on the connected Ray cluster, or ``None``."""
    import ray

    try:
        return ray.get_actor(f"{job}/{MONITOR}", namespace=NAMESPACE)
    except ValueError:
        return None
