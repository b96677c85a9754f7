"""Event-time windows: assigners and the keyed window aggregation operator.

Window assigners are frozen, picklable configs:

- :class:`Tumbling` ``(size_ms, offset_ms=0)``: fixed, non-overlapping windows
  ``[offset + n * size, offset + (n + 1) * size)``.
- :class:`Sliding` ``(size_ms, slide_ms, offset_ms=0)``: windows of ``size_ms``
  starting every ``slide_ms``; an event belongs to every window that contains
  it.
- :class:`Session` ``(gap_ms)``: an event at ``t`` opens ``[t, t + gap)``;
  overlapping windows of the same key merge, so a session ends ``gap_ms``
  after its last event.

:class:`WindowAggregate` is the operator config; its ``build(ctx)`` gives the
live :class:`WindowAggregateLogic`. Semantics (Flink's, with one choice about
allowed lateness spelled out):

- Time is milliseconds. The time column may be any integer type (taken as
  ms) or a timestamp (converted to int64 ms, rounding down).
- A window ``[start, end)`` fires when the watermark reaches
  ``end - 1 + allowed_lateness_ms``. Allowed lateness therefore *delays* the
  firing: every window is emitted once, with its final value, which is what an
  append-only exactly-once sink needs (Flink instead fires at ``end - 1`` and
  fires again for each late event, emitting updates).
- An event is *late* when every window it belongs to has fired, that is when
  ``window_end - 1 + allowed_lateness_ms <= watermark`` for its last window
  (for sessions, when ``t + gap - 1 + allowed_lateness_ms <= watermark``).
  Late events leave the results unchanged: they are counted
  (``late_events``) and emitted, as the original rows, on port
  :data:`~onceflow.operators.logic.LATE`. For sliding windows, an event some of whose
  windows have fired is not late; it only counts towards the windows still
  open.
- Sessions: a non-late event that would have joined a session which already
  fired starts a new session (as in Flink, whose state of a fired session is
  gone). With a watermark that never overtakes the events (a correct one)
  this cannot happen.
- On every watermark advance, the fired windows come out as one batch on
  :data:`~onceflow.operators.logic.MAIN`: the key columns, ``window_start`` and
  ``window_end`` (int64 ms, end exclusive), then one column per aggregate in
  the order given, sorted by ``(window_start, keys)``. ``on_eof`` fires every
  window left.

Example:
    >>> import pyarrow as pa
    >>> from onceflow.operators import agg
    >>> from onceflow.operators.logic import OperatorContext
    >>> op = WindowAggregate(Tumbling(size_ms=10), keys=["user"], time_column="t",
    ...                      aggregates={"n": agg.count(), "total": agg.sum("amount")})
    >>> logic = op.build(OperatorContext("window_1"))
    >>> logic.on_batch(pa.record_batch({"user": [1, 2, 1], "t": [3, 5, 12], "amount": [1.0, 2.0, 4.0]}))
    []
    >>> [(port, out.to_pylist()) for port, out in logic.on_watermark(9)]  # doctest: +NORMALIZE_WHITESPACE
    [(0, [{'user': 1, 'window_start': 0, 'window_end': 10, 'n': 1, 'total': 1.0},
          {'user': 2, 'window_start': 0, 'window_end': 10, 'n': 1, 'total': 2.0}])]

"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeAlias

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from onceflow.errors import DataError, PlanError
from onceflow.operators.agg import Aggregation, reduce_groups
from onceflow.operators.keygroups import (
    canonical_float_keys,
    in_key_groups,
    key_groups_of,
    require_key_columns,
    take_rows,
)
from onceflow.operators.logic import LATE, MAIN, Emitted, OperatorContext, OperatorLogic, StatePieces
from onceflow.operators.watermark import event_time_ms
from onceflow.operators.window_kinds import FixedWindows, PartialLayout, SessionWindows, WindowKind

__all__ = [
    "STATE_FORMAT_VERSION",
    "Session",
    "Sliding",
    "Tumbling",
    "Window",
    "WindowAggregate",
    "WindowAggregateLogic",
]

STATE_FORMAT_VERSION = 1
"""The version of the snapshot table layout (schema metadata ``onceflow.version``)."""

_I64_MIN = -(1 << 63)
_I64_MAX = (1 << 63) - 1
_RESERVED = frozenset({"key_group", "window_start", "window_end"})
_KEY_GROUP = "kg"
"""The internal state column holding each row's key group."""
_GROUPABLE = {pa.string_view(): pa.string(), pa.binary_view(): pa.binary(), pa.float16(): pa.float32()}
"""Key types Arrow cannot group by, and the type their values are kept in."""


def _check_int(owner: str, name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        bound = "a positive" if minimum == 1 else "a non-negative"
        msg = f"{owner}: {name} must be {bound} integer number of milliseconds, got {value!r}; pass an int"
        raise PlanError(msg)


@dataclass(frozen=True, slots=True)
class Tumbling:
    """Fixed-size, non-overlapping windows ``[offset + n * size, offset + (n + 1) * size)``.

    Args:
        size_ms: the window length in ms (positive).
        offset_ms: shifts the window grid, ``0 <= offset_ms < size_ms``
            (an hour-long window at ``offset_ms=15 * 60_000`` runs from :15 to :15).

    Raises:
        PlanError: a size or offset is out of range.

    Example:
        >>> Tumbling(size_ms=10_000)
        Tumbling(size_ms=10000, offset_ms=0)

    """

    size_ms: int
    offset_ms: int = 0

    def __post_init__(self) -> None:
        """Validate the sizes."""
        _check_int("tumbling window", "size_ms", self.size_ms, minimum=1)
        _check_int("tumbling window", "offset_ms", self.offset_ms, minimum=0)
        if self.offset_ms >= self.size_ms:
            msg = (
                f"tumbling window: offset_ms ({self.offset_ms}) must be smaller than size_ms ({self.size_ms}); "
                "use offset_ms % size_ms"
            )
            raise PlanError(msg)


@dataclass(frozen=True, slots=True)
class Sliding:
    """Windows of ``size_ms`` that start every ``slide_ms`` (hopping windows).

    Windows start at ``offset_ms + n * slide_ms`` and cover ``size_ms``; an
    event belongs to every window containing it. ``size_ms`` need not be a
    multiple of ``slide_ms``: then an event belongs to ``size // slide`` or
    ``size // slide + 1`` windows, depending on where in its slide it falls.

    Args:
        size_ms: the window length in ms (positive).
        slide_ms: the distance between window starts, ``0 < slide_ms <= size_ms``.
        offset_ms: shifts the window grid, ``0 <= offset_ms < slide_ms``.

    Raises:
        PlanError: a size, slide or offset is out of range.

    Example:
        >>> Sliding(size_ms=60_000, slide_ms=10_000)
        Sliding(size_ms=60000, slide_ms=10000, offset_ms=0)

    """

    size_ms: int
    slide_ms: int
    offset_ms: int = 0

    def __post_init__(self) -> None:
        """Validate the sizes."""
        _check_int("sliding window", "size_ms", self.size_ms, minimum=1)
        _check_int("sliding window", "slide_ms", self.slide_ms, minimum=1)
        _check_int("sliding window", "offset_ms", self.offset_ms, minimum=0)
        if self.slide_ms > self.size_ms:
            msg = (
                f"sliding window: slide_ms ({self.slide_ms}) must not exceed size_ms ({self.size_ms}); "
                "make the slide smaller or the size larger"
            )
            raise PlanError(msg)
        if self.offset_ms >= self.slide_ms:
            msg = (
                f"sliding window: offset_ms ({self.offset_ms}) must be smaller than slide_ms ({self.slide_ms}); "
                "use offset_ms % slide_ms"
            )
            raise PlanError(msg)


@dataclass(frozen=True, slots=True)
class Session:
    """Per-key activity sessions that close after ``gap_ms`` without events.

    An event at ``t`` belongs to ``[t, t + gap_ms)``; windows of the same key
    that overlap merge. Two events of a key are in the same session when no
    gap of ``gap_ms`` or more separates them.

    Args:
        gap_ms: the inactivity gap in ms (positive).

    Raises:
        PlanError: the gap is not a positive integer.

    Example:
        >>> Session(gap_ms=30_000)
        Session(gap_ms=30000)

    """

    gap_ms: int

    def __post_init__(self) -> None:
        """Validate the gap."""
        _check_int("session window", "gap_ms", self.gap_ms, minimum=1)


Window: TypeAlias = Tumbling | Sliding | Session
"""A window assigner."""


@dataclass(frozen=True)
class WindowAggregate:
    """Aggregate a keyed stream over event-time windows (the operator config).

    Args:
        window: the window assigner.
        keys: the key columns (may be empty for one global group per window).
        time_column: the event-time column, integer ms or a timestamp.
        aggregates: output column name -> aggregation, in output order.
        allowed_lateness_ms: how long after a window's end it still accepts
            events; windows fire that much later (see the module docs).

    Raises:
        PlanError: the config is inconsistent (no aggregates, a name clash).

    Example:
        >>> import pyarrow as pa
        >>> from onceflow.operators import agg
        >>> from onceflow.operators.logic import OperatorContext
        >>> op = WindowAggregate(Session(gap_ms=5), keys=["k"], time_column="t",
        ...                      aggregates={"n": agg.count()})
        >>> logic = op.build(OperatorContext("window_1"))
        >>> _ = logic.on_batch(pa.record_batch({"k": ["a", "a", "a"], "t": [0, 3, 20]}))
        >>> [out.to_pylist() for _, out in logic.on_eof()]  # doctest: +NORMALIZE_WHITESPACE
        [[{'k': 'a', 'window_start': 0, 'window_end': 8, 'n': 2},
          {'k': 'a', 'window_start': 20, 'window_end': 25, 'n': 1}]]

    """

    window: Window
    keys: Sequence[str]
    time_column: str
    aggregates: Mapping[str, Aggregation] = field(hash=False)
    allowed_lateness_ms: int = 0

    def __post_init__(self) -> None:
        """Normalise and validate the config."""
        if not isinstance(self.window, Tumbling | Sliding | Session):
            msg = (
                f"window aggregate: window must be Tumbling, Sliding or Session, got {self.window!r}; "
                "pass a window assigner"
            )
            raise PlanError(msg)
        keys = (self.keys,) if isinstance(self.keys, str) else tuple(self.keys)
        object.__setattr__(self, "keys", keys)
        object.__setattr__(self, "aggregates", dict(self.aggregates))
        if not all(isinstance(key, str) and key for key in keys):
            msg = f"window aggregate: keys must be column names, got {list(keys)!r}; pass a list of strings"
            raise PlanError(msg)
        if len(set(keys)) != len(keys):
            msg = f"window aggregate: keys {list(keys)!r} repeat a column; name each key column once"
            raise PlanError(msg)
        if not isinstance(self.time_column, str) or not self.time_column:
            msg = f"window aggregate: time_column must be a column name, got {self.time_column!r}; pass a string"
            raise PlanError(msg)
        if not self.aggregates:
            msg = "window aggregate: no aggregates given; pass at least one, e.g. aggregates={'n': agg.count()}"
            raise PlanError(msg)
        for name, aggregation in self.aggregates.items():
            if not isinstance(name, str) or not name:
                msg = f"window aggregate: aggregate names must be non-empty strings, got {name!r}; rename it"
                raise PlanError(msg)
            if not isinstance(aggregation, Aggregation):
                msg = (
                    f"window aggregate: aggregate {name!r} is {aggregation!r}, not an aggregation; "
                    "use agg.count(), agg.sum(column), ..."
                )
                raise PlanError(msg)
        for name in (*keys, *self.aggregates):
            if name in _RESERVED:
                msg = (
                    f"window aggregate: the output column {name!r} is reserved for the window; "
                    "rename that key or aggregate"
                )
                raise PlanError(msg)
        clash = set(keys) & set(self.aggregates)
        if clash:
            msg = f"window aggregate: {sorted(clash)!r} is both a key and an aggregate name; rename the aggregate"
            raise PlanError(msg)
        _check_int("window aggregate", "allowed_lateness_ms", self.allowed_lateness_ms, minimum=0)

    def build(
        self,
        ctx: OperatorContext,
        resume_state: pa.Table | Sequence[pa.Table] | None = None,
    ) -> WindowAggregateLogic:
        """Return the live logic, restored from ``resume_state`` when given.

        Args:
            ctx: where the logic runs.
            resume_state: a table from :meth:`WindowAggregateLogic.snapshot`,
                or several (when rescaling); only rows of ``ctx.key_groups``
                are kept.

        Returns:
            The live logic.

        """
        return WindowAggregateLogic(self, ctx, resume_state)


@dataclass(frozen=True, slots=True)
class _PartialColumn:
    """Where one partial accumulator lives: internal and snapshot names."""

    internal: str
    snapshot: str
    source: str | None
    accumulate: str
    combine: str


def _clamp(value: int) -> int:
    return _I64_MAX if value > _I64_MAX else _I64_MIN if value < _I64_MIN else value


def _as_table(batch: pa.RecordBatch | pa.Table) -> pa.Table:
    return batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])


def _as_batch(table: pa.Table) -> pa.RecordBatch:
    arrays = [column.combine_chunks() for column in table.columns]
    return pa.RecordBatch.from_arrays(arrays, schema=table.schema)


def _window_kind(window: Window, layout: PartialLayout) -> WindowKind:
    """The window-kind strategy for an assigner."""
    if isinstance(window, Session):
        return SessionWindows(window.gap_ms, layout)
    if isinstance(window, Sliding):
        return FixedWindows(window.size_ms, window.slide_ms, window.offset_ms, layout)
    return FixedWindows(window.size_ms, window.size_ms, window.offset_ms, layout)


class WindowAggregateLogic(OperatorLogic):
    """The live window aggregation of one subtask (built by :class:`WindowAggregate`).

    State is kept as *partial accumulators*: every batch is pre-aggregated per
    (window, key). What depends on the kind of window (which windows a row
    counts towards, how partials are kept and merged, which windows fire,
    what a snapshot holds) is the job of a
    :class:`~onceflow.operators.window_kinds.WindowKind`:
    :class:`~onceflow.operators.window_kinds.FixedWindows` keeps the partial
    tables per window (re-combined into one when a window has more than a
    few); :class:`~onceflow.operators.window_kinds.SessionWindows` keeps
    partials per (key, event time) until their session fires. This class
    keeps the rest: input validation, late rows, output and the snapshot
    table.

    Example:
        >>> import pyarrow as pa
        >>> from onceflow.operators import agg
        >>> from onceflow.operators.logic import OperatorContext
        >>> op = WindowAggregate(Tumbling(10), keys=["k"], time_column="t", aggregates={"n": agg.count()})
        >>> ctx = OperatorContext("window_1")
        >>> logic = op.build(ctx)
        >>> logic.on_batch(pa.record_batch({"k": [7, 7], "t": [1, 2]}))
        []
        >>> state = logic.snapshot()
        >>> state.column_names
        ['key_group', 'k', 'window_start', 'window_end', 'n.count']
        >>> restored = op.build(ctx, resume_state=state)
        >>> restored.on_eof()[0][1].to_pylist()
        [{'k': 7, 'window_start': 0, 'window_end': 10, 'n': 2}]
        >>> restored.metrics()
        {'late_events': 0, 'open_windows': 0}

    """

    def __init__(
        self,
        config: WindowAggregate,
        ctx: OperatorContext,
        resume_state: pa.Table | Sequence[pa.Table] | None = None,
    ) -> None:
        """Set up empty state, then restore ``resume_state`` if given.

        Args:
            config: the operator config.
            ctx: where the logic runs.
            resume_state: snapshot table(s) to restore from.

        """
        self._config = config
        self._ctx = ctx
        self._operator = ctx.operator
        self._keys = list(config.keys)
        self._key_columns = [f"k{i}" for i in range(len(self._keys))]
        self._aggregations = list(config.aggregates.values())
        self._partials: list[list[_PartialColumn]] = []
        index = 0
        for a, (name, aggregation) in enumerate(config.aggregates.items()):
            columns = []
            for partial in aggregation.partials:
                source = None if aggregation.column is None else f"i{a}"
                columns.append(
                    _PartialColumn(f"p{index}", f"{name}.{partial.suffix}", source, partial.accumulate, partial.combine)
                )
                index += 1
            self._partials.append(columns)
        flat = [p for columns in self._partials for p in columns]
        # Every state row carries the key group routing computed from its key's rows (_KEY_GROUP).
        key_group = (_KEY_GROUP, _KEY_GROUP, "max")
        self._accumulate = [key_group, *((p.internal, p.source, p.accumulate) for p in flat)]
        combine = [key_group, *((p.internal, p.internal, p.combine) for p in flat)]
        self._state_columns = ["window_start", *self._key_columns, _KEY_GROUP, *(p.internal for p in flat)]
        self._snapshot_columns = ["window_start", *self._keys, "key_group", *(p.snapshot for p in flat)]
        layout = PartialLayout(tuple(self._key_columns), tuple(self._state_columns), tuple(combine))
        self._kind = _window_kind(config.window, layout)
        self._delay = self._kind.size_ms - 1 + config.allowed_lateness_ms

        self._watermark: int | None = None
        self._late_events = 0
        self._schema: pa.Schema | None = None
        if resume_state is not None:
            self._restore([resume_state] if isinstance(resume_state, pa.Table) else list(resume_state))

    # --- events -------------------------------------------------------------------------------

    def on_batch(self, batch: pa.RecordBatch) -> Emitted:
        """Pre-aggregate ``batch`` into window state; emit its late rows on ``LATE``.

        A ``pyarrow.Table`` is accepted too. Returns ``[]`` unless some rows
        are late; those go out unchanged, in input order, as one batch.

        Raises:
            DataError: a key, time or aggregate input column is missing or
                has a type that cannot be used.

        """
        table = _as_table(batch)
        inputs, times = self._prepare(table)
        if table.num_rows == 0:
            return []
        kind = self._kind
        last_starts = kind.last_starts(times)
        emitted: Emitted = []
        limit = None if self._watermark is None else _clamp(self._watermark - self._delay)
        if limit is not None:
            emitted, keep = self._split_late(batch, last_starts <= limit)
            if keep is not None:
                if not keep.any():
                    return emitted
                inputs = inputs.filter(pa.array(keep))
                times, last_starts = times[keep], last_starts[keep]
        assigned = kind.assign(inputs, times, last_starts, limit)
        kind.add(self._conform(reduce_groups(assigned, ["window_start", *self._key_columns], self._accumulate)))
        return emitted

    def on_watermark(self, watermark: int) -> Emitted:
        """Fire every window whose ``end - 1 + allowed_lateness_ms <= watermark``.

        Returns:
            One ``MAIN`` batch with every fired window, sorted by
            ``(window_start, keys)``, or ``[]`` when none fires. A watermark
            that does not advance is ignored.

        """
        watermark = _clamp(int(watermark))
        if self._watermark is not None and watermark <= self._watermark:
            return []
        self._watermark = watermark
        return self._fire(_clamp(watermark - self._delay))

    def on_eof(self) -> Emitted:
        """Fire every window left, as if the watermark were +infinity."""
        return self._fire(None)

    def _fire(self, limit: int | None) -> Emitted:
        fired = self._kind.fire(limit)
        return [] if fired is None else [(MAIN, self._output(fired.partials, fired.ends))]

    def metrics(self) -> dict[str, int]:
        """Return ``late_events`` and ``open_windows``.

        ``open_windows`` is the number of distinct open window intervals for
        tumbling and sliding windows (shared by all keys), and the number of
        open (key, session) pairs for session windows (computed on demand).
        """
        return {"late_events": self._late_events, "open_windows": self._kind.open_windows()}

    # --- input validation -----------------------------------------------------------------------

    def _find(self, table: pa.Table, name: str, role: str, advice: str) -> pa.ChunkedArray:
        indices = table.schema.get_all_field_indices(name)
        if len(indices) != 1:
            problem = "is missing from the input" if not indices else "appears more than once in the input"
            columns = ", ".join(table.column_names)
            msg = f"operator {self._operator!r}: {role} {name!r} {problem} (columns: {columns}); {advice}"
            raise DataError(msg, operator=self._operator, column=name)
        return table.column(indices[0])

    def _prepare(self, table: pa.Table) -> tuple[pa.Table, np.ndarray]:
        """Validate ``table``; return the times in ms and the columns to aggregate.

        Returns:
            A table of ``window_start`` (the event times in ms, for the caller
            to replace), the keys and the aggregate inputs, with internal
            names; and the event times as numpy int64.

        """
        operator = self._operator
        times = self._times(table)
        columns: dict[str, pa.ChunkedArray | pa.Array] = {"window_start": pa.array(times, type=pa.int64())}
        for internal, key in zip(self._key_columns, self._keys, strict=True):
            column = self._find(table, key, "key column", "key by a column the stream has")
            kind = column.type
            if pa.types.is_null(kind):
                msg = (
                    f"operator {operator!r}: key column {key!r} has type null (no value in the batch says what "
                    "its type is), which cannot be a key of a window; cast it to the type of its values first"
                )
                raise DataError(msg, operator=operator, column=key)
            require_key_columns(table.schema, [key], operator=operator)
            if pa.types.is_dictionary(kind):
                column = column.cast(kind.value_type)
                kind = kind.value_type
            if kind in _GROUPABLE:  # Arrow cannot sort or group these: keep the values, in a type it can
                column = column.cast(_GROUPABLE[kind])
            columns[internal] = canonical_float_keys(column)
        if self._keys:
            groups = key_groups_of(table, self._keys, self._ctx.max_parallelism, operator=operator)
        else:
            groups = np.zeros(table.num_rows, dtype=np.int32)
        columns[_KEY_GROUP] = pa.array(groups, type=pa.int32())
        schema = table.schema
        for a, aggregation in enumerate(self._aggregations):
            accumulated = aggregation.input_type(schema, operator=operator)
            if accumulated is None:
                continue
            source = aggregation.column
            column = table.column(source)
            if column.type != accumulated:
                try:
                    column = column.cast(accumulated)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
                    msg = (
                        f"operator {operator!r}: {aggregation!r} cannot read column {source!r} "
                        f"as {accumulated} (a value does not fit); cast {source!r} to a type that fits first"
                    )
                    raise DataError(msg, operator=operator, column=source) from error
            columns[f"i{a}"] = column
        return pa.table(columns), times

    def _times(self, table: pa.Table) -> np.ndarray:
        name = self._config.time_column
        self._find(table, name, "time column", "pass the event-time column's name as time_column")
        return event_time_ms(table, name, operator=self._operator)

    def _conform(self, piece: pa.Table) -> pa.Table:
        """Give ``piece`` the state's schema (the first batch's types)."""
        if self._schema is None:
            self._schema = piece.schema
            return piece
        if piece.schema.equals(self._schema):
            return piece
        try:
            return piece.cast(self._schema)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
            names = dict(
                zip(self._state_columns, ["window_start", *self._keys, "key_group", *self._sources()], strict=True)
            )
            column = next(
                (
                    name
                    for name, want in zip(piece.schema.names, self._schema.types, strict=True)
                    if piece.schema.field(name).type != want
                ),
                piece.schema.names[0],
            )
            msg = (
                f"operator {self._operator!r}: column {names.get(column, column)!r} changed type from "
                f"{self._schema.field(column).type} to {piece.schema.field(column).type}; "
                "give every batch the same schema"
            )
            raise DataError(msg, operator=self._operator, column=names.get(column, column)) from error

    def _sources(self) -> list[str]:
        return [
            self._aggregations[a].column or name
            for a, columns in enumerate(self._partials)
            for name in (p.snapshot for p in columns)
        ]

    # --- late rows ------------------------------------------------------------------------------

    def _split_late(self, batch: pa.RecordBatch | pa.Table, late: np.ndarray) -> tuple[Emitted, np.ndarray | None]:
        """Count and emit the late rows; return what to emit and the rows to keep (None: all)."""
        late_count = int(np.count_nonzero(late))
        if not late_count:
            return [], None
        self._late_events += late_count
        rows = take_rows(batch, np.flatnonzero(late))
        emitted: Emitted = [(LATE, rows if isinstance(rows, pa.RecordBatch) else _as_batch(rows))]
        return emitted, ~late

    # --- output, snapshot, restore ---------------------------------------------------------------

    def _output(self, table: pa.Table, ends: pa.ChunkedArray | pa.Array) -> pa.RecordBatch:
        """Build the output batch from combined partials sorted by (window_start, keys)."""
        arrays: list[pa.ChunkedArray | pa.Array] = [table.column(k) for k in self._key_columns]
        arrays += [table.column("window_start"), ends]
        for aggregation, columns in zip(self._aggregations, self._partials, strict=True):
            arrays.append(aggregation.finalize([table.column(p.internal) for p in columns]))
        names = [*self._keys, "window_start", "window_end", *self._config.aggregates]
        combined = [a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a for a in arrays]
        return pa.RecordBatch.from_arrays(combined, names=names)

    def _metadata(self) -> dict[bytes, bytes]:
        window = type(self._config.window).__name__.lower()
        return {
            b"onceflow.state": b"window_aggregate",
            b"onceflow.version": str(STATE_FORMAT_VERSION).encode(),
            b"onceflow.window": window.encode(),
            b"onceflow.watermark": b"" if self._watermark is None else str(self._watermark).encode(),
            b"onceflow.late_events": str(self._late_events).encode(),
            b"onceflow.subtask": str(self._ctx.subtask).encode(),
        }

    def snapshot(self) -> pa.Table:
        """Return the open state as one Arrow table.

        Columns: ``key_group`` (int32: the group routing computed from the
        key's rows, kept with the state since the batch that brought it), the
        key columns, ``window_start``,
        ``window_end`` (for sessions, the ``[t, t + gap)`` window of each
        buffered event time), then the partial accumulators named
        ``<aggregate>.<suffix>`` (``total.sum``). Schema metadata holds the
        watermark (``onceflow.watermark``, empty before the first one), the
        late-event count, the subtask and the format version. Pass it to
        ``WindowAggregate.build(ctx, resume_state=...)`` to restore.
        """
        metadata = self._metadata()
        if self._schema is None:
            empty = pa.schema(
                [("key_group", pa.int32()), ("window_start", pa.int64()), ("window_end", pa.int64())],
                metadata=metadata,
            )
            return empty.empty_table()
        pieces = self._kind.state()
        return self._as_snapshot(pa.concat_tables(pieces) if pieces else self._schema.empty_table(), metadata)

    def snapshot_pieces(self) -> StatePieces:
        """The snapshot as pieces: a head with the metadata and no rows, and one table per partial table.

        A partial table is immutable until its window fires or its partials
        are combined, so an incremental checkpoint writes only the partial
        tables added since the newest completed checkpoint.
        """
        if self._schema is None:
            return StatePieces(self.snapshot(), [])
        head = self._as_snapshot(self._schema.empty_table(), self._metadata())
        return StatePieces(head, [(piece, self._as_snapshot(piece, None)) for piece in self._kind.state()])

    def _as_snapshot(self, state: pa.Table, metadata: dict[bytes, bytes] | None) -> pa.Table:
        """Partial tables (the state's internal columns) in the snapshot's columns."""
        starts = state.column("window_start")
        ends = pc.add(starts, pa.scalar(self._kind.size_ms, pa.int64()))
        columns = [state.column(_KEY_GROUP), *(state.column(k) for k in self._key_columns), starts, ends]
        columns += [state.column(name) for name in self._state_columns[2 + len(self._key_columns) :]]
        chunked = [c if isinstance(c, pa.ChunkedArray) else pa.chunked_array([c]) for c in columns]
        names = ["key_group", *self._keys, "window_start", "window_end", *self._snapshot_columns[2 + len(self._keys) :]]
        return pa.Table.from_arrays(chunked, names=names).replace_schema_metadata(metadata)

    def _restore(self, tables: list[pa.Table]) -> None:
        """Restore from snapshot tables, keeping the rows of this subtask's key groups."""
        operator = self._operator
        watermarks: list[int] = []
        parts: list[pa.Table] = []
        owned = self._ctx.key_groups
        for table in tables:
            metadata = table.schema.metadata or {}
            if metadata.get(b"onceflow.state", b"window_aggregate") != b"window_aggregate":
                msg = (
                    f"operator {operator!r}: resume_state is not window aggregate state; "
                    "restore from this operator's snapshot"
                )
                raise DataError(msg, operator=operator)
            watermark = metadata.get(b"onceflow.watermark", b"")
            if watermark:
                watermarks.append(int(watermark))
            subtask = int(metadata.get(b"onceflow.subtask", b"0"))
            if subtask % self._ctx.parallelism == self._ctx.subtask:
                self._late_events += int(metadata.get(b"onceflow.late_events", b"0"))
            names = set(table.column_names)
            if table.num_rows == 0 and names <= _RESERVED:
                continue
            for name in ["window_end", *self._snapshot_columns]:
                if name not in names:
                    msg = (
                        f"operator {operator!r}: resume_state lacks column {name!r}, so it was not written by "
                        "this window aggregation; restore from a snapshot of the same operator config"
                    )
                    raise DataError(msg, operator=operator, column=name)
            mine = in_key_groups(table.column("key_group").to_numpy(), owned)
            if not mine.all():
                table = table.filter(pa.array(mine))
            spans = pc.subtract(table.column("window_end"), table.column("window_start"))
            if table.num_rows and not pc.all(pc.equal(spans, self._kind.size_ms)).as_py():
                msg = (
                    f"operator {operator!r}: resume_state has windows of another size (column 'window_end'); "
                    "restore with the window config the snapshot was taken with"
                )
                raise DataError(msg, operator=operator, column="window_end")
            parts.append(
                pa.Table.from_arrays([table.column(name) for name in self._snapshot_columns], names=self._state_columns)
            )
        if watermarks:
            self._watermark = max(watermarks)
        if not parts:
            return
        schema = parts[0].schema
        state = pa.concat_tables([part.cast(schema) for part in parts])
        self._schema = schema
        if state.num_rows == 0:
            return
        self._kind.restore(state)
