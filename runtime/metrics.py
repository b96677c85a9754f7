"""A job's counters: what each subtask reports (:class:`SubtaskCounters`) and their sum (:class:`JobCounters`).

``JobResult.metrics`` and ``JobHandle.metrics()`` are the mapping
:meth:`JobCounters.as_dict` gives, plus the job's own figures (duration,
restarts, checkpoint statistics). Prometheus export is separate
(:mod:`onceflow.runtime.telemetry`).

Example:
    >>> a = SubtaskCounters("source/0", is_source=True, operators={"source": {"records_in": 0, "records_out": 5}})
    >>> b = SubtaskCounters("sink/0", is_source=False, operators={"sink": {"records_in": 5, "records_out": 0}},
    ...                     sink_rows=5, input_watermark=40)
    >>> total = JobCounters.of([a, b], sources={"source"})
    >>> total.events_in, total.events_out, total.watermark, total.operators["sink"]["subtasks"]
    (5, 5, 40, 1)

"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from onceflow.runtime.channel import END_OF_TIME, NO_WATERMARK

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = ["JobCounters", "SubtaskCounters"]

OperatorCounters = dict[str, int | float]
"""One operator's counters: ``records_in``, ``records_out`` and the operator's own (``late_events``, ...)."""


@dataclass(frozen=True, slots=True)
class SubtaskCounters:
    """What one subtask counted so far.

    Attributes:
        task: ``<vertex>/<subtask>``.
        is_source: whether its chain starts with a source.
        operators: per chained operator, its counters.
        sink_rows: rows its sink wrote.
        backpressure_s: seconds it waited for credits downstream.
        messages_out: channel messages it sent.
        input_watermark: the minimum watermark over its input channels.
        active_s: seconds from its start to its end of input (so far, while
            it runs); ``None`` before it started.
        ended: whether it processed its end of input.
        restored_from: the checkpoint it restored, if any.
        restored_from_cache: state tables it restored from the object store.
        restored_from_storage: state tables it restored from their checkpoint
            files (the object-store copy was gone: its node or its owner, the
            coordinator, was lost).
        first_record_at: when (wall clock) it first processed rows, ``None`` before
            (the recovery benchmark measures a restore up to it).
        max_event_time: a source subtask's newest event time read (ms), ``None``
            before any or without a watermark.
        node: the id of the Ray node it runs on (``""`` off Ray).
    """

    task: str
    is_source: bool
    operators: dict[str, OperatorCounters]
    sink_rows: int = 0
    backpressure_s: float = 0.0
    messages_out: int = 0
    input_watermark: int = END_OF_TIME
    active_s: float | None = None
    ended: bool = False
    restored_from: int | None = None
    restored_from_cache: int = 0
    restored_from_storage: int = 0
    first_record_at: float | None = None
    max_event_time: int | None = None
    node: str = ""


@dataclass(slots=True)
class JobCounters:
    """Counters summed over a job's subtasks (and over its attempts, with :meth:`add`).

    Attributes:
        events_in: rows the sources read (replays after a restart included).
        events_out: rows the sinks wrote (rows of aborted attempts included).
        late_events: rows the windows dropped as late.
        dead_letters: records sources and ``map_batches`` sent to their dead letters.
        backpressure_s: seconds subtasks waited for credits, summed.
        messages: channel messages sent.
        watermark: the lowest input watermark of a non-source subtask, ``None``
            before any has one (this attempt only).
        max_event_time: the newest event time any source read, ``None`` before
            any (this attempt only).
        restored_from_cache: state tables restores read from the object store.
        restored_from_storage: state tables restores read from checkpoint files.
        operators: per operator: counts summed over its subtasks, ratios (such
            as a dedupe filter's fill) as the largest over them, and
            ``subtasks`` (this attempt only).
    """

    events_in: int = 0
    events_out: int = 0
    late_events: int = 0
    dead_letters: int = 0
    backpressure_s: float = 0.0
    messages: int = 0
    watermark: int | None = None
    max_event_time: int | None = None
    restored_from_cache: int = 0
    restored_from_storage: int = 0
    operators: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def of(cls, subtasks: Iterable[SubtaskCounters], sources: set[str]) -> JobCounters:
        """Sum ``subtasks`` (``sources``: the names of the source operators, whose output is the job's input)."""
        subtasks = list(subtasks)
        operators: dict[str, dict[str, Any]] = {}
        for entry in subtasks:
            for name, counters in entry.operators.items():
                total = operators.setdefault(name, {"subtasks": 0})
                total["subtasks"] += 1
                for key, value in counters.items():
                    # Counts add up over subtasks; ratios (a Bloom filter's fill) are
                    # reported for the worst subtask.
                    if isinstance(value, bool) or not isinstance(value, int | float):
                        continue
                    if isinstance(value, float):
                        total[key] = max(total.get(key, value), value)
                    else:
                        total[key] = total.get(key, 0) + value
        watermarks = [e.input_watermark for e in subtasks
                      if not e.is_source and NO_WATERMARK < e.input_watermark < END_OF_TIME]
        newest = [e.max_event_time for e in subtasks if e.max_event_time is not None]
        return cls(
            events_in=sum(operators[n]["records_out"] for n in sources if n in operators),
            events_out=sum(e.sink_rows for e in subtasks),
            late_events=sum(c.get("late_events", 0) for c in operators.values()),
            dead_letters=sum(c.get("dead_letters", 0) for c in operators.values()),
            backpressure_s=sum(e.backpressure_s for e in subtasks),
            messages=sum(e.messages_out for e in subtasks),
            watermark=min(watermarks) if watermarks else None,
            max_event_time=max(newest) if newest else None,
            restored_from_cache=sum(e.restored_from_cache for e in subtasks),
            restored_from_storage=sum(e.restored_from_storage for e in subtasks),
            operators=operators,
        )

    def add(self, earlier: JobCounters) -> None:
        """Add the counts of an earlier attempt (the watermark and per-operator figures stay this attempt's)."""
        self.events_in += earlier.events_in
        self.events_out += earlier.events_out
        self.late_events += earlier.late_events
        self.dead_letters += earlier.dead_letters
        self.backpressure_s += earlier.backpressure_s
        self.messages += earlier.messages
        self.restored_from_cache += earlier.restored_from_cache
        self.restored_from_storage += earlier.restored_from_storage

    def as_dict(self) -> dict[str, Any]:
        """The keys of ``JobResult.metrics`` these counters fill."""
        return {
            "watermark": self.watermark,
            "max_event_time": self.max_event_time,
            "events_in": self.events_in,
            "events_out": self.events_out,
            "late_events": self.late_events,
            "dead_letters": self.dead_letters,
            "backpressure_s": self.backpressure_s,
            "messages": self.messages,
            "restored_from_cache": self.restored_from_cache,
            "restored_from_storage": self.restored_from_storage,
            "operators": self.operators,
        }
