"""Event time: watermark strategies and the time-column conversion.

A watermark ``w`` says that no event with a time ``<= w`` is still expected.
:class:`BoundedOutOfOrderness` (as Flink's strategy of the same name) lets events
arrive up to ``max_delay_ms`` out of order: after seeing a largest event time
``t`` the watermark is ``t - max_delay_ms - 1``.

Example:
    >>> import pyarrow as pa
    >>> generator = BoundedOutOfOrderness("event_time", max_delay_ms=5).build("source_0")
    >>> generator.on_batch(pa.record_batch({"event_time": [10, 30, 20]}))
    24
    >>> generator.on_batch(pa.record_batch({"event_time": [12]})) is None
    True
    >>> BoundedOutOfOrderness("event_time", max_delay_ms=5).build("source_0", max_event_time=30).on_start()
    24

A reader of several splits that may run apart in event time (Kafka
partitions) tracks it per split with a :class:`SplitWatermarkGenerator`: the
watermark is the lowest over the splits, and a split that delivered nothing
for ``idle_timeout_s`` stops holding it back until it delivers again.

    >>> clock = [0.0]
    >>> split = BoundedOutOfOrderness("t", max_delay_ms=5).build_per_split(
    ...     "source_0", idle_timeout_s=10, clock=lambda: clock[0])
    >>> split.assign([0, 1])
    >>> clock[0] = 4.0
    >>> split.observe(0, 100)
    >>> split.on_batch(pa.record_batch({"t": [100]})) is None  # split 1 has no event time yet
    True
    >>> clock[0] = 10.0
    >>> split.on_idle()  # split 1 went idle
    94

"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from onceflow.errors import DataError, PlanError

__all__ = ["BoundedOutOfOrderness", "SplitWatermarkGenerator", "WatermarkGenerator", "event_time_ms"]

_UNIT_TO_MS = {"s": (1000, 1), "ms": (1, 1), "us": (1, 1000), "ns": (1, 1_000_000)}


def event_time_ms(data: pa.RecordBatch | pa.Table, column: str, *, operator: str) -> np.ndarray:
    """Return ``column`` of ``data`` as int64 milliseconds.

    Integer columns are taken as milliseconds; timestamps of any unit are
    converted (rounding down).

    Raises:
        DataError: the column is missing, has nulls, or is not an integer or timestamp.
    """
    index = data.schema.get_field_index(column)
    if index < 0:
        msg = (
            f"operator {operator!r}: event time column {column!r} is missing from the input "
            f"(columns: {', '.join(data.schema.names)}); add it or name the right column"
        )
        raise DataError(msg, operator=operator, column=column)
    array = data.column(index)
    kind = array.type
    if array.null_count:
        msg = (
            f"operator {operator!r}: event time column {column!r} has {array.null_count} null values; "
            "every event needs a time, so fill or filter them first"
        )
        raise DataError(msg, operator=operator, column=column)
    if pa.types.is_timestamp(kind):
        multiply, divide = _UNIT_TO_MS[kind.unit]
        ints = np.asarray(pc.cast(array, pa.int64()).to_numpy(zero_copy_only=False), dtype=np.int64)
        return ints * multiply if divide == 1 else ints // divide
    if pa.types.is_integer(kind):
        try:
            return np.asarray(pc.cast(array, pa.int64()).to_numpy(zero_copy_only=False), dtype=np.int64)
        except pa.ArrowInvalid as error:
            msg = (
                f"operator {operator!r}: event time column {column!r} has values beyond int64 ms; "
                "use int64 milliseconds or a timestamp column"
            )
            raise DataError(msg, operator=operator, column=column) from error
    msg = (
        f"operator {operator!r}: event time column {column!r} has type {kind}, "
        "expected an integer (milliseconds) or a timestamp; cast it before this operator"
    )
    raise DataError(msg, operator=operator, column=column)


class WatermarkGenerator:
    """The live watermark state of one source subtask."""

    __slots__ = ("_column", "_max_delay_ms", "_operator", "max_event_time")

    def __init__(self, column: str, max_delay_ms: int, operator: str, max_event_time: int | None = None) -> None:
        self._column = column
        self._max_delay_ms = max_delay_ms
        self._operator = operator
        self.max_event_time = max_event_time

    def on_start(self) -> int | None:
        """Return the watermark to emit before the first batch: the restored one, ``None`` on a fresh start.

        A restored source announces its watermark at once, so the channels
        downstream know it even if its event time never grows again.
        """
        if self.max_event_time is None:
            return None
        return self.max_event_time - self._max_delay_ms - 1

    def on_batch(self, batch: pa.RecordBatch) -> int | None:
        """Observe a batch; return the new watermark if it advanced."""
        if batch.num_rows == 0:
            return None
        latest = int(event_time_ms(batch, self._column, operator=self._operator).max())
        if self.max_event_time is not None and latest <= self.max_event_time:
            return None
        self.max_event_time = latest
        return latest - self._max_delay_ms - 1

    def on_idle(self) -> int | None:
        """Return the new watermark after a read found nothing: never one, event time comes from rows only."""
        return None


class SplitWatermarkGenerator:
    """The watermark of a source subtask that reads several splits, tracked per split.

    The reader :meth:`assign` s its splits and :meth:`observe` s the largest
    event time of each split's rows before it returns a batch; the runtime
    then asks :meth:`on_batch` (or :meth:`on_idle` after an empty read) for
    the watermark. That is the lowest over the active splits of ``max event
    time - max_delay_ms - 1``; a split that has no event time yet holds it
    at none. With ``idle_timeout_s`` set, a split that delivered no rows for
    that long is *idle* and left out of the minimum until it delivers again
    (when all are idle, the minimum is over those that delivered rows). The
    watermark never goes back: rows of a split back from idleness that are
    below it are late.

    It has the interface of :class:`WatermarkGenerator`: ``max_event_time``
    (what the checkpoint keeps, the watermark plus the delay) and
    :meth:`on_start`. The per-split event times are the reader's to keep
    (in its offset) and to hand back to :meth:`assign` on a restore.

    Args:
        column: the event time column (int64 milliseconds or a timestamp).
        max_delay_ms: how far out of order events may arrive within a split.
        operator: the source's name, for messages.
        idle_timeout_s: after how many seconds without rows a split is idle; ``None`` for never.
        clock: monotonic seconds (tests pass their own).
        max_event_time: the subtask's restored ``max_event_time``; the watermark starts there.

    """

    __slots__ = ("_active_at", "_clock", "_column", "_idle_timeout_s", "_max_delay_ms", "_operator",
                 "_split_times", "_watermark")

    def __init__(self, column: str, max_delay_ms: int, operator: str, *, idle_timeout_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic, max_event_time: int | None = None) -> None:
        self._column = column
        self._max_delay_ms = max_delay_ms
        self._operator = operator
        self._idle_timeout_s = idle_timeout_s
        self._clock = clock
        self._split_times: dict[int, int | None] = {}
        self._active_at: dict[int, float] = {}
        self._watermark = None if max_event_time is None else max_event_time - max_delay_ms - 1

    @property
    def column(self) -> str:
        """The event time column."""
        return self._column

    @property
    def max_event_time(self) -> int | None:
        """The event time the current watermark trails (``None`` before the first watermark)."""
        return None if self._watermark is None else self._watermark + self._max_delay_ms + 1

    def assign(self, splits: Iterable[int], max_event_times: Mapping[int, int] | None = None) -> None:
        """Track ``splits``, with their restored largest event times; each counts as active from now."""
        now = self._clock()
        known = dict(max_event_times or {})
        for split in splits:
            self._split_times.setdefault(split, known.get(split))
            self._active_at[split] = now

    def observe(self, split: int, max_event_time: int) -> None:
        """Record that ``split`` delivered rows whose largest event time is ``max_event_time``."""
        if split not in self._split_times:
            self.assign([split])
        seen = self._split_times[split]
        self._split_times[split] = max_event_time if seen is None else max(seen, max_event_time)
        self._active_at[split] = self._clock()

    def observe_batch(self, batch: pa.RecordBatch, splits: np.ndarray) -> None:
        """Record a batch whose row *i* came from split ``splits[i]`` (an integer array)."""
        if batch.num_rows == 0:
            return
        times = event_time_ms(batch, self._column, operator=self._operator)
        order = np.argsort(splits, kind="stable")
        keys, starts = np.unique(splits[order], return_index=True)
        for key, latest in zip(keys.tolist(), np.maximum.reduceat(times[order], starts).tolist(), strict=True):
            self.observe(key, int(latest))

    def split_max_event_times(self) -> dict[int, int]:
        """Return each split's largest event time seen (splits without one are left out)."""
        return {split: t for split, t in self._split_times.items() if t is not None}

    def current(self) -> int | None:
        """Return the lowest watermark over the active splits, ``None`` while one has no event time yet.

        When every split is idle, the lowest over the splits that delivered rows.
        """
        now = self._clock()
        timeout = self._idle_timeout_s
        holding = [t for split, t in self._split_times.items()
                   if timeout is None or now - self._active_at[split] < timeout]
        if not holding:  # every split idle: the lowest of those that delivered rows
            holding = [t for t in self._split_times.values() if t is not None]
        if not holding or any(t is None for t in holding):
            return None
        return min(t for t in holding if t is not None) - self._max_delay_ms - 1

    def on_start(self) -> int | None:
        """Return the watermark to emit before the first batch: the restored one, ``None`` on a fresh start."""
        return self._watermark

    def on_batch(self, batch: pa.RecordBatch) -> int | None:
        """Return the new watermark if it advanced (the reader observed the batch's splits already)."""
        return self._advance()

    def on_idle(self) -> int | None:
        """Return the new watermark if it advanced after an empty read (a split may have gone idle)."""
        return self._advance()

    def _advance(self) -> int | None:
        candidate = self.current()
        if candidate is None or (self._watermark is not None and candidate <= self._watermark):
            return None
        self._watermark = candidate
        return candidate


@dataclass(frozen=True, slots=True)
class BoundedOutOfOrderness:
    """Watermarks that trail the largest event time seen by ``max_delay_ms``.

    Args:
        column: the event time column (int64 milliseconds or a timestamp).
        max_delay_ms: how far out of order events may arrive.

    """

    column: str
    max_delay_ms: int = 0

    def __post_init__(self) -> None:
        if self.max_delay_ms < 0:
            msg = f"max_delay_ms must be >= 0, got {self.max_delay_ms}"
            raise PlanError(msg)

    def build(self, operator: str, max_event_time: int | None = None) -> WatermarkGenerator:
        """Return a live generator for one source subtask."""
        return WatermarkGenerator(self.column, self.max_delay_ms, operator, max_event_time)

    def build_per_split(self, operator: str, max_event_time: int | None = None, *,
                        idle_timeout_s: float | None = None,
                        clock: Callable[[], float] = time.monotonic) -> SplitWatermarkGenerator:
        """Return a live generator that tracks event time per split, for a reader of several splits.

        Args:
            operator: the source's name, for messages.
            max_event_time: the subtask's restored ``max_event_time``.
            idle_timeout_s: after how many seconds without rows a split stops holding the watermark back.
            clock: monotonic seconds.

        Returns:
            The generator; the reader assigns its splits.

        """
        return SplitWatermarkGenerator(self.column, self.max_delay_ms, operator, idle_timeout_s=idle_timeout_s,
                                       clock=clock, max_event_time=max_event_time)
