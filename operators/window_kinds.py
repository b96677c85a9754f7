"""Window kinds: what differs between fixed (tumbling, sliding) and session windows.

:class:`~onceflow.operators.windows.WindowAggregateLogic` validates input,
pre-aggregates it into *partial tables* (one row per window start and key),
splits off late rows, builds the output and writes snapshots; it holds one
:class:`WindowKind` for everything that depends on the kind of window:

- which windows a row belongs to (:meth:`WindowKind.last_starts`,
  :meth:`WindowKind.assign`),
- how partial tables are kept and merged (:meth:`WindowKind.add`),
- which windows fire at a watermark (:meth:`WindowKind.fire`),
- what the state is, for a snapshot, and how it comes back
  (:meth:`WindowKind.state`, :meth:`WindowKind.restore`).

Partial tables follow a :class:`PartialLayout`: ``window_start`` (int64 ms),
the key columns, then the accumulator columns, with internal names.

:class:`FixedWindows` keeps the partials of each window start apart and
fires a window once the watermark passes its start's firing limit.
:class:`SessionWindows` keeps one partial row per (key, event time) until its
session fires, and merges rows into sessions only when it needs them.

Example:
    >>> import pyarrow as pa
    >>> layout = PartialLayout(("k0",), ("window_start", "k0", "n"), (("n", "n", "sum"),))
    >>> kind = FixedWindows(size_ms=10, slide_ms=10, offset_ms=0, layout=layout)
    >>> kind.add(pa.table({"window_start": [0, 10], "k0": [1, 1], "n": [2, 1]}))
    >>> kind.open_windows()
    2
    >>> fired = kind.fire(limit=5)
    >>> fired.partials.to_pylist(), fired.ends.to_pylist()
    ([{'window_start': 0, 'k0': 1, 'n': 2}], [10])

"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from onceflow.operators.agg import reduce_groups

__all__ = ["FiredWindows", "FixedWindows", "PartialLayout", "SessionWindows", "WindowKind"]

_COMPACT_AT = 8
"""Partial tables a window keeps before they are combined into one."""
_END = "_end"
"""The internal column holding each fired session's end."""

Reduction = tuple[str, str | None, str]
"""An ``(output, input, function)`` triple for :func:`~onceflow.operators.agg.reduce_groups`."""


@dataclass(frozen=True, slots=True)
class PartialLayout:
    """The columns of a partial table and how two partials of one group combine.

    Attributes:
        key_columns: the internal key column names, in key order.
        state_columns: every column of a partial table, in order:
            ``window_start``, the key columns, then the accumulators.
        combine: one reduction per accumulator column, merging partials of
            the same (window, key) into one row.
    """

    key_columns: tuple[str, ...]
    state_columns: tuple[str, ...]
    combine: tuple[Reduction, ...]


@dataclass(frozen=True, slots=True)
class FiredWindows:
    """Windows that fired: their combined partials and where each ends.

    Attributes:
        partials: one row per fired (window, key), in the layout's columns
            (possibly with more), sorted by ``(window_start, keys)``.
        ends: each row's window end (int64 ms, exclusive).
    """

    partials: pa.Table
    ends: pa.Array | pa.ChunkedArray


class WindowKind(ABC):
    """The window-kind strategy of one window aggregation (sans-IO, no Ray).

    Attributes:
        size_ms: the span of every state row's window, ``window_end -
            window_start`` in a snapshot (for sessions, the gap of each
            buffered event's ``[t, t + gap)``); a window fires once the
            watermark reaches ``start + size_ms - 1`` plus the allowed lateness.
    """

    size_ms: int

    @abstractmethod
    def last_starts(self, times: np.ndarray) -> np.ndarray:
        """The start of the last window each event time belongs to (int64 ms).

        An event is late when this start's window has fired, so the logic
        compares it with the firing limit.
        """

    @abstractmethod
    def assign(self, inputs: pa.Table, times: np.ndarray, last_starts: np.ndarray, limit: int | None) -> pa.Table:
        """Give every input row its window start, one row per (row, window) it counts towards.

        Args:
            inputs: the rows (none of them late), ``window_start`` first
                (holding the event times), then keys, key group, inputs.
            times: the event times of the rows, int64 ms.
            last_starts: :meth:`last_starts` of ``times``.
            limit: the greatest window start that has fired (``None``
                before the first watermark); a row counts only towards
                windows that start after it.

        Returns:
            The rows with ``window_start`` set to the start of a window.
        """

    @abstractmethod
    def add(self, piece: pa.Table) -> None:
        """Keep a partial table sorted by ``(window_start, keys)``, one row per group."""

    @abstractmethod
    def fire(self, limit: int | None) -> FiredWindows | None:
        """Remove and return the windows whose start (for sessions, last event) is at most ``limit``.

        Args:
            limit: the firing limit in ms; ``None`` fires every window left.

        Returns:
            The fired windows, or ``None`` when none fires.
        """

    @abstractmethod
    def open_windows(self) -> int:
        """The number of windows still open (the ``open_windows`` metric)."""

    @abstractmethod
    def state(self) -> list[pa.Table]:
        """The partial tables that make up the open state, for a snapshot."""

    @abstractmethod
    def restore(self, state: pa.Table) -> None:
        """Take back partials from a snapshot (non-empty, in the layout's columns)."""


class FixedWindows(WindowKind):
    """Tumbling and sliding windows: a grid of windows shared by every key.

    Partials are kept per window start (a window with more than a few partial
    tables has them combined into one); a window fires when the watermark's
    limit reaches its start.

    Args:
        size_ms: the window length.
        slide_ms: the distance between window starts (``size_ms`` for tumbling windows).
        offset_ms: where the grid starts.
        layout: the partial tables' columns.

    Example:
        >>> import numpy as np
        >>> kind = FixedWindows(size_ms=10, slide_ms=5, offset_ms=0, layout=PartialLayout((), ("window_start",), ()))
        >>> kind.last_starts(np.array([3, 12]))
        array([ 0, 10])

    """

    def __init__(self, size_ms: int, slide_ms: int, offset_ms: int, layout: PartialLayout) -> None:
        self.size_ms = size_ms
        self._slide = slide_ms
        self._offset = offset_ms
        self._layout = layout
        self._windows_per_event = -(-size_ms // slide_ms)
        # window start -> partial tables, each sorted by keys, one row per key
        self._windows: dict[int, list[pa.Table]] = {}

    def last_starts(self, times: np.ndarray) -> np.ndarray:
        return times - np.mod(times - np.int64(self._offset), np.int64(self._slide))

    def assign(self, inputs: pa.Table, times: np.ndarray, last_starts: np.ndarray, limit: int | None) -> pa.Table:
        if self._windows_per_event == 1:
            starts = last_starts
        else:
            rows, start_parts = [], []
            for j in range(self._windows_per_event):
                start = last_starts - np.int64(j * self._slide)
                contains = start > times - np.int64(self.size_ms)
                if limit is not None:
                    contains &= start > limit
                selected = np.flatnonzero(contains)
                rows.append(selected)
                start_parts.append(start[selected])
            inputs = inputs.take(pa.array(np.concatenate(rows)))
            starts = np.concatenate(start_parts)
        return inputs.set_column(0, "window_start", pa.array(starts, type=pa.int64()))

    def add(self, piece: pa.Table) -> None:
        starts = piece.column("window_start").to_numpy()
        bounds = np.flatnonzero(starts[1:] != starts[:-1]) + 1
        edges = [0, *bounds.tolist(), len(starts)]
        for begin, end in itertools.pairwise(edges):
            pieces = self._windows.setdefault(int(starts[begin]), [])
            pieces.append(piece.slice(begin, end - begin) if len(edges) > 2 else piece)
            if len(pieces) > _COMPACT_AT:
                pieces[:] = self._compacted(pieces)

    def _compacted(self, pieces: list[pa.Table]) -> list[pa.Table]:
        """Fewer pieces, size-tiered: the pieces of the smallest size tier (powers of 4 rows) that has several.

        Small recent pieces are combined among themselves, and a large piece
        (most of a long window's keys) only once others have grown about as
        large, so each row is rewritten a logarithmic number of times and an
        incremental checkpoint rarely writes the bulk of the state again.
        Partials combine in any order, so which pieces go together is free.
        """
        tiers: dict[int, list[pa.Table]] = {}
        for piece in pieces:
            tiers.setdefault(max(piece.num_rows, 1).bit_length() // 2, []).append(piece)
        for tier in sorted(tiers):
            group = tiers[tier]
            if len(group) >= 2:
                members = {id(p) for p in group}
                return [*(p for p in pieces if id(p) not in members), self._combine(group)]
        return [self._combine(pieces)]

    def _combine(self, pieces: list[pa.Table]) -> pa.Table:
        layout = self._layout
        merged = reduce_groups(pa.concat_tables(pieces), ["window_start", *layout.key_columns], layout.combine)
        return merged.select(list(layout.state_columns))

    def fire(self, limit: int | None) -> FiredWindows | None:
        fired = sorted(start for start in self._windows if limit is None or start <= limit)
        if not fired:
            return None
        parts = []
        for start in fired:
            pieces = self._windows.pop(start)
            parts.append(pieces[0] if len(pieces) == 1 else self._combine(pieces))
        table = pa.concat_tables(parts)
        return FiredWindows(table, pc.add(table.column("window_start"), pa.scalar(self.size_ms, pa.int64())))

    def open_windows(self) -> int:
        """The number of distinct open window intervals (shared by all keys)."""
        return len(self._windows)

    def state(self) -> list[pa.Table]:
        return [piece for start in sorted(self._windows) for piece in self._windows[start]]

    def restore(self, state: pa.Table) -> None:
        merged = self._combine([state])
        self.add(merged if merged.schema.equals(state.schema) else merged.cast(state.schema))


class SessionWindows(WindowKind):
    """Session windows: per key, events less than a gap apart form one window.

    Every event is kept as its own ``[t, t + gap)`` partial (one row per key
    and event time); overlapping windows of a key merge into a session when
    sessions are needed (at a watermark past the earliest buffered event, at
    the end of input, or for the ``open_windows`` metric).

    Args:
        gap_ms: the inactivity gap that ends a session.
        layout: the partial tables' columns.

    Example:
        >>> import pyarrow as pa
        >>> layout = PartialLayout(("k0",), ("window_start", "k0", "n"), (("n", "n", "sum"),))
        >>> kind = SessionWindows(gap_ms=5, layout=layout)
        >>> kind.add(pa.table({"window_start": [0, 3, 20], "k0": ["a", "a", "a"], "n": [1, 1, 1]}))
        >>> kind.open_windows()
        2
        >>> fired = kind.fire(limit=7)
        >>> fired.partials.select(["window_start", "k0", "n"]).to_pylist(), fired.ends.to_pylist()
        ([{'window_start': 0, 'k0': 'a', 'n': 2}], [8])
        >>> kind.open_windows()
        1

    """

    def __init__(self, gap_ms: int, layout: PartialLayout) -> None:
        self.size_ms = gap_ms
        self._layout = layout
        # partial tables with one row per (key, event time), in any order
        self._buffer: list[pa.Table] = []
        self._buffer_min: int | None = None
        self._open_sessions: int | None = 0

    def last_starts(self, times: np.ndarray) -> np.ndarray:
        """An event's only window before merging is ``[t, t + gap)``: its start is the event time."""
        return times

    def assign(self, inputs: pa.Table, times: np.ndarray, last_starts: np.ndarray, limit: int | None) -> pa.Table:
        """Every row stays as it is: its ``window_start`` is already its event time."""
        return inputs

    def add(self, piece: pa.Table) -> None:
        self._buffer.append(piece)
        earliest = int(pc.min(piece.column("window_start")).as_py())
        self._buffer_min = earliest if self._buffer_min is None else min(self._buffer_min, earliest)
        if len(self._buffer) > 4 * _COMPACT_AT:
            self._buffer = [pa.concat_tables(self._buffer).combine_chunks()]
        self._open_sessions = None

    def _sessions(self) -> tuple[pa.Table, np.ndarray, np.ndarray, np.ndarray]:
        """Merge the buffer into sessions.

        Returns:
            The buffered partials sorted by (keys, time), one row per (key,
            time); the first row of each session; each session's number of
            rows; each session's last event time.

        """
        layout = self._layout
        merged = reduce_groups(pa.concat_tables(self._buffer), [*layout.key_columns, "window_start"], layout.combine)
        merged = merged.select(list(layout.state_columns))
        times = merged.column("window_start").to_numpy()
        rows = len(times)
        new_session = np.empty(rows, dtype=bool)
        new_session[0] = True
        np.greater_equal(times[1:] - times[:-1], np.int64(self.size_ms), out=new_session[1:])
        for key in layout.key_columns:
            new_session[1:] |= _key_changes(merged.column(key))
        starts = np.flatnonzero(new_session)
        lengths = np.diff(np.append(starts, rows))
        last_times = times[starts + lengths - 1]
        return merged, starts, lengths, last_times

    def fire(self, limit: int | None) -> FiredWindows | None:
        if not self._buffer:
            return None
        if limit is not None and (self._buffer_min is None or self._buffer_min > limit):
            return None
        merged, starts, lengths, last_times = self._sessions()
        fire = np.ones(len(starts), dtype=bool) if limit is None else last_times <= limit
        fired_sessions = int(np.count_nonzero(fire))
        if not fired_sessions:
            self._buffer = [merged]
            self._open_sessions = len(starts)
            return None
        times = merged.column("window_start").to_numpy()
        if fired_sessions == len(starts):
            fired = merged
            self._buffer, self._buffer_min = [], None
        else:
            fire_rows = np.repeat(fire, lengths)
            fired = merged.filter(pa.array(fire_rows))
            rest = ~fire_rows
            self._buffer = [merged.filter(pa.array(rest))]
            self._buffer_min = int(times[rest].min())
        self._open_sessions = len(starts) - fired_sessions
        session_start = np.repeat(times[starts[fire]], lengths[fire])
        session_end = np.repeat(last_times[fire] + np.int64(self.size_ms), lengths[fire])
        fired = fired.set_column(0, "window_start", pa.array(session_start, type=pa.int64()))
        fired = fired.append_column(_END, pa.array(session_end, type=pa.int64()))
        layout = self._layout
        reductions = [*layout.combine, (_END, _END, "max")]
        sessions = reduce_groups(fired, ["window_start", *layout.key_columns], reductions)
        return FiredWindows(sessions, sessions.column(_END))

    def open_windows(self) -> int:
        """The number of open (key, session) pairs (merged on demand, then remembered)."""
        if self._open_sessions is None:
            if self._buffer:
                merged, starts, _, _ = self._sessions()
                self._buffer = [merged]
                self._open_sessions = len(starts)
            else:
                self._open_sessions = 0
        return self._open_sessions

    def state(self) -> list[pa.Table]:
        return list(self._buffer)

    def restore(self, state: pa.Table) -> None:
        self._buffer = [state]
        self._buffer_min = int(pc.min(state.column("window_start")).as_py())
        self._open_sessions = None


def _key_changes(column: pa.ChunkedArray) -> np.ndarray:
    """For a sorted column of n values, whether value i + 1 differs from value i."""
    array = column.combine_chunks()
    if pa.types.is_integer(array.type) and not array.null_count:
        values = array.to_numpy()
        return values[1:] != values[:-1]
    after, before = array.slice(1), array.slice(0, len(array) - 1)
    changed = pc.fill_null(pc.not_equal(after, before), False)
    if array.null_count:
        changed = pc.or_(changed, pc.xor(after.is_null(), before.is_null()))
    return changed.to_numpy(zero_copy_only=False)
