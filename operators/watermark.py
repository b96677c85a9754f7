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

"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from onceflow.errors import DataError, PlanError

__all__ = ["BoundedOutOfOrderness", "WatermarkGenerator", "event_time_ms"]

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
