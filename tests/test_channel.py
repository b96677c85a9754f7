"""The sans-IO channel pieces: sequencing, duplicates, credits, watermarks."""

from __future__ import annotations

import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st

import onceflow as of
from onceflow.errors import DataError
from onceflow.runtime.channel import (
    END_OF_TIME,
    NO_WATERMARK,
    ChannelMessage,
    ChannelReceiver,
    ChannelSender,
    InputWatermarks,
    input_channel_names,
)
from onceflow.runtime.plan import plan


@given(st.permutations(list(range(12))), st.lists(st.integers(0, 11), max_size=12))
def test_receiver_applies_every_sequence_once_in_order(order: list[int], repeats: list[int]) -> None:
    receiver = ChannelReceiver()
    applied: list[int] = []
    for seq in [*order, *repeats]:
        applied += [m.seq for m in receiver.accept(ChannelMessage(0, seq))]
    assert applied == list(range(12))
    assert receiver.duplicates == len(repeats)
    assert receiver.waiting == 0


def test_receiver_holds_a_gap_until_it_fills() -> None:
    receiver = ChannelReceiver()
    assert receiver.accept(ChannelMessage(0, 2)) == []
    assert receiver.accept(ChannelMessage(0, 1)) == []
    assert receiver.waiting == 2
    assert [m.seq for m in receiver.accept(ChannelMessage(0, 0))] == [0, 1, 2]


def test_sender_bounds_unacknowledged_messages() -> None:
    sender = ChannelSender(credits=2)
    assert [sender.on_send(), sender.on_send()] == [0, 1]
    assert not sender.has_credit()
    sender.on_ack()
    assert sender.has_credit()
    assert sender.on_send() == 2
    with pytest.raises(ValueError, match="at least one credit"):
        ChannelSender(0)


def test_sender_rejects_an_acknowledgement_it_did_not_expect() -> None:
    with pytest.raises(RuntimeError):
        ChannelSender(1).on_ack()


def test_watermark_is_the_minimum_over_inputs_and_ended_inputs_do_not_hold_it_back() -> None:
    marks = InputWatermarks(2)
    assert marks.current == NO_WATERMARK
    assert marks.update(0, 100) is None
    assert marks.update(1, 50) == 50
    assert marks.update(1, 40) is None  # never goes back
    assert marks.update(1, 150) == 100
    assert marks.update(0, END_OF_TIME) == 150
    assert marks.update(1, END_OF_TIME) == END_OF_TIME


# -- input watermarks through a snapshot -----------------------------------------------------------

_updates = st.lists(st.tuples(st.integers(0, 2), st.one_of(st.integers(-5, 60), st.just(END_OF_TIME))), max_size=30)


@given(_updates, _updates, st.data())
def test_restored_watermarks_continue_exactly_as_the_original_whatever_the_inputs_send_again(
    before: list[tuple[int, int]], after: list[tuple[int, int]], data: st.DataObject
) -> None:
    original = InputWatermarks(3)
    for channel, watermark in before:
        original.update(channel, watermark)
    snapshot = original.snapshot()
    restored = InputWatermarks(3)
    restored.restore(snapshot)
    assert restored.current == original.current
    # After a restore every input may send its restored watermark again, in any order.
    resent = [(row["channel"], row["watermark"]) for row in snapshot.to_pylist() if row["watermark"] is not None]
    for channel, watermark in data.draw(st.permutations(resent)):
        assert restored.update(channel, watermark) is None
    for channel, watermark in after:
        assert restored.update(channel, watermark) == original.update(channel, watermark)
        assert restored.current == original.current


def test_a_floor_under_unknown_channels_is_not_enough_but_the_restored_channels_are() -> None:
    """Inputs at 99 and 9: when the second moves to 149, the failure-free minimum is 99, in either order."""
    original = InputWatermarks(2)
    original.update(0, 99)
    original.update(1, 9)
    for resent_first in (True, False):
        restored = InputWatermarks(2)
        restored.restore(original.snapshot())
        if resent_first:
            assert restored.update(0, 99) is None
        assert restored.update(1, 149) == 99  # a row after this is late up to 99, as in the failure-free run
        assert restored.update(0, 99) is None
    floor = InputWatermarks(2)  # only the combined watermark kept: the first input's 99 is unknown
    floor.current = 9
    assert floor.update(1, 149) is None and floor.current == 9


def test_snapshot_is_one_row_per_channel_with_its_sender() -> None:
    marks = InputWatermarks(3, ["a:0/0", "a:0/1", "b:0/0"], operator="window/0")
    marks.update(0, 40)
    marks.update(1, 20)
    marks.update(1, END_OF_TIME)
    table = marks.snapshot()
    assert table.schema.metadata[b"onceflow.state"] == b"input_watermarks"
    assert table.to_pylist() == [
        {"channel": 0, "name": "a:0/0", "watermark": 40, "ended": False},
        {"channel": 1, "name": "a:0/1", "watermark": 20, "ended": True},
        {"channel": 2, "name": "b:0/0", "watermark": None, "ended": False},
    ]


def test_an_ended_channel_stays_ended_until_its_input_goes_on() -> None:
    original = InputWatermarks(2)
    original.update(0, 30)
    original.update(0, END_OF_TIME)
    original.update(1, 10)
    restored = InputWatermarks(2)
    restored.restore(original.snapshot())
    assert restored.current == 10
    assert restored.update(0, 30) is None  # the input sends its restored watermark again: still ended
    assert restored.update(1, 50) == 50  # as in the failure-free run: the ended input does not hold time back
    assert restored.update(0, END_OF_TIME) is None
    # A resumed job whose ended input reads more: the channel opens again at its last watermark.
    restored.on_rows(0)
    assert restored.current == 30
    assert restored.update(0, 45) == 45
    assert restored.update(0, 70) == 50
    newer = InputWatermarks(2)
    newer.restore(original.snapshot())
    assert newer.update(0, 35) is None and newer.current == 10  # a newer watermark opens it too
    assert newer.update(1, 40) == 35


def test_several_tables_that_name_the_same_channels_restore_each_channel() -> None:
    names = ["up:0/0", "up:0/1"]
    first, second = InputWatermarks(2, names), InputWatermarks(2, names)
    for marks in (first, second):
        marks.update(0, 70)
        marks.update(1, 20)
    restored = InputWatermarks(2, names)
    restored.restore([first.snapshot(), second.snapshot()])
    assert restored.current == 20
    assert restored.update(1, 90) == 70


def test_tables_of_other_channels_restore_every_channel_to_the_lowest_combined_watermark() -> None:
    old = []
    for low in (40, 25):
        marks = InputWatermarks(2, ["up:0/0", "up:0/1"])
        marks.update(0, low)
        marks.update(1, 80)
        old.append(marks.snapshot())
    restored = InputWatermarks(3, ["up:0/0", "up:0/1", "up:0/2"])  # the input was rescaled from 2 to 3
    restored.restore(old)
    assert restored.current == 25
    assert restored.update(0, 60) is None  # every channel starts at 25: none is ahead of the old subtasks
    assert restored.update(1, 60) is None
    assert restored.update(2, 60) == 60
    mine = InputWatermarks(2, ["other:0/0", "other:0/1"])  # same count, other senders
    mine.restore(old[0])
    assert mine.current == 40
    assert mine.update(0, 90) is None


def test_tables_where_every_channel_ended_restore_ended_channels() -> None:
    marks = InputWatermarks(2, ["up:0/0", "up:0/1"])
    marks.update(0, 50)
    for channel in (0, 1):
        marks.update(channel, END_OF_TIME)
    restored = InputWatermarks(1, ["up:0/0"])
    restored.restore([marks.snapshot()])
    assert restored.current == END_OF_TIME
    restored.on_rows(0)  # a resumed input goes on: from the lowest watermark the old channels had
    assert restored.current == NO_WATERMARK


def test_restoring_nothing_or_the_wrong_table_is_told() -> None:
    marks = InputWatermarks(2, operator="window/0")
    marks.restore([])
    assert marks.current == NO_WATERMARK
    with pytest.raises(DataError, match=r"subtask 'window/0': the '@input_watermarks' entry .* is not input water"):
        marks.restore(pa.table({"offset": [b"x"]}))
    with pytest.raises(ValueError, match="1 channel names for 2 channels"):
        InputWatermarks(2, ["a"])


def test_channels_are_named_by_their_senders() -> None:
    flow = of.Dataflow("names")
    fast = flow.source(of.sources.TestingSource([]), name="fast", watermark=of.BoundedOutOfOrderness("t"))
    slow = flow.source(of.sources.TestingSource([]), name="slow", watermark=of.BoundedOutOfOrderness("t"))
    both = fast.union(slow, name="both", parallelism=2)
    both.key_by("k").window(of.windows.Tumbling(size_ms=10)).aggregate(n=of.agg.count(), name="win").sink(
        of.sinks.TestingSink(), name="out"
    )
    physical = plan(flow, parallelism=2)
    ids = {v.name: v.id for v in physical.vertices}
    assert input_channel_names(physical, ids["both"], 1) == ["fast:0/0", "slow:0/0"]
    assert input_channel_names(physical, ids["win"], 0) == ["both:0/0", "both:0/1"]
    assert input_channel_names(physical, ids["fast"], 0) == []
