"""Tests for onceflow.operators.window_kinds: the fixed and session window strategies on their own."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from onceflow.operators.window_kinds import FixedWindows, PartialLayout, SessionWindows

LAYOUT = PartialLayout(("k0",), ("window_start", "k0", "n"), (("n", "n", "sum"),))


def partials(starts: list[int], keys: list[Any], counts: list[int]) -> pa.Table:
    return pa.table({"window_start": pa.array(starts, pa.int64()), "k0": keys, "n": pa.array(counts, pa.int64())})


def rows(table: pa.Table) -> list[tuple[int, Any, int]]:
    return [(r["window_start"], r["k0"], r["n"]) for r in table.select(["window_start", "k0", "n"]).to_pylist()]


# --- fixed windows -------------------------------------------------------------------------------------


def test_fixed_last_start_follows_the_grid_and_its_offset() -> None:
    tumbling = FixedWindows(10, 10, 3, LAYOUT)
    assert tumbling.last_starts(np.array([0, 3, 12, 13, -1])).tolist() == [-7, 3, 3, 13, -7]
    sliding = FixedWindows(10, 4, 0, LAYOUT)
    assert sliding.last_starts(np.array([0, 5, 9])).tolist() == [0, 4, 8]


def test_sliding_assign_gives_a_row_every_window_that_contains_it_and_has_not_fired() -> None:
    kind = FixedWindows(10, 4, 0, LAYOUT)  # an event belongs to 2 or 3 windows
    times = np.array([9, 12], dtype=np.int64)
    inputs = partials(times.tolist(), ["a", "b"], [1, 1])
    assigned = kind.assign(inputs, times, kind.last_starts(times), None)
    assert sorted(rows(assigned)) == [(0, "a", 1), (4, "a", 1), (4, "b", 1), (8, "a", 1), (8, "b", 1), (12, "b", 1)]
    after_limit = kind.assign(inputs, times, kind.last_starts(times), 4)  # windows starting at 4 or before fired
    assert sorted(rows(after_limit)) == [(8, "a", 1), (8, "b", 1), (12, "b", 1)]


def test_tumbling_assign_puts_each_row_in_its_one_window() -> None:
    kind = FixedWindows(10, 10, 0, LAYOUT)
    times = np.array([1, 15], dtype=np.int64)
    assigned = kind.assign(partials(times.tolist(), [1, 2], [1, 1]), times, kind.last_starts(times), None)
    assert rows(assigned) == [(0, 1, 1), (10, 2, 1)]


def test_fixed_fire_takes_the_windows_up_to_the_limit_combined_and_sorted() -> None:
    kind = FixedWindows(10, 10, 0, LAYOUT)
    kind.add(partials([0, 0, 10, 20], [1, 2, 1, 1], [1, 1, 1, 1]))
    kind.add(partials([0, 10], [1, 1], [5, 5]))
    assert kind.open_windows() == 3
    assert kind.fire(-1) is None
    fired = kind.fire(10)
    assert fired is not None
    assert rows(fired.partials) == [(0, 1, 6), (0, 2, 1), (10, 1, 6)]
    assert fired.ends.to_pylist() == [10, 10, 20]
    assert kind.open_windows() == 1
    rest = kind.fire(None)
    assert rest is not None and rows(rest.partials) == [(20, 1, 1)]
    assert kind.open_windows() == 0 and kind.state() == []


def test_fixed_windows_compact_their_partials_into_one_table() -> None:
    kind = FixedWindows(10, 10, 0, LAYOUT)
    for _ in range(20):
        kind.add(partials([0], [1], [1]))
    assert len(kind.state()) <= 9
    fired = kind.fire(None)
    assert fired is not None and rows(fired.partials) == [(0, 1, 20)]


def test_fixed_restore_takes_back_its_state() -> None:
    kind = FixedWindows(10, 10, 0, LAYOUT)
    kind.add(partials([0, 10], [1, 1], [2, 3]))
    kind.add(partials([0], [1], [4]))
    restored = FixedWindows(10, 10, 0, LAYOUT)
    restored.restore(pa.concat_tables(kind.state()))
    assert restored.open_windows() == 2
    fired = restored.fire(None)
    assert fired is not None and rows(fired.partials) == [(0, 1, 6), (10, 1, 3)]


# --- session windows -----------------------------------------------------------------------------------


def test_session_assign_keeps_each_event_in_its_own_window() -> None:
    kind = SessionWindows(5, LAYOUT)
    times = np.array([7, 3], dtype=np.int64)
    inputs = partials(times.tolist(), ["a", "a"], [1, 1])
    assert kind.last_starts(times).tolist() == [7, 3]
    assert kind.assign(inputs, times, kind.last_starts(times), 100) is inputs


def test_sessions_merge_per_key_and_fire_once_their_last_event_passes_the_limit() -> None:
    kind = SessionWindows(5, LAYOUT)
    kind.add(partials([0, 3, 20, 1], ["a", "a", "a", "b"], [1, 1, 1, 1]))
    kind.add(partials([7], ["a"], [1]))  # 7 - 3 < 5: joins a's first session
    assert kind.open_windows() == 3
    assert kind.fire(-1) is None  # before the earliest event: no merging needed
    b = kind.fire(6)  # b's session ended at its event at 1; a's first lasts until its event at 7
    assert b is not None and rows(b.partials) == [(1, "b", 1)] and b.ends.to_pylist() == [6]
    assert kind.open_windows() == 2
    fired = kind.fire(7)
    assert fired is not None
    assert rows(fired.partials) == [(0, "a", 3)] and fired.ends.to_pylist() == [12]
    assert kind.open_windows() == 1
    rest = kind.fire(None)
    assert rest is not None and rows(rest.partials) == [(20, "a", 1)] and rest.ends.to_pylist() == [25]
    assert kind.fire(None) is None and kind.open_windows() == 0


def test_session_restore_takes_back_its_buffer() -> None:
    kind = SessionWindows(5, LAYOUT)
    kind.add(partials([0, 3], ["a", "a"], [1, 2]))
    restored = SessionWindows(5, LAYOUT)
    restored.restore(pa.concat_tables(kind.state()))
    assert restored.open_windows() == 1
    assert restored.fire(2) is None
    fired = restored.fire(3)
    assert fired is not None and rows(fired.partials) == [(0, "a", 3)] and fired.ends.to_pylist() == [8]


def test_session_size_is_the_gap() -> None:
    assert SessionWindows(30, LAYOUT).size_ms == 30
    assert FixedWindows(60, 10, 0, LAYOUT).size_ms == 60
