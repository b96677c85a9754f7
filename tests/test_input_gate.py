"""The input gate (no Ray): channel order, repeats, barrier alignment, input watermarks, end of input."""

from __future__ import annotations

import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from onceflow.runtime.channel import ChannelMessage
from onceflow.runtime.input_gate import BarrierAligned, EndOfInput, InputEvent, InputGate, Rows, WatermarkAdvanced


def _rows(*values: int) -> pa.RecordBatch:
    return pa.record_batch({"x": list(values)})


def _describe(events: list[InputEvent]) -> list[object]:
    out: list[object] = []
    for event in events:
        if isinstance(event, Rows):
            out.append(event.batch.column("x").to_pylist())
        elif isinstance(event, WatermarkAdvanced):
            out.append(("wm", event.watermark))
        elif isinstance(event, BarrierAligned):
            out.append(("barrier", event.checkpoint_id))
        else:
            out.append("eof")
    return out


def test_messages_come_out_in_sequence_order_and_repeats_are_dropped() -> None:
    gate = InputGate(1)
    gate.receive(ChannelMessage(0, 1, _rows(2)))
    assert list(gate.drain()) == [] and gate.applied(0) == -1
    gate.receive(ChannelMessage(0, 0, _rows(1)))
    gate.receive(ChannelMessage(0, 0, _rows(1)))  # delivered twice
    assert _describe(list(gate.drain())) == [[1], [2]]
    assert gate.applied(0) == 1 and gate.duplicates == 1


def test_rows_before_a_watermark_come_out_before_it_and_the_minimum_over_channels_advances() -> None:
    gate = InputGate(2)
    gate.receive(ChannelMessage(0, 0, _rows(1, 2, 3), watermarks=((2, 10), (3, 20))))
    assert _describe(list(gate.drain())) == [[1, 2], [3]]  # channel 1 has no watermark yet
    gate.receive(ChannelMessage(1, 0, watermarks=((0, 15),)))
    assert _describe(list(gate.drain())) == [("wm", 15)]
    assert gate.watermark == 15


def test_a_channel_whose_barrier_arrived_is_held_back_until_every_channel_delivered_it() -> None:
    clock = iter([1.0, 3.5])
    gate = InputGate(2, clock=lambda: next(clock))
    gate.receive(ChannelMessage(0, 0, _rows(1), barrier=(7, 0.0)))
    gate.receive(ChannelMessage(0, 1, _rows(2)))
    gate.receive(ChannelMessage(1, 0, _rows(10)))
    assert _describe(list(gate.drain())) == [[1], [10]]  # [2] waits behind channel 0's barrier
    assert gate.applied(0) == 0  # so its sender keeps the credit
    gate.receive(ChannelMessage(1, 1, barrier=(7, 0.0)))
    events = list(gate.drain())
    assert _describe(events) == [("barrier", 7), [2]]
    assert events[0] == BarrierAligned(7, 0.0, 2.5)
    assert gate.applied(0) == 1


def test_an_aborted_checkpoint_releases_the_held_channels() -> None:
    gate = InputGate(2)
    gate.receive(ChannelMessage(0, 0, barrier=(3, 0.0)))
    gate.receive(ChannelMessage(0, 1, _rows(5)))
    assert list(gate.drain()) == []
    assert gate.abort_checkpoint(3)
    assert _describe(list(gate.drain())) == [[5]]
    assert not gate.abort_checkpoint(3)


def test_the_input_ends_when_every_channel_ended_and_an_ended_channel_no_longer_holds_event_time_back() -> None:
    gate = InputGate(2)
    gate.receive(ChannelMessage(0, 0, watermarks=((0, 5),), eof=True))
    gate.receive(ChannelMessage(1, 0, watermarks=((0, 8),)))
    assert _describe(list(gate.drain())) == [("wm", 8)]  # channel 0 ended: only channel 1's watermark counts
    gate.receive(ChannelMessage(1, 1, eof=True))
    assert _describe(list(gate.drain())) == ["eof"]


def test_the_watermark_snapshot_taken_at_a_barrier_holds_exactly_the_events_before_it() -> None:
    gate = InputGate(1)
    gate.receive(ChannelMessage(0, 0, _rows(1), watermarks=((1, 4),), barrier=(1, 0.0), eof=True))
    seen = []
    for event in gate.drain():
        if isinstance(event, BarrierAligned):
            seen = gate.watermarks.snapshot().to_pylist()
    assert seen == [{"channel": 0, "name": "0", "watermark": 4, "ended": False}]  # the end came after the barrier


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_delivery_order_with_repeats_gives_the_same_events(data: st.DataObject) -> None:
    messages = [ChannelMessage(c, s, _rows(c * 100 + s), watermarks=((1, s),), eof=s == 2)
                for c in range(2) for s in range(3)]
    expected = {c: [[c * 100 + s] for s in range(3)] for c in range(2)}
    deliveries = data.draw(st.permutations(messages + data.draw(st.lists(st.sampled_from(messages), max_size=4))))
    gate = InputGate(2)
    per_channel: dict[int, list[list[int]]] = {0: [], 1: []}
    ends = 0
    for message in deliveries:
        gate.receive(message)
        for event in gate.drain():
            if isinstance(event, Rows):
                value = event.batch.column("x")[0].as_py()
                per_channel[value // 100].append([value])
            elif isinstance(event, EndOfInput):
                ends += 1
    assert per_channel == expected
    assert ends == 1
    assert gate.applied(0) == gate.applied(1) == 2

