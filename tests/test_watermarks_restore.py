"""Watermarks through a restore: a two-input job classifies late rows as the failure-free run does.

The job is a union of two sources feeding a keyed tumbling window (10 ms). The
sources move in rounds: each emits its rows, then waits (idles) until the other
source has injected a checkpoint barrier past its own rows, and then until it
injected a barrier itself. So every row reaches the window after the other
input's watermark of the round before (barrier alignment orders them), and the
failure-free output is the same on every run, late side output included.

Two rows are late only because of the *other* input's watermark: ``t=55`` from
``s2`` (``s1`` holds the combined watermark at 99, so window ``[50, 60)`` has
fired) and ``t=125`` from ``s1`` (``s2`` holds it at 149). An ``ABORT()`` right
after a round's checkpoint restores from that checkpoint, where the other
input's watermark lives only in the union subtask's snapshot (its input
channels' watermarks): that source's event time does not grow again.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

import onceflow as of
from onceflow.checkpoint.state import source_state
from onceflow.checkpoint.storage import CheckpointStorage
from onceflow.operators.sources.base import Idle, Source, SourceContext, SourceReader
from onceflow.runtime.channel import END_OF_TIME
from onceflow.runtime.deployment import CheckpointSetup, RestoredState, RuntimeOptions, SubtaskRestore
from onceflow.runtime.plan import plan
from onceflow.runtime.subtask import SourceSubtask
from tests.helpers import FakeDownstream


@dataclass(frozen=True)
class Hold:
    """Idle before item ``at`` until ``other`` injected a barrier at item ``past`` or later, then ``barriers`` own."""

    at: int
    other: str | None
    past: int
    barriers: int = 1


class RoundSource(Source):
    """A one-subtask ``TestingSource`` that waits at its ``holds``; it records its barriers as flag files.

    A flag ``<name>.<generation>.<index>`` says that a barrier was injected (the
    runtime asked for the offset) at item ``index``; the generation counts the
    readers built so far, so each attempt of the job waits on its own flags.
    """

    def __init__(self, name: str, items: list[Any], holds: list[Hold], flags: Path) -> None:
        self.name, self.inner, self.holds, self.flags = name, of.sources.TestingSource(items), holds, flags

    def build(self, ctx: SourceContext, resume_offset: Any | None = None) -> SourceReader:
        builds = self.flags / f"{self.name}.builds"
        with builds.open("a") as file:
            file.write("built\n")
        generation = len(builds.read_text().splitlines())
        return _RoundReader(self, self.inner.build(ctx, resume_offset), generation)

    def max_parallelism(self) -> int:
        return 1


class _RoundReader(SourceReader):
    def __init__(self, source: RoundSource, inner: SourceReader, generation: int) -> None:
        self._source, self._inner, self._generation = source, inner, generation
        self._holds = {hold.at: hold for hold in source.holds}
        self._released: set[int] = set()
        self._barriers = 0
        self._seen_at: int | None = None

    def _index(self) -> int:
        return int(self._inner.offset()["index"])

    def _reached(self, hold: Hold) -> bool:
        if hold.other is None:
            return True
        prefix = f"{hold.other}.{self._generation}."
        return any(int(p.name[len(prefix) :]) >= hold.past for p in self._source.flags.glob(f"{prefix}*"))

    def read(self) -> pa.RecordBatch | Idle | None:
        index = self._index()
        hold = self._holds.get(index)
        if hold is not None and index not in self._released:
            if self._seen_at is None:
                if not self._reached(hold):
                    return Idle(0.01)
                self._seen_at = self._barriers
            if self._barriers - self._seen_at < hold.barriers:
                return Idle(0.01)
            self._released.add(index)
            self._seen_at = None
        return self._inner.read()

    def offset(self) -> Any:
        self._barriers += 1
        (self._source.flags / f"{self._source.name}.{self._generation}.{self._index()}").touch()
        return self._inner.offset()


def row(source: str, t: int) -> dict[str, Any]:
    return {"k": "k", "t": t, "src": source}


EXPECTED_WINDOWS = [("k", 10, 20, 1), ("k", 100, 110, 1), ("k", 150, 160, 1), ("k", 200, 210, 1)]
EXPECTED_LATE = [("s1", 125), ("s2", 55)]


def round_flow(
    job: str, flags: Path, abort: str | None
) -> tuple[of.Dataflow, of.sinks.TestingSink, of.sinks.TestingSink]:
    """The two-source job; ``abort`` puts an ``ABORT()`` into ``"s2"`` (round 2) or ``"s1"`` (round 3)."""
    crash = [of.sources.TestingSource.ABORT()]
    # s1: t=100 | wait for s2's round 2 | (ABORT) t=200, t=125 (late) | let s2 end after this
    s1_items = [row("s1", 100), *(crash if abort == "s1" else []), row("s1", 200), row("s1", 125)]
    # s2: t=10 | wait for s1's round 1 | (ABORT) t=150, t=55 (late) | wait for s1's round 3, then end
    s2_items = [row("s2", 10), *(crash if abort == "s2" else []), row("s2", 150), row("s2", 55)]
    s1_holds = [Hold(1, "s2", len(s2_items), barriers=2 if abort == "s1" else 1), Hold(len(s1_items), None, 0)]
    s2_holds = [Hold(1, "s1", 1, barriers=2 if abort == "s2" else 1), Hold(len(s2_items), "s1", len(s1_items))]
    flow = of.Dataflow(job)
    watermark = of.BoundedOutOfOrderness("t")
    s1 = flow.source(RoundSource("s1", s1_items, s1_holds, flags), watermark=watermark, name="s1")
    s2 = flow.source(RoundSource("s2", s2_items, s2_holds, flags), watermark=watermark, name="s2")
    windows = s1.union(s2).key_by("k").window(of.windows.Tumbling(size_ms=10)).aggregate(n=of.agg.count())
    main, late = of.sinks.TestingSink(), of.sinks.TestingSink()
    windows.sink(main)
    windows.late_events().sink(late)
    return flow, main, late


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("abort", [None, "s2", "s1"], ids=["failure-free", "restore-round-1", "restore-round-2"])
def test_restored_two_input_job_sends_the_same_rows_late(tmp_path: Path, abort: str | None) -> None:
    flags = tmp_path / "flags"
    flags.mkdir()
    flow, main, late = round_flow(f"wm-restore-{abort or 'none'}", flags, abort)
    result = of.run(
        flow,
        checkpoint=of.CheckpointConfig(interval_s=0.05, storage=str(tmp_path / "chk")),
        restart=of.RestartStrategy.fixed_delay(attempts=2, delay_s=0.05),
        timeout_s=120,
    )
    assert result.metrics["restarts"] == (1 if abort else 0)
    if abort:
        assert result.metrics["restored_from"], "the restart restored no checkpoint"
    windows = sorted((r["k"], r["window_start"], r["window_end"], r["n"]) for r in main.rows())
    assert windows == EXPECTED_WINDOWS
    assert sorted((r["src"], r["t"]) for r in late.rows()) == EXPECTED_LATE


# -- a restored source announces its watermark ----------------------------------------------------------


def test_a_restored_generator_starts_from_its_watermark() -> None:
    strategy = of.BoundedOutOfOrderness("t", max_delay_ms=5)
    assert strategy.build("s").on_start() is None
    restored = strategy.build("s", max_event_time=100)
    assert restored.on_start() == 94
    assert restored.on_batch(pa.record_batch({"t": [60]})) is None  # event time did not grow
    assert restored.on_batch(pa.record_batch({"t": [120]})) == 114


def test_a_restored_source_sends_its_watermark_before_its_first_row(tmp_path: Path) -> None:
    flow = of.Dataflow("wm-announce")
    items = [row("s1", 100), row("s1", 50)]
    events = flow.source(of.sources.TestingSource(items), watermark=of.BoundedOutOfOrderness("t"), name="s1")
    events.key_by("k").window(of.windows.Tumbling(size_ms=10)).aggregate(n=of.agg.count()).sink(of.sinks.TestingSink())
    physical = plan(flow)
    source = next(v for v in physical.vertices if v.is_source)
    state = source_state({"index": 1, "aborted": []}, max_event_time=100)
    uid = source.nodes[0].uid
    handle = CheckpointStorage(str(tmp_path), "wm-announce").write_state(1, "s1/0", uid, state)
    restore = SubtaskRestore(1, {uid: [RestoredState(handle.path)]})
    no_coordinator: Any = None
    actor = SourceSubtask(
        physical, source.id, 0, RuntimeOptions(), CheckpointSetup(no_coordinator, str(tmp_path)), restore
    )
    downstream = FakeDownstream()
    handle_of_downstream: Any = downstream

    async def run() -> None:
        await actor.connect({spec.target: [handle_of_downstream] for spec in source.outputs})
        await actor.run()

    asyncio.run(run())
    counters = actor.metrics()
    assert counters.restored_from == 1 and counters.first_record_at is not None  # what the recovery benchmark reads
    marks = [mark for message in downstream.messages for mark in message.watermarks]
    rows = [r["t"] for message in downstream.messages if message.batch is not None for r in message.batch.to_pylist()]
    assert rows == [50]
    assert marks[0] == (0, 99)  # before the first row, although event time never grows past 100 again
    assert marks[-1][1] == END_OF_TIME
