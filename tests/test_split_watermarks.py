"""Per-split watermarks: the lowest over the splits, idle splits left out (a test clock, no sleeps)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from onceflow.errors import DataError
from onceflow.operators.watermark import BoundedOutOfOrderness, SplitWatermarkGenerator


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def generator(clock: Clock, idle_timeout_s: float | None = None, max_event_time: int | None = None,
              splits: tuple[int, ...] = (0, 1, 2)) -> SplitWatermarkGenerator:
    made = BoundedOutOfOrderness("t", max_delay_ms=10).build_per_split(
        "source_0", max_event_time, idle_timeout_s=idle_timeout_s, clock=clock)
    made.assign(splits)
    return made


def batch(*times: int) -> pa.RecordBatch:
    return pa.record_batch({"t": list(times)})


def test_the_watermark_is_the_lowest_over_the_splits_and_waits_for_every_split() -> None:
    clock = Clock()
    watermarks = generator(clock)
    watermarks.observe_batch(batch(500, 100, 300), np.array([0, 1, 0]))
    assert watermarks.on_batch(batch()) is None  # split 2 has no event time yet
    watermarks.observe(2, 200)
    assert watermarks.on_batch(batch()) == 89  # split 1 at 100
    watermarks.observe(1, 1_000)
    assert watermarks.on_batch(batch()) == 189  # now split 2 at 200
    assert watermarks.on_batch(batch()) is None  # unchanged: nothing new to emit
    assert watermarks.split_max_event_times() == {0: 500, 1: 1_000, 2: 200}
    assert watermarks.max_event_time == 200


def test_without_a_timeout_a_quiet_split_holds_the_watermark_for_ever() -> None:
    clock = Clock()
    watermarks = generator(clock)
    watermarks.observe(0, 100)
    watermarks.observe(1, 100)
    clock.now = 1e9
    assert watermarks.on_idle() is None


def test_a_split_quiet_for_the_timeout_stops_holding_the_watermark_back_until_it_delivers() -> None:
    clock = Clock()
    watermarks = generator(clock, idle_timeout_s=5)
    clock.now = 1
    watermarks.observe(0, 1_000)
    watermarks.observe(1, 400)
    assert watermarks.on_idle() is None  # split 2 is not idle yet
    clock.now = 5  # split 2 assigned at 0: idle from 5 on
    assert watermarks.on_idle() == 389
    clock.now = 6  # splits 0 and 1 idle too: the lowest of those with rows
    assert watermarks.on_idle() is None
    watermarks.observe(1, 2_000)  # split 1 active again, the only one
    assert watermarks.on_idle() == 1_989
    watermarks.observe(2, 50)  # split 2 back, far behind: the watermark never goes back
    assert watermarks.on_batch(batch()) is None
    assert watermarks.current() == 39
    watermarks.observe(2, 3_000)
    watermarks.observe(0, 2_500)
    assert watermarks.on_batch(batch()) is None  # split 1 (2,000) is the lowest: unchanged
    assert watermarks.current() == 1_989
    watermarks.observe(1, 4_000)
    assert watermarks.on_batch(batch()) == 2_489


def test_when_every_split_is_idle_the_watermark_is_the_lowest_of_those_that_delivered() -> None:
    clock = Clock()
    watermarks = generator(clock, idle_timeout_s=1)
    watermarks.observe(0, 700)
    watermarks.observe(1, 900)
    clock.now = 10
    assert watermarks.on_idle() == 689


def test_a_restored_generator_starts_at_its_watermark_and_its_splits_at_their_times() -> None:
    clock = Clock()
    watermarks = BoundedOutOfOrderness("t", max_delay_ms=10).build_per_split(
        "source_0", max_event_time=300, idle_timeout_s=None, clock=clock)
    watermarks.assign([0, 1], {0: 300, 1: 800})
    assert watermarks.on_start() == 289
    assert watermarks.max_event_time == 300
    watermarks.observe(0, 900)
    assert watermarks.on_batch(batch()) == 789
    fresh = generator(clock)
    assert fresh.on_start() is None
    assert fresh.max_event_time is None


def test_timestamps_are_milliseconds_and_a_missing_column_is_a_data_error() -> None:
    watermarks = generator(Clock(), splits=(0,))
    stamps = pa.array([2_000_000, 5_000_000], pa.timestamp("us"))
    watermarks.observe_batch(pa.record_batch({"t": stamps}), np.array([0, 0]))
    assert watermarks.split_max_event_times() == {0: 5_000}
    with pytest.raises(DataError, match="'t' is missing"):
        watermarks.observe_batch(pa.record_batch({"x": [1]}), np.array([0]))


def test_the_subtask_wide_generator_never_advances_on_an_idle_read() -> None:
    single = BoundedOutOfOrderness("t", max_delay_ms=10).build("source_0")
    assert single.on_batch(batch(100)) == 89
    assert single.on_idle() is None
