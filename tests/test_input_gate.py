"""The input gate (no Ray): channel order, repeats, barrier alignment, input watermarks, end of input."""

from __future__ import annotations

import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from onceflow.runtime.channel import ChannelMessage
from onceflow.runtime.input_gate import (
    BarrierAligned,
    ChannelStateRecorded,
    EndOfInput,
    InputEvent,
    InputGate,
    PieceSize,
    Rows,
    UnalignedSnapshot,
    WatermarkAdvanced,
)


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



# -- unaligned checkpoints ------------------------------------------------------------------


def test_an_unaligned_barrier_overtakes_the_queued_messages_which_are_recorded_and_then_processed() -> None:
    clock = iter([1.0, 1.5, 2.0])
    gate = InputGate(2, clock=lambda: next(clock))
    gate.receive(ChannelMessage(0, 0, _rows(1)))
    gate.receive(ChannelMessage(0, 1, _rows(2), watermarks=((1, 7),)))
    gate.receive(ChannelMessage(1, 0, _rows(10)))
    gate.receive_barrier(0, 5, 0.0, last_seq=1)  # channel 0 sent 0 and 1 before its barrier
    events = list(gate.drain())
    assert events[0] == UnalignedSnapshot(5, 0.0, 0.5)  # before any queued message
    assert _describe(events[1:]) == [[1], [2], [10]]  # then they are processed as usual
    gate.receive_barrier(1, 5, 0.0, last_seq=1)  # channel 1's barrier follows message 1, not yet here
    assert list(gate.drain()) == []
    gate.receive(ChannelMessage(1, 1, _rows(11)))
    gate.receive(ChannelMessage(1, 2, _rows(12)))  # after channel 1's barrier: not recorded
    events = list(gate.drain())
    recorded = events[0]  # complete once the last message before every barrier is here, processed or not
    assert isinstance(recorded, ChannelStateRecorded) and recorded.checkpoint_id == 5
    assert [(m.channel, m.batch.column("x").to_pylist(), m.watermarks) for m in recorded.messages] == [
        (0, [1], ()), (0, [2], ((1, 7),)), (1, [10], ()), (1, [11], ())]
    assert _describe(events[1:]) == [[11], [12]]


def test_a_channel_that_sent_nothing_before_its_barrier_records_nothing() -> None:
    gate = InputGate(1)
    gate.receive_barrier(0, 1, 0.0, last_seq=-1)
    events = list(gate.drain())
    assert isinstance(events[0], UnalignedSnapshot)
    assert events[1] == ChannelStateRecorded(1, ())


def test_a_newer_unaligned_checkpoint_subsumes_one_still_recording_and_stale_barriers_are_ignored() -> None:
    gate = InputGate(2)
    gate.receive_barrier(0, 1, 0.0, last_seq=-1)
    assert isinstance(next(gate.drain()), UnalignedSnapshot)
    gate.receive_barrier(0, 2, 0.0, last_seq=-1)
    gate.receive_barrier(1, 1, 0.0, last_seq=-1)  # checkpoint 1 was subsumed
    gate.receive_barrier(1, 2, 0.0, last_seq=-1)
    events = list(gate.drain())
    assert [type(e).__name__ for e in events] == ["UnalignedSnapshot", "ChannelStateRecorded"]
    assert events[1].checkpoint_id == 2


def test_an_aborted_unaligned_checkpoint_records_no_more() -> None:
    gate = InputGate(2)
    gate.receive_barrier(0, 3, 0.0, last_seq=-1)
    list(gate.drain())
    gate.abort_checkpoint(3)
    gate.receive(ChannelMessage(1, 0, _rows(1)))
    gate.receive_barrier(1, 3, 0.0, last_seq=0)
    assert _describe(list(gate.drain())) == [[1]]


def test_an_alignment_past_the_timeout_switches_the_checkpoint_to_unaligned() -> None:
    now = [0.0]
    gate = InputGate(2, clock=lambda: now[0], aligned_timeout_s=1.0)
    gate.receive(ChannelMessage(0, 0, _rows(1), barrier=(4, 9.0)))
    gate.receive(ChannelMessage(0, 1, _rows(2)))  # after channel 0's barrier: held back while aligned
    gate.receive(ChannelMessage(1, 0, _rows(10)))
    assert _describe(list(gate.drain())) == [[1], [10]]
    now[0] = 1.5
    gate.receive(ChannelMessage(1, 1, _rows(11)))
    events = list(gate.drain())
    assert events[0] == UnalignedSnapshot(4, 9.0, 1.5, timed_out=True)
    assert _describe(events[1:]) == [[2], [11]]  # released; channel 1's [11] is in flight before its barrier
    gate.receive(ChannelMessage(1, 2, _rows(12), barrier=(4, 9.0)))
    gate.receive(ChannelMessage(1, 3, _rows(13)))
    events = list(gate.drain())
    recorded = next(e for e in events if isinstance(e, ChannelStateRecorded))
    assert [m.batch.column("x").to_pylist() for m in recorded.messages] == [[11], [12]]
    assert _describe([e for e in events if not isinstance(e, ChannelStateRecorded)]) == [[12], [13]]


def test_replayed_messages_come_out_before_any_new_input_and_move_the_watermarks() -> None:
    gate = InputGate(2)
    gate.receive(ChannelMessage(0, 0, _rows(100), watermarks=((1, 50),)))
    gate.replay([ChannelMessage(1, 7, _rows(1), watermarks=((1, 20),)), ChannelMessage(0, 3, _rows(2))])
    assert _describe(list(gate.drain())) == [[1], [2], [100], ("wm", 20)]
    assert gate.applied(0) == 0 and gate.applied(1) == -1  # replay does not count as channel messages


def _assert_cut_at_barriers(cut: list[int], before: list[tuple[int, int]], recorded: list[tuple[int, int]]) -> None:
    """Channel ``c``'s messages up to ``cut[c]`` were processed before the snapshot or recorded (in order), not both."""
    for c, last in enumerate(cut):
        pre_barrier = {(c, s) for s in range(last + 1)}
        mine_before = {m for m in before if m[0] == c}
        mine_recorded = [m for m in recorded if m[0] == c]
        assert mine_before | set(mine_recorded) == pre_barrier
        assert not mine_before & set(mine_recorded)
        assert mine_recorded == sorted(mine_recorded)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_an_unaligned_snapshot_cuts_every_channel_at_its_barrier_whatever_the_timing(data: st.DataObject) -> None:
    """Messages before a barrier are processed before the snapshot or recorded, never both; later ones never."""
    channels = data.draw(st.integers(1, 3))
    sent = [data.draw(st.integers(0, 5)) for _ in range(channels)]
    cut = [data.draw(st.integers(-1, n - 1)) for n in sent]  # the last message before each barrier
    # Each caller's calls arrive in the order it made them (as Ray's and the simulation's do): a channel's
    # messages up to the cut, its barrier, then its later messages; channels interleave in any way.
    per_channel = [[("message", c, s) for s in range(cut[c] + 1)] + [("barrier", c, cut[c])]
                   + [("message", c, s) for s in range(cut[c] + 1, sent[c])] for c in range(channels)]
    turns = data.draw(st.permutations([c for c in range(channels) for _ in per_channel[c]]))
    order = [per_channel[c].pop(0) for c in turns]
    gate = InputGate(channels)
    before: list[tuple[int, int]] = []
    recorded: list[tuple[int, int]] = []
    snapshot = False
    for kind, channel, value in order:
        if kind == "message":
            gate.receive(ChannelMessage(channel, value, _rows(channel * 100 + value)))
        else:
            gate.receive_barrier(channel, 1, 0.0, last_seq=value)
        for event in gate.drain():
            if isinstance(event, UnalignedSnapshot):
                snapshot = True
            elif isinstance(event, ChannelStateRecorded):
                recorded = [(m.channel, m.batch.column("x")[0].as_py() % 100) for m in event.messages]
            elif isinstance(event, Rows) and not snapshot:
                value_ = event.batch.column("x")[0].as_py()
                before.append((value_ // 100, value_ % 100))
    assert snapshot
    _assert_cut_at_barriers(cut, before, recorded)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_an_aligned_checkpoint_that_times_out_cuts_every_channel_at_its_barrier(data: st.DataObject) -> None:
    """Aligned or switched to unaligned at any moment, the snapshot sees each channel's prefix and records the rest."""
    channels = data.draw(st.integers(2, 3))
    sent = [data.draw(st.integers(1, 5)) for _ in range(channels)]
    cut = [data.draw(st.integers(0, n - 1)) for n in sent]  # the message that carries the barrier
    per_channel = [[(c, s) for s in range(sent[c])] for c in range(channels)]
    turns = data.draw(st.permutations([c for c in range(channels) for _ in per_channel[c]]))
    order = [per_channel[c].pop(0) for c in turns]
    timeout_at = data.draw(st.integers(0, len(order)))  # the delivery after which the clock passes the timeout
    now = [0.0]
    gate = InputGate(channels, clock=lambda: now[0], aligned_timeout_s=1.0)
    before: list[tuple[int, int]] = []
    recorded: list[tuple[int, int]] = []
    snapshot = aligned = False
    for step, (channel, seq) in enumerate(order):
        if step == timeout_at:
            now[0] = 5.0
        barrier = (1, 0.0) if seq == cut[channel] else None
        gate.receive(ChannelMessage(channel, seq, _rows(channel * 100 + seq), barrier=barrier))
        for event in gate.drain():
            if isinstance(event, UnalignedSnapshot | BarrierAligned):
                snapshot, aligned = True, isinstance(event, BarrierAligned)
            elif isinstance(event, ChannelStateRecorded):
                recorded = [(m.channel, m.batch.column("x")[0].as_py() % 100) for m in event.messages]
            elif isinstance(event, Rows) and not snapshot:
                value = event.batch.column("x")[0].as_py()
                before.append((value // 100, value % 100))
    now[0] = 10.0
    for event in gate.drain():
        if isinstance(event, ChannelStateRecorded):
            recorded = [(m.channel, m.batch.column("x")[0].as_py() % 100) for m in event.messages]
    assert snapshot
    if aligned:
        assert recorded == []
    _assert_cut_at_barriers(cut, before, recorded)


def test_pieces_of_a_large_message_give_the_same_events_as_the_whole_message() -> None:
    message = ChannelMessage(0, 0, pa.record_batch({"x": list(range(10))}), watermarks=((0, 1), (3, 5), (10, 9)),
                             barrier=(1, 0.0))
    whole, pieces = InputGate(1), InputGate(1, chunk_bytes=16)
    whole.receive(message)
    pieces.receive(message)

    def flat(events: list[InputEvent]) -> list[object]:
        return [x for e in _describe(events) for x in (e if isinstance(e, list) else [e])]

    assert flat(list(pieces.drain())) == flat(list(whole.drain()))


def test_an_unaligned_snapshot_lands_between_pieces_and_records_the_rest_of_the_message() -> None:
    gate = InputGate(1, chunk_bytes=16)
    gate.receive(ChannelMessage(0, 0, pa.record_batch({"x": list(range(8))})))
    first = gate.poll()
    assert isinstance(first, Rows) and first.batch.num_rows < 8
    gate.receive_barrier(0, 1, 0.0, last_seq=0)
    events = list(gate.drain())
    assert isinstance(events[0], UnalignedSnapshot)
    recorded = next(e for e in events if isinstance(e, ChannelStateRecorded))
    rest = [x for m in recorded.messages for x in m.batch.column("x").to_pylist()]
    assert first.batch.column("x").to_pylist() + rest == list(range(8))
    processed = [x for e in events if isinstance(e, Rows) for x in e.batch.column("x").to_pylist()]
    assert processed == rest


def test_an_unaligned_barrier_after_in_band_ones_of_the_same_checkpoint_stops_the_alignment() -> None:
    """An upstream subtask whose alignment timed out sends unaligned barriers; the others still send in-band."""
    gate = InputGate(3)
    gate.receive(ChannelMessage(0, 0, _rows(1), barrier=(2, 0.0)))
    gate.receive(ChannelMessage(0, 1, _rows(2)))  # after channel 0's barrier: held back while aligning
    assert _describe(list(gate.drain())) == [[1]]
    gate.receive(ChannelMessage(1, 0, _rows(10)))
    gate.receive_barrier(1, 2, 0.0, last_seq=0)
    events = list(gate.drain())
    assert isinstance(events[0], UnalignedSnapshot)
    assert _describe(events[1:]) == [[2], [10]]  # channel 0 is released: it passed barrier 2 in-band
    gate.receive(ChannelMessage(2, 0, _rows(20), barrier=(2, 0.0)))  # in-band, after the snapshot: recorded
    gate.receive(ChannelMessage(2, 1, _rows(21)))
    events = list(gate.drain())
    recorded = next(e for e in events if isinstance(e, ChannelStateRecorded))
    assert [(m.channel, m.batch.column("x").to_pylist()) for m in recorded.messages] == [(1, [10]), (2, [20])]
    assert _describe([e for e in events if isinstance(e, Rows)]) == [[20], [21]]  # nothing held back any more


def test_piece_size_follows_the_rate_so_a_piece_takes_about_the_target_time() -> None:
    size = PieceSize(target_s=0.01, initial=64 << 10, low=1 << 10, high=1 << 20)
    for _ in range(20):  # a slow operator: 100 KB/s, so 1 KB per 10 ms
        size.observe(10_000, 0.1)
    assert size.bytes == 1 << 10  # the floor: 1 KB a piece would be below it
    for _ in range(40):  # it speeds up to 10 MB/s: pieces of about 100 KB
        size.observe(100_000, 0.01)
    assert 90_000 <= size.bytes <= 110_000
    size.observe(1 << 30, 0.001)
    assert size.bytes == 1 << 20  # never above high


def test_a_gate_cuts_what_arrives_after_its_piece_size_changed() -> None:
    gate = InputGate(1, chunk_bytes=1 << 20)
    batch = pa.record_batch({"x": list(range(1_000))})
    gate.receive(ChannelMessage(0, 0, batch))
    assert [e.batch.num_rows for e in gate.drain() if isinstance(e, Rows)] == [1_000]
    gate.chunk_bytes = batch.nbytes // 10
    gate.receive(ChannelMessage(0, 1, batch))
    assert [e.batch.num_rows for e in gate.drain() if isinstance(e, Rows)] == [100] * 10
