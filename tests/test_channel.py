"""The sans-IO channel pieces: sequencing, duplicates, credits, watermarks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtime.channel import END_OF_TIME, NO_WATERMARK, ChannelMessage, ChannelReceiver, ChannelSender, InputWatermarks


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
