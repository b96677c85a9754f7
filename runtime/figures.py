"""A job's last known figures: what each subtask reported last, kept through its death and the restart.

A job's driver asks its subtasks for their counters (:class:`SubtaskCounters`)
while they live. :class:`LastKnown` keeps the newest answer of every subtask
with the time it came, so a job whose actors are dead or restarting still
reports figures, each with its age, instead of failing the caller. When an
attempt is fenced, its last figures join the totals of earlier attempts
(``retire``); figures of a retired attempt that arrive late are ignored, so
nothing is counted twice.

Example:
    >>> known = LastKnown({"source"}, clock=lambda: 10.0)
    >>> known.update(1, [SubtaskCounters("source/0", True, {"source": {"records_in": 0, "records_out": 7}})])
    >>> known.retire(1)
    >>> known.update(1, [SubtaskCounters("source/0", True, {"source": {"records_in": 0, "records_out": 9}})])
    >>> known.update(2, [SubtaskCounters("source/0", True, {"source": {"records_in": 0, "records_out": 3}})])
    >>> totals, ages = known.totals()
    >>> totals.events_in, ages
    (10, {'source/0': 0.0})

"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from onceflow.runtime.metrics import JobCounters, SubtaskCounters

__all__ = ["LastKnown"]


@dataclass(frozen=True, slots=True)
class _Figure:
    attempt: int
    at: float
    counters: SubtaskCounters


class LastKnown:
    """The newest counters of each subtask, and the totals of the attempts before the live one (thread-safe)."""

    def __init__(self, sources: set[str], clock: Callable[[], float] = time.monotonic) -> None:
        """Keep figures of a job whose source operators are named ``sources``; ``clock`` dates them."""
        self._sources = sources
        self._clock = clock
        self._lock = threading.Lock()
        self._newest: dict[str, _Figure] = {}
        self._retired = 0
        self.earlier = JobCounters()
        """The summed counts of every retired attempt."""

    def update(self, attempt: int, counters: list[SubtaskCounters]) -> None:
        """Keep what subtasks of ``attempt`` reported now (ignored if the attempt was retired)."""
        now = self._clock()
        with self._lock:
            if attempt <= self._retired:
                return
            for entry in counters:
                known = self._newest.get(entry.task)
                if known is None or known.attempt <= attempt:
                    self._newest[entry.task] = _Figure(attempt, now, entry)

    def retire(self, attempt: int) -> None:
        """Attempt ``attempt`` is fenced: its last figures join :attr:`earlier`, and later ones are ignored."""
        with self._lock:
            if attempt <= self._retired:
                return
            self._retired = attempt
            closing = [f.counters for f in self._newest.values() if f.attempt == attempt]
            self.earlier.add(JobCounters.of(closing, self._sources))

    def totals(self) -> tuple[JobCounters, dict[str, float]]:
        """The counts of every attempt, and per subtask the age (s) of its figures.

        Counts add the retired attempts' to the live one's last figures. The
        watermark, the newest event time and the per-operator figures are each
        subtask's newest, of whichever attempt (a dead subtask's stay, ageing,
        until its replacement reports); each operator gains ``age_s``, the age
        of its oldest subtask figure, and ``backpressure_s``, the time its
        subtasks waited to send (counted on the last operator of a chain, the
        one that sends).
        """
        now = self._clock()
        with self._lock:
            newest = list(self._newest.values())
            retired = self._retired
            earlier = JobCounters()
            earlier.add(self.earlier)
        live = JobCounters.of([f.counters for f in newest if f.attempt > retired], self._sources)
        shown = JobCounters.of([f.counters for f in newest], self._sources)
        for figure in newest:
            names = list(figure.counters.operators)
            for name in names:
                operator = shown.operators[name]
                operator["age_s"] = max(operator.get("age_s", 0.0), now - figure.at)
                operator.setdefault("backpressure_s", 0.0)
            if names:
                shown.operators[names[-1]]["backpressure_s"] += figure.counters.backpressure_s
        live.add(earlier)
        live.watermark = shown.watermark
        live.max_event_time = shown.max_event_time
        live.operators = shown.operators
        return live, {f.counters.task: now - f.at for f in newest}

    def node_of(self, task: str) -> str:
        """The node subtask ``task`` last reported from (``""`` if unknown)."""
        with self._lock:
            figure = self._newest.get(task)
        return figure.counters.node if figure is not None else ""
