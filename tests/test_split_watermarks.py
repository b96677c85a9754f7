"""Per-split watermarks: the lowest over the splits, idle splits left out (a test clock, no sleeps)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

import onceflow as of
from onceflow.errors import DataError
from onceflow.operators.sources.base import Idle, PerSplitWatermarks, Source, SourceContext, SourceReader
from onceflow.operators.watermark import BoundedOutOfOrderness, SplitWatermarkGenerator
from onceflow.runtime.channel import END_OF_TIME
from onceflow.runtime.deployment import CheckpointSetup, RuntimeOptions
from onceflow.runtime.plan import plan
from onceflow.runtime.subtask import SourceSubtask
from tests.helpers import FakeDownstream


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


class TwoSplitSource(Source):
    """Split 0 delivers ``t=100`` once, split 1 nothing; each read is one tick of the reader's clock."""

    def __init__(self, reads: int) -> None:
        self.reads = reads

    def build(self, ctx: SourceContext, resume_offset: Any | None = None) -> TwoSplitReader:
        return TwoSplitReader(self.reads)


class TwoSplitReader(SourceReader, PerSplitWatermarks):
    def __init__(self, reads: int) -> None:
        self.clock = Clock()
        self.left = reads
        self.watermarks: SplitWatermarkGenerator | None = None

    def split_watermarks(self, strategy: BoundedOutOfOrderness, max_event_time: int | None) -> SplitWatermarkGenerator:
        self.watermarks = strategy.build_per_split("s", max_event_time, idle_timeout_s=2, clock=self.clock)
        self.watermarks.assign([0, 1])
        return self.watermarks

    def read(self) -> pa.RecordBatch | Idle | None:
        self.clock.now += 1
        self.left -= 1
        if self.left < 0:
            return None
        if self.watermarks is not None and self.clock.now == 1:
            batch = pa.record_batch({"k": [1], "t": [100]})
            self.watermarks.observe_batch(batch, np.array([0]))
            return batch
        return Idle(0)

    def offset(self) -> Any:
        return {}


def test_a_source_subtask_asks_a_per_split_reader_and_advances_on_idle_reads(tmp_path: Path) -> None:
    flow = of.Dataflow("split-idle")
    events = flow.source(TwoSplitSource(reads=4), watermark=of.BoundedOutOfOrderness("t"), name="s")
    events.key_by("k").window(of.windows.Tumbling(size_ms=10)).aggregate(n=of.agg.count()).sink(of.sinks.TestingSink())
    physical = plan(flow)
    source = next(v for v in physical.vertices if v.is_source)
    no_coordinator: Any = None
    actor = SourceSubtask(physical, source.id, 0, RuntimeOptions(), CheckpointSetup(no_coordinator, str(tmp_path)),
                          None)
    downstream = FakeDownstream()
    handle_of_downstream: Any = downstream
    reader = actor._reader
    assert isinstance(reader, TwoSplitReader) and reader.watermarks is not None  # the runtime asked the reader
    advanced: list[tuple[float, int]] = []
    advance = actor._advance_watermark

    async def recorded(watermark: int) -> None:
        advanced.append((reader.clock.now, watermark))
        await advance(watermark)

    actor._advance_watermark = recorded  # type: ignore[method-assign]

    async def run() -> None:
        await actor.connect({spec.target: [handle_of_downstream] for spec in source.outputs})
        await actor.run()

    asyncio.run(run())
    # Read 1 (tick 1) delivers t=100, split 1 holds the watermark; read 2 (tick 2) is Idle, and split 1,
    # assigned at tick 0 and silent for the 2-tick timeout, is idle, split 0 is not: 100 - 0 - 1.
    assert advanced[0] == (2, 99)
    marks = [mark for message in downstream.messages for mark in message.watermarks]
    assert marks[-1][1] == END_OF_TIME
    assert reader.watermarks.max_event_time == 100  # what the checkpoint keeps
