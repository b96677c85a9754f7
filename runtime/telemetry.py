"""Metrics exported through ``ray.util.metrics``: Ray's Prometheus endpoint and dashboard.

Every subtask counts records in and out per operator and the seconds it
waited for credits (backpressure), and sets its current watermark; the
coordinator records checkpoint duration, size and alignment and counts
completed and failed checkpoints; the job counts restarts. Names start with
``onceflow_`` and carry the tags ``job`` and, where it applies, ``operator``
and ``subtask``. Recording never fails a job: when Ray's metrics agent is
not there (a driver not connected to Ray), the calls do nothing.
"""

from __future__ import annotations

import contextlib
from typing import Any

from onceflow.runtime.channel import END_OF_TIME, NO_WATERMARK

__all__ = ["CheckpointMetrics", "RestartCounter", "SubtaskMetrics"]

_DURATION_BOUNDARIES = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]


def _metrics() -> Any:
    from ray.util import metrics

    return metrics


class SubtaskMetrics:
    """Per-operator record counters, backpressure time and watermark of one subtask."""

    def __init__(self, job: str, operators: list[str], subtask: int) -> None:
        self._tags = [{"job": job, "operator": op, "subtask": str(subtask)} for op in operators]
        self._sent_in = [0] * len(operators)
        self._sent_out = [0] * len(operators)
        self._sent_backpressure = 0.0
        self._ok = False
        with contextlib.suppress(Exception):
            metrics = _metrics()
            keys = ("job", "operator", "subtask")
            self._records_in = metrics.Counter("onceflow_records_in_total", "records into an operator", keys)
            self._records_out = metrics.Counter("onceflow_records_out_total", "records out of an operator", keys)
            self._backpressure = metrics.Counter("onceflow_backpressure_seconds_total",
                                                 "seconds a subtask waited for channel credits", keys)
            self._watermark = metrics.Gauge("onceflow_watermark_milliseconds",
                                            "a subtask's current watermark (a source's: the one it emits)", keys)
            self._ok = True

    def publish(self, records_in: list[int], records_out: list[int], backpressure_s: float, watermark: int) -> None:
        """Add what changed since the last call to the counters; set the watermark gauge.

        Args:
            records_in: per chained operator, the records it took in so far.
            records_out: per chained operator, the records it gave out so far.
            backpressure_s: the seconds the subtask waited for credits so far.
            watermark: the subtask's current watermark in milliseconds; the
                gauge is left alone while there is none yet (``NO_WATERMARK``)
                and once the input ended (``END_OF_TIME``).
        """
        if not self._ok:
            return
        with contextlib.suppress(Exception):
            for i, tags in enumerate(self._tags):
                if records_in[i] > self._sent_in[i]:
                    self._records_in.inc(records_in[i] - self._sent_in[i], tags)
                    self._sent_in[i] = records_in[i]
                if records_out[i] > self._sent_out[i]:
                    self._records_out.inc(records_out[i] - self._sent_out[i], tags)
                    self._sent_out[i] = records_out[i]
            if backpressure_s > self._sent_backpressure:
                self._backpressure.inc(backpressure_s - self._sent_backpressure, self._tags[0])
                self._sent_backpressure = backpressure_s
            if NO_WATERMARK < watermark < END_OF_TIME:
                for tags in self._tags:
                    self._watermark.set(watermark, tags)


class CheckpointMetrics:
    """Checkpoint duration, alignment, size and counts of one job (recorded by the coordinator)."""

    def __init__(self, job: str) -> None:
        self._tags = {"job": job}
        self._ok = False
        with contextlib.suppress(Exception):
            metrics = _metrics()
            self._duration = metrics.Histogram("onceflow_checkpoint_duration_seconds",
                                               "trigger to durable manifest", _DURATION_BOUNDARIES, ("job",))
            self._alignment = metrics.Histogram("onceflow_checkpoint_alignment_seconds",
                                                "longest barrier alignment of a checkpoint", _DURATION_BOUNDARIES,
                                                ("job",))
            self._size = metrics.Gauge("onceflow_checkpoint_size_bytes", "state size of the last checkpoint",
                                       ("job",))
            self._completed = metrics.Counter("onceflow_checkpoints_completed_total", "completed checkpoints",
                                              ("job",))
            self._failed = metrics.Counter("onceflow_checkpoints_failed_total",
                                           "failed checkpoints: expired, declined or manifest not written", ("job",))
            self._ok = True

    def completed(self, duration_s: float, alignment_s: float, state_bytes: int) -> None:
        """Record one completed checkpoint."""
        if not self._ok:
            return
        with contextlib.suppress(Exception):
            self._duration.observe(duration_s, self._tags)
            self._alignment.observe(alignment_s, self._tags)
            self._size.set(state_bytes, self._tags)
            self._completed.inc(1, self._tags)

    def failed(self) -> None:
        """Count one failed checkpoint."""
        if not self._ok:
            return
        with contextlib.suppress(Exception):
            self._failed.inc(1, self._tags)


class RestartCounter:
    """Restarts of one job (recorded by the driver)."""

    def __init__(self, job: str) -> None:
        self._tags = {"job": job}
        self._counter: Any = None
        with contextlib.suppress(Exception):
            self._counter = _metrics().Counter("onceflow_restarts_total", "job restarts after a failure", ("job",))

    def inc(self) -> None:
        """Count one restart."""
        if self._counter is not None:
            with contextlib.suppress(Exception):
                self._counter.inc(1, self._tags)
