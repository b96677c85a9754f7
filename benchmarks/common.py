"""Shared benchmark helpers: Ray start-up, peak memory, result files, timing recovery after a killed actor."""

from __future__ import annotations

import functools
import json
import os
import platform
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pyarrow as pa
import ray

import onceflow as of
from onceflow.runtime.warm import embedded_system_config
from onceflow.testing.workload import feature_events

RESULTS = Path(__file__).parent / "results"


def start_ray() -> None:
    """Start an embedded Ray with no dashboard, its workers preloading onceflow (as ``of.run`` would)."""
    if not ray.is_initialized():
        ray.init(address="local", include_dashboard=False, logging_level="ERROR", log_to_driver=False,
                 _system_config=embedded_system_config())


class PeakMemory:
    """Samples the summed RSS of the driver and every onceflow subtask actor process."""

    def __init__(self, period_s: float = 0.05) -> None:
        self._period_s = period_s
        self._stop = threading.Event()
        self.peak_bytes = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        total = psutil.Process().memory_info().rss
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = proc.info.get("cmdline") or []
            if cmdline and cmdline[0].startswith(("ray::SubtaskActor",)):
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    continue
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._sample())
            time.sleep(self._period_s)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    return {
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "ray": ray.__version__,
        "platform": platform.platform(),
    }


def write_json(name: str, payload: dict[str, Any]) -> Path:
    """Write ``benchmarks/results/<name>.json``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                **payload}, indent=2))
    return path


T = TypeVar("T")


def wait_until(condition: Callable[[], T | None], timeout_s: float = 120.0, poll_s: float = 0.02,
               what: str = "the condition") -> T:
    """Poll ``condition`` every ``poll_s`` seconds until it returns something truthy; return that.

    Raises:
        TimeoutError: ``timeout_s`` passed first.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            msg = f"{what} did not hold within {timeout_s:g} s"
            raise TimeoutError(msg)
        time.sleep(poll_s)


def restored_and_running(names: list[str]) -> tuple[float, int] | None:
    """``(last first_record_at, restored checkpoint)`` once every named subtask actor restored and processed rows.

    ``None`` while one of them does not answer yet (not restarted), has not
    restored a checkpoint (an actor of the failed attempt) or has processed no
    record since it started.
    """
    firsts, restored = [], set()
    for actor_name in names:
        try:
            m = ray.get(ray.get_actor(actor_name, namespace="onceflow").metrics.remote(), timeout=1)
        except Exception:  # killed, fenced or not created yet
            return None
        if m.restored_from is None or m.first_record_at is None:
            return None
        firsts.append(m.first_record_at)
        restored.add(m.restored_from)
    if len(restored) != 1:
        return None  # actors of two attempts (cannot happen once the job fenced the old one)
    return max(firsts), restored.pop()


def time_recovery(handle: of.JobHandle, fail: Callable[[], float], timeout_s: float = 120.0,
                  what: str = "recovery") -> dict[str, Any]:
    """Make the job fail with ``fail`` (it returns when, in epoch seconds) and time the recovery.

    The clock stops at the latest ``first_record_at`` over every subtask actor
    of the next attempt, once each reports ``restored_from`` (so: failure
    detected, old attempt fenced, actors deployed or reset and restored, and
    every one of them processing rows again). Both are wall-clock times on
    this machine.

    Returns:
        ``failed_at``, ``recovered_at`` (epoch seconds), ``recovery_s`` and
        ``restored_from`` (the checkpoint id every actor of the next attempt restored).
    """
    names = handle.actor_names
    attempt = handle.attempt
    failed_at = fail()
    recovered_at, restored_from = wait_until(
        lambda: restored_and_running(names) if handle.attempt > attempt else None, timeout_s, what=what)
    return {"failed_at": failed_at, "recovered_at": recovered_at, "recovery_s": recovered_at - failed_at,
            "restored_from": restored_from}


def kill_and_time_recovery(handle: of.JobHandle, victim: str, timeout_s: float = 120.0) -> dict[str, Any]:
    """Kill the subtask actor named ``victim`` and time the job's recovery (:func:`time_recovery`).

    The clock starts just before ``ray.kill(..., no_restart=True)``.
    """
    actor = ray.get_actor(victim, namespace="onceflow")

    def kill() -> float:
        killed_at = time.time()
        ray.kill(actor, no_restart=True)
        return killed_at

    return time_recovery(handle, kill, timeout_s, what=f"recovery after killing {victim}")


def feature_flow(name: str, sink: of.sinks.TransactionalSink, *, events: int | None, batch_size: int = 100_000,
                 users: int = 100_000, window_ms: int = 10_000, rate: int | None = None,
                 transform: Callable[[pa.RecordBatch], pa.RecordBatch] | None = None) -> of.Dataflow:
    """The feature-window job: key by user, tumbling windows, count and sum(amount) (``transform`` on the way in)."""
    make_batch = feature_events if users == 100_000 else functools.partial(feature_events, users=users)
    flow = of.Dataflow(name)
    stream = flow.source(of.sources.GeneratorSource(make_batch, total=events, batch_size=batch_size,
                                                    max_events_per_s=rate),
                         watermark=of.BoundedOutOfOrderness("event_time"))
    if transform is not None:
        stream = stream.map_batches(transform, name="transform")
    (stream.key_by("user_id").window(of.windows.Tumbling(size_ms=window_ms))
     .aggregate(count=of.agg.count(), total=of.agg.sum("amount")).sink(sink))
    return flow


def pyplot() -> Any:
    """Return ``matplotlib.pyplot`` on the non-interactive Agg backend (no screen here)."""
    try:
        import matplotlib
    except ImportError as error:
        msg = "the benchmarks draw their figures with matplotlib: pip install 'onceflow[bench]'"
        raise SystemExit(msg) from error

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def range_bars(axis: Any, labels: Any, median: list[float], low: list[float], high: list[float], *,
               scale: float = 1.0, **bar_options: Any) -> Any:
    """Bars at each ``median`` with an error bar from ``low`` to ``high`` (all divided by ``scale``); the bars.

    The shape every benchmark draws its repeated runs in: ``bar_options`` go to ``axis.bar`` (``color``...).
    """
    medians = [m / scale for m in median]
    below = [m - lo / scale for m, lo in zip(medians, low, strict=True)]
    above = [hi / scale - m for m, hi in zip(medians, high, strict=True)]
    return axis.bar(labels, medians, yerr=[below, above], capsize=bar_options.pop("capsize", 4), **bar_options)


def save_figure(fig: Any, name: str) -> Path:
    """Write ``benchmarks/results/<name>.png``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.png"
    fig.savefig(path, dpi=110)
    return path
