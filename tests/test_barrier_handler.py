"""AlignedBarrierHandler: alignment, subsumption, aborts, and random interleavings of channels."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onceflow.checkpoint.barrier_handler import (
    AbortAlignment,
    AlignedBarrierHandler,
    BarrierAction,
    Block,
    CollectingBarriers,
    Release,
    Snapshot,
    WaitingForFirstBarrier,
)


class FakeClock:
    """Seconds that only move when a test says so."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# -- deterministic unit tests -------------------------------------------------------------


def test_single_channel_snapshots_at_once() -> None:
    clock = FakeClock(5.0)
    handler = AlignedBarrierHandler(channels=1, clock=clock)
    assert handler.on_barrier(0, checkpoint_id=1) == [Snapshot(1, 0.0)]
    assert not handler.is_blocked(0)
    assert handler.state == WaitingForFirstBarrier(last=1)
    clock.advance(3.0)
    assert handler.on_barrier(0, checkpoint_id=2) == [Snapshot(2, 0.0)]
    assert handler.on_barrier(0, checkpoint_id=2) == []  # repeated
    assert handler.last == 2


def test_two_channels_block_then_snapshot_with_alignment_time() -> None:
    clock = FakeClock(1.0)
    handler = AlignedBarrierHandler(channels=2, clock=clock)
    assert handler.on_barrier(1, checkpoint_id=1) == [Block(1)]
    assert handler.is_blocked(1)
    assert not handler.is_blocked(0)
    assert handler.state == CollectingBarriers(1, frozenset({1}), 1.0)
    clock.advance(2.5)
    assert handler.on_barrier(0, checkpoint_id=1) == [Snapshot(1, 2.5), Release()]
    assert not handler.is_blocked(0)
    assert not handler.is_blocked(1)
    assert handler.state == WaitingForFirstBarrier(last=1)


def test_three_channels_block_each_until_the_last_barrier() -> None:
    clock = FakeClock(10.0)
    handler = AlignedBarrierHandler(channels=3, clock=clock)
    assert handler.on_barrier(2, checkpoint_id=4) == [Block(2)]
    clock.advance(0.25)
    assert handler.on_barrier(0, checkpoint_id=4) == [Block(0)]
    assert [handler.is_blocked(c) for c in range(3)] == [True, False, True]
    clock.advance(0.5)
    assert handler.on_barrier(1, checkpoint_id=4) == [Snapshot(4, 0.75), Release()]
    assert [handler.is_blocked(c) for c in range(3)] == [False, False, False]
    assert handler.last == 4


def test_repeated_barrier_on_a_blocked_channel_is_ignored() -> None:
    handler = AlignedBarrierHandler(channels=2, clock=FakeClock())
    assert handler.on_barrier(0, checkpoint_id=1) == [Block(0)]
    assert handler.on_barrier(0, checkpoint_id=1) == []
    assert handler.state == CollectingBarriers(1, frozenset({0}), 0.0)
    assert handler.on_barrier(1, checkpoint_id=1) == [Snapshot(1, 0.0), Release()]


def test_stale_barriers_are_ignored() -> None:
    handler = AlignedBarrierHandler(channels=2, clock=FakeClock())
    handler.on_barrier(0, checkpoint_id=3)
    handler.on_barrier(1, checkpoint_id=3)
    # after completion: the same and older checkpoints are stale
    assert handler.on_barrier(0, checkpoint_id=3) == []
    assert handler.on_barrier(1, checkpoint_id=2) == []
    assert handler.state == WaitingForFirstBarrier(last=3)
    # during an alignment: an older checkpoint's barrier is stale too
    assert handler.on_barrier(0, checkpoint_id=5) == [Block(0)]
    assert handler.on_barrier(1, checkpoint_id=4) == []
    assert handler.state == CollectingBarriers(5, frozenset({0}), 0.0)
    assert not handler.is_blocked(1)


def test_newer_barrier_subsumes_the_alignment_in_progress() -> None:
    clock = FakeClock()
    handler = AlignedBarrierHandler(channels=3, clock=clock)
    handler.on_barrier(0, checkpoint_id=1)
    handler.on_barrier(1, checkpoint_id=1)
    clock.advance(4.0)
    # channel 2 never got barrier 1 (checkpoint 1 was aborted upstream): barrier 2 subsumes it
    assert handler.on_barrier(2, checkpoint_id=2) == [AbortAlignment(1), Release(), Block(2)]
    assert [handler.is_blocked(c) for c in range(3)] == [False, False, True]
    assert handler.state == CollectingBarriers(2, frozenset({2}), 4.0)
    assert handler.last == 1
    assert handler.on_barrier(0, checkpoint_id=1) == []  # abandoned: stale
    clock.advance(1.0)
    assert handler.on_barrier(0, checkpoint_id=2) == [Block(0)]
    assert handler.on_barrier(1, checkpoint_id=2) == [Snapshot(2, 1.0), Release()]


def test_checkpoint_aborted_releases_the_alignment() -> None:
    handler = AlignedBarrierHandler(channels=2, clock=FakeClock())
    handler.on_barrier(0, checkpoint_id=1)
    assert handler.on_checkpoint_aborted(1) == [AbortAlignment(1), Release()]
    assert not handler.is_blocked(0)
    assert handler.state == WaitingForFirstBarrier(last=1)
    assert handler.on_barrier(1, checkpoint_id=1) == []  # the late barrier of the aborted checkpoint
    assert handler.on_checkpoint_aborted(1) == []  # repeated abort
    assert handler.on_barrier(1, checkpoint_id=2) == [Block(1)]


def test_abort_of_a_checkpoint_not_seen_yet_ignores_its_barriers() -> None:
    handler = AlignedBarrierHandler(channels=2, clock=FakeClock())
    assert handler.on_checkpoint_aborted(1) == []
    assert handler.on_barrier(0, checkpoint_id=1) == []
    assert not handler.is_blocked(0)


def test_abort_of_an_older_checkpoint_keeps_the_current_alignment() -> None:
    handler = AlignedBarrierHandler(channels=2, clock=FakeClock())
    handler.on_barrier(0, checkpoint_id=3)
    assert handler.on_checkpoint_aborted(2) == []
    assert handler.is_blocked(0)
    assert handler.on_barrier(1, checkpoint_id=3) == [Snapshot(3, 0.0), Release()]


def test_abort_of_a_newer_checkpoint_keeps_aligning_the_older_one() -> None:
    handler = AlignedBarrierHandler(channels=2, clock=FakeClock())
    assert handler.on_barrier(0, checkpoint_id=1) == [Block(0)]
    # checkpoint 2 (triggered while 1 is pending) was declined by another task; 1 is still pending
    assert handler.on_checkpoint_aborted(2) == []
    assert handler.is_blocked(0)
    assert handler.on_barrier(1, checkpoint_id=1) == [Snapshot(1, 0.0), Release()]


def test_abort_of_a_newer_checkpoint_does_not_drop_older_barriers() -> None:
    handler = AlignedBarrierHandler(channels=2, clock=FakeClock())
    handler.on_checkpoint_aborted(2)  # checkpoint 2 declined; checkpoint 1's barriers are still on their way
    assert handler.on_barrier(0, checkpoint_id=1) == [Block(0)]
    assert handler.on_barrier(1, checkpoint_id=1) == [Snapshot(1, 0.0), Release()]


def test_barrier_on_an_unknown_channel_is_an_error() -> None:
    handler = AlignedBarrierHandler(channels=2, clock=FakeClock())
    with pytest.raises(ValueError, match="barrier on channel 2, but there are 2 channels"):
        handler.on_barrier(2, checkpoint_id=1)
    with pytest.raises(ValueError, match="channel -1"):
        handler.on_barrier(-1, checkpoint_id=1)
    with pytest.raises(ValueError, match="there are 0 channels"):
        AlignedBarrierHandler(channels=0, clock=FakeClock()).on_barrier(0, checkpoint_id=1)


def test_last_reports_the_newest_finished_or_abandoned_checkpoint() -> None:
    handler = AlignedBarrierHandler(channels=2, clock=FakeClock())
    assert handler.last == 0
    handler.on_barrier(0, checkpoint_id=1)
    assert handler.last == 0
    handler.on_barrier(1, checkpoint_id=1)
    assert handler.last == 1


# -- a simulated operator, driving the handler as the input gate (runtime/input_gate.py) does --------------------


@dataclass(frozen=True, slots=True)
class Record:
    channel: int
    seq: int


@dataclass(frozen=True, slots=True)
class Barrier:
    checkpoint_id: int


Item = Record | Barrier


class SimulatedOperator:
    """Holds back messages of blocked channels, re-applies them on release, snapshots the processed records.

    Args:
        channels: input channels.
        pick: chooses which releasable channel to drain next (the runtime goes in channel order).
    """

    def __init__(self, channels: int, pick: Callable[[list[int]], int] = min) -> None:
        self.channels = channels
        self.handler = AlignedBarrierHandler(channels, FakeClock())
        self.pick = pick
        self.held: list[deque[Item]] = [deque() for _ in range(channels)]
        self.processed: list[Record] = []
        self.snapshots: dict[int, list[Record]] = {}
        self.ended: list[int] = []  # snapshotted or abandoned alignments, in order
        self.abandoned: list[int] = []
        self.blocked: set[int] = set()  # as the Block/Release actions tell it
        self.aborted_by_coordinator: set[int] = set()

    def deliver(self, channel: int, item: Item) -> None:
        if self.held[channel] or self.handler.is_blocked(channel):
            self.held[channel].append(item)
        else:
            self._apply(channel, item)
        self._drain()
        self._check()

    def abort(self, checkpoint_id: int) -> None:
        self.aborted_by_coordinator.add(checkpoint_id)
        self._perform(self.handler.on_checkpoint_aborted(checkpoint_id))
        self._drain()
        self._check()

    def _apply(self, channel: int, item: Item) -> None:
        assert not self.handler.is_blocked(channel)
        if isinstance(item, Record):
            self.processed.append(item)
        else:
            self._perform(self.handler.on_barrier(channel, item.checkpoint_id))

    def _perform(self, actions: list[BarrierAction]) -> None:
        for action in actions:
            if isinstance(action, Block):
                assert action.channel not in self.blocked
                self.blocked.add(action.channel)
            elif isinstance(action, Release):
                self.blocked.clear()
            elif isinstance(action, Snapshot):
                assert action.checkpoint_id not in self.snapshots, "snapshotted twice"
                assert action.checkpoint_id not in self.aborted_by_coordinator, "snapshot after its abort"
                self.snapshots[action.checkpoint_id] = list(self.processed)
                self.ended.append(action.checkpoint_id)
            else:
                self.abandoned.append(action.checkpoint_id)
                self.ended.append(action.checkpoint_id)

    def _drain(self) -> None:
        while ready := [c for c in range(self.channels) if self.held[c] and not self.handler.is_blocked(c)]:
            channel = self.pick(ready)
            assert channel in ready
            self._apply(channel, self.held[channel].popleft())

    def _check(self) -> None:
        assert self.blocked == {c for c in range(self.channels) if self.handler.is_blocked(c)}
        for channel in range(self.channels):
            assert not self.held[channel] or channel in self.blocked, "held messages on an unblocked channel"
        assert self.ended == sorted(set(self.ended)), "alignments must end in increasing id order, once each"


@st.composite
def channel_streams(draw: st.DrawFn, *, missing: bool) -> list[list[Item]]:
    """Per channel, a FIFO of records and barriers 1..K in order (with ``missing``, some barriers left out)."""
    channels = draw(st.integers(2, 4))
    k = draw(st.integers(1, 6))
    streams: list[list[Item]] = []
    for channel in range(channels):
        ids = list(range(1, k + 1))
        if missing:  # each barrier left out with probability 1/4
            ids = [i for i in ids if draw(st.integers(0, 3)) != 0]
        items: list[Item] = []
        seq = 0
        for checkpoint_id in [*ids, None]:
            for _ in range(draw(st.integers(0, 3))):
                items.append(Record(channel, seq))
                seq += 1
            if checkpoint_id is not None:
                items.append(Barrier(checkpoint_id))
        streams.append(items)
    return streams


def records_before(streams: list[list[Item]], checkpoint_id: int) -> set[Record]:
    """The records that precede barrier ``checkpoint_id`` on every channel."""
    before: set[Record] = set()
    for items in streams:
        for item in items:
            if item == Barrier(checkpoint_id):
                break
            if isinstance(item, Record):
                before.add(item)
    return before


def barrier_ids(items: list[Item]) -> set[int]:
    return {item.checkpoint_id for item in items if isinstance(item, Barrier)}


def run_interleaved(streams: list[list[Item]], data: st.DataObject,
                    aborts: list[int] | None = None) -> SimulatedOperator:
    """Deliver every channel's items in a random interleaving (and ``aborts`` at random moments)."""
    operator = SimulatedOperator(len(streams), pick=lambda ready: data.draw(st.sampled_from(ready)))
    cursors = [0] * len(streams)
    pending_aborts = list(aborts or [])
    while True:
        live = [c for c, items in enumerate(streams) if cursors[c] < len(items)]
        choices = live + ([-1] if pending_aborts else [])
        if not choices:
            break
        channel = data.draw(st.sampled_from(choices))
        if channel == -1:
            operator.abort(pending_aborts.pop(0))
            continue
        operator.deliver(channel, streams[channel][cursors[channel]])
        cursors[channel] += 1
    return operator


def check_snapshots_and_processing(operator: SimulatedOperator, streams: list[list[Item]]) -> None:
    for checkpoint_id, processed in operator.snapshots.items():
        assert len(processed) == len(set(processed))
        assert set(processed) == records_before(streams, checkpoint_id), f"snapshot {checkpoint_id}"
    # (c) nothing blocked or held; every record processed once, in per-channel order
    assert not any(operator.handler.is_blocked(c) for c in range(len(streams)))
    assert not any(operator.held)
    assert isinstance(operator.handler.state, WaitingForFirstBarrier)
    for channel, items in enumerate(streams):
        assert [r for r in operator.processed if r.channel == channel] == [i for i in items if isinstance(i, Record)]
    assert len(operator.processed) == sum(isinstance(i, Record) for items in streams for i in items)


@settings(max_examples=200, deadline=None)
@given(streams=channel_streams(missing=False), data=st.data())
def test_every_checkpoint_snapshots_exactly_the_records_before_its_barriers(
        streams: list[list[Item]], data: st.DataObject) -> None:
    operator = run_interleaved(streams, data)
    k = len(barrier_ids(streams[0]))
    # (b) every checkpoint snapshotted once, in order; nothing subsumed
    assert operator.ended == list(range(1, k + 1))
    assert operator.abandoned == []
    assert sorted(operator.snapshots) == list(range(1, k + 1))
    # (a) and (c)
    check_snapshots_and_processing(operator, streams)


@settings(max_examples=200, deadline=None)
@given(streams=channel_streams(missing=True), data=st.data())
def test_missing_barriers_are_subsumed_and_the_rest_snapshot_exactly(
        streams: list[list[Item]], data: st.DataObject) -> None:
    operator = run_interleaved(streams, data)
    on_every_channel = set.intersection(*(barrier_ids(items) for items in streams))
    missing_somewhere = set.union(*(barrier_ids(items) for items in streams)) - on_every_channel
    # an alignment still waits only for a checkpoint some channel never delivers:
    # the coordinator's abort of it (it was aborted upstream) releases it
    state = operator.handler.state
    if isinstance(state, CollectingBarriers):
        assert state.checkpoint_id in missing_somewhere
    for checkpoint_id in sorted(missing_somewhere):
        operator.abort(checkpoint_id)
    assert sorted(operator.snapshots) == sorted(on_every_channel)
    assert set(operator.abandoned) <= missing_somewhere
    check_snapshots_and_processing(operator, streams)


@settings(max_examples=200, deadline=None)
@given(streams=channel_streams(missing=True), data=st.data())
def test_coordinator_aborts_at_any_moment_keep_snapshots_exact(
        streams: list[list[Item]], data: st.DataObject) -> None:
    k = max(set.union(*(barrier_ids(items) for items in streams)), default=1)
    aborts = data.draw(st.lists(st.integers(1, k), max_size=3))
    operator = run_interleaved(streams, data, aborts)
    on_every_channel = set.intersection(*(barrier_ids(items) for items in streams))
    missing_somewhere = set.union(*(barrier_ids(items) for items in streams)) - on_every_channel
    for checkpoint_id in sorted(missing_somewhere):
        operator.abort(checkpoint_id)
    assert set(operator.snapshots) <= on_every_channel
    check_snapshots_and_processing(operator, streams)
