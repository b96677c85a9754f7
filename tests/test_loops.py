"""Loops (``iterate`` / ``close_with``): planning, exact output, Chandy-Lamport checkpoints, termination."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import onceflow as of
from examples.retry_loop import WINDOW_MS, failed, succeeded
from onceflow.errors import PlanError
from onceflow.runtime.channel import ChannelMessage
from onceflow.runtime.input_gate import BarrierAligned, ChannelStateRecorded, InputGate, Rows, WatermarkAdvanced
from onceflow.runtime.loops import LoopStatus, LoopTermination
from onceflow.runtime.plan import plan
from onceflow.testing.workload import attempt, retry_events, retry_reference
from tests.helpers import fails_once_after


def _sorted(table: pa.Table) -> pa.Table:
    return table.sort_by([("window_start", "ascending"), ("user_id", "ascending")])


def _retry_flow(name: str, events: int, sink: of.sinks.TestingSink, *, fail_after: int | None = None,
                max_events_per_s: float | None = None) -> of.Dataflow:
    """The retry loop into a testing sink; with ``fail_after``, the feedback path raises once after that many rows."""
    flaky = fails_once_after(fail_after, then=failed)
    flow = of.Dataflow(name)
    source = of.sources.GeneratorSource(retry_events, total=events, batch_size=500, max_events_per_s=max_events_per_s)
    loop = flow.source(source, watermark=of.BoundedOutOfOrderness("event_time"), name="events").iterate(name="retry")
    tried = loop.key_by("id").process(attempt, name="attempt")
    loop.close_with(tried.map_batches(flaky, name="failed"))
    (tried.map_batches(succeeded, name="succeeded").key_by("user_id").window(of.windows.Tumbling(size_ms=WINDOW_MS))
     .aggregate(events=of.agg.count(), attempts=of.agg.sum("attempts"), name="per_user").sink(sink, name="out"))
    return flow


def _exact(sink: of.sinks.TestingSink, events: int) -> None:
    expected = retry_reference(events, window_ms=WINDOW_MS)
    committed = _sorted(sink.table()).select(expected.column_names)
    assert committed.num_rows == expected.num_rows
    assert committed.equals(expected)


# -- planning -------------------------------------------------------------------------------------


def test_the_feedback_edge_is_the_heads_last_input_and_the_cycle_shares_a_loop() -> None:
    physical = plan(_retry_flow("plan-loop", 10, of.sinks.TestingSink()), 2)
    by_name = {v.name: v for v in physical.vertices}
    head, body = by_name["retry"], by_name["attempt"]
    # Forward from the source, forward back from the body (which chains the feedback filter): the last one.
    assert head.feedback_channels == 1 and head.input_channels == 2
    assert head.loop == body.loop == 0
    assert by_name["events"].loop is None and by_name["per_user"].loop is None
    assert physical.loop_input_channels(head.id) == [1]
    assert physical.loop_input_channels(body.id) == [0, 1]  # hash-partitioned from both head subtasks


def _count_down(batch: pa.RecordBatch) -> pa.RecordBatch:
    """One round: ``retries`` one lower; an event whose count went below 0 leaves."""
    retries = pc.subtract(batch.column("retries"), 1)
    batch = batch.set_column(batch.schema.get_field_index("retries"), "retries", retries)
    return batch.filter(pc.greater_equal(retries, 0))


def _arrived(batch: pa.RecordBatch) -> pa.RecordBatch:
    return batch.filter(pc.equal(batch.column("retries"), 0))


def test_a_loop_chained_into_one_vertex_feeds_back_to_itself(tmp_path: Path) -> None:
    flow = of.Dataflow("self-loop")
    loop = flow.source(of.sources.GeneratorSource(retry_events, total=5_000, batch_size=100),
                       name="events").iterate(name="retry")
    tail = loop.map_batches(_count_down, name="count_down")
    loop.close_with(tail)
    sink = of.sinks.TestingSink()
    tail.map_batches(_arrived, name="arrived").sink(sink)
    (head,) = [v for v in plan(flow, 2).vertices if v.name == "retry"]
    assert head.operators == ["retry", "count_down"]
    assert any(out.target == head.id for out in head.outputs)
    assert head.loop == 0
    of.run(flow, parallelism=2, executor="local", checkpoint=of.CheckpointConfig(interval_s=0.02,
                                                                                storage=str(tmp_path)))
    retries = retry_events(0, 5_000).column("retries").to_numpy()
    # Every event that needs a retry reaches 0 once (those with none drop below it at once).
    assert sorted(sink.table().column("id").to_pylist()) == [i for i, r in enumerate(retries) if r >= 1]


def test_a_loop_that_is_never_closed_is_refused() -> None:
    flow = of.Dataflow("open-loop")
    flow.source(of.sources.GeneratorSource(retry_events, total=10)).iterate(name="retry").sink(of.sinks.TestingSink())
    with pytest.raises(PlanError, match="loop 'retry' is never closed"):
        of.run(flow, executor="local")


def test_close_with_takes_a_stream_built_on_the_loop_once() -> None:
    flow = of.Dataflow("bad-close")
    events = flow.source(of.sources.GeneratorSource(retry_events, total=10))
    loop = events.iterate(name="retry")
    with pytest.raises(PlanError, match="must be built on loop 'retry'"):
        loop.close_with(events.map_batches(failed))
    loop.close_with(loop.map_batches(failed))
    with pytest.raises(PlanError, match="closed already"):
        loop.close_with(loop.map_batches(failed))


def test_a_window_inside_a_loop_is_refused_with_the_reason() -> None:
    flow = of.Dataflow("window-in-loop")
    events = flow.source(of.sources.GeneratorSource(retry_events, total=10),
                         watermark=of.BoundedOutOfOrderness("event_time"))
    loop = events.iterate(name="retry")
    windows = loop.key_by("user_id").window(of.windows.Tumbling(size_ms=10)).aggregate(n=of.agg.count(), name="w")
    loop.close_with(windows)
    windows.sink(of.sinks.TestingSink())
    with pytest.raises(PlanError, match="operator 'w' is inside loop 'retry'.*event time"):
        plan(flow, 1)


def test_a_loop_takes_one_checkpoint_at_a_time(tmp_path: Path) -> None:
    flow = _retry_flow("loop-concurrent", 10, of.sinks.TestingSink())
    with pytest.raises(PlanError, match="max_concurrent=1"):
        of.run(flow, executor="local", checkpoint=of.CheckpointConfig(interval_s=1, storage=str(tmp_path),
                                                                      max_concurrent=2))


def test_rows_that_come_round_with_other_columns_name_the_loop() -> None:
    flow = of.Dataflow("bad-feedback")
    loop = flow.source(of.sources.GeneratorSource(retry_events, total=100), name="events").iterate(name="retry")
    loop.close_with(loop.map_batches(lambda b: failed(b).drop_columns(["attempts"]), name="narrow"))
    loop.map_batches(succeeded).sink(of.sinks.TestingSink())
    with pytest.raises(of.JobFailedError, match="loop 'retry'.*close_with"):
        of.run(flow, executor="local")


# -- running (in process) --------------------------------------------------------------------------


@pytest.mark.parametrize("parallelism", [1, 3])
def test_the_retry_loop_commits_the_reference(parallelism: int) -> None:
    sink = of.sinks.TestingSink()
    result = of.run(_retry_flow(f"loop-local-{parallelism}", 20_000, sink), parallelism=parallelism,
                    executor="local")
    _exact(sink, 20_000)
    assert result.metrics["events_in"] == 20_000


def test_a_failure_restores_the_loop_with_what_was_going_round(tmp_path: Path) -> None:
    """A checkpoint taken while events go round holds them as the head's channel state; a restore replays them."""
    sink = of.sinks.TestingSink()
    events = 30_000
    flow = _retry_flow("loop-restore", events, sink, fail_after=20_000, max_events_per_s=60_000)
    result = of.run(flow, parallelism=2, executor="local",
                    checkpoint=of.CheckpointConfig(interval_s=0.05, storage=str(tmp_path)),
                    restart=of.RestartStrategy.fixed_delay(attempts=2, delay_s=0.0))
    assert result.metrics["restarts"] == 1
    _exact(sink, events)
    assert sink.pending_ids() == []
    (restored,) = result.metrics["restored_from"]
    history = {h["checkpoint_id"]: h for h in result.metrics["checkpoint_history"]}
    assert restored in history
    assert any(h["channel_state_bytes"] > 0 for h in history.values()), "no checkpoint caught events going round"


def test_stop_ends_a_loop_once_it_is_empty() -> None:
    sink = of.sinks.TestingSink()
    handle = of.submit(_retry_flow("loop-stop", 10**9, sink, max_events_per_s=20_000), parallelism=2,
                       executor="local")
    result = handle.stop(timeout_s=60)
    read = result.metrics["events_in"]
    assert read > 0
    committed = sink.table()
    assert pc.sum(committed.column("events")).as_py() == read  # every event read left the loop, once
    expected_attempts = pc.sum(pc.add(retry_events(0, read).column("retries"), 1)).as_py()
    assert pc.sum(committed.column("attempts")).as_py() == expected_attempts


# -- termination (sans-IO) ----------------------------------------------------------------------------


def _quiet(task: str, n: int) -> LoopStatus:
    return LoopStatus(task, sent=n, processed=n, idle=True, inputs_ended=True)


def test_the_loop_ends_after_two_equal_quiet_rounds_only() -> None:
    detector = LoopTermination()
    assert not detector.observe([_quiet("a", 3), _quiet("b", 1)])
    assert not detector.observe([_quiet("a", 4), _quiet("b", 1)])  # something moved between the rounds
    assert detector.observe([_quiet("a", 4), _quiet("b", 1)])


@pytest.mark.parametrize("status", [
    LoopStatus("a", sent=2, processed=1, idle=True, inputs_ended=True),  # a message in flight
    LoopStatus("a", sent=1, processed=1, idle=False, inputs_ended=True),  # something held or buffered
    LoopStatus("a", sent=1, processed=1, idle=True, inputs_ended=False),  # the input goes on
])
def test_a_loop_that_is_busy_in_any_way_does_not_end(status: LoopStatus) -> None:
    detector = LoopTermination()
    assert not any(detector.observe([status]) for _ in range(3))


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), processes=st.integers(1, 4), messages=st.integers(0, 6))
def test_the_loop_never_ends_while_a_message_goes_round(seed: int, processes: int, messages: int) -> None:
    """A model loop: processes pass messages on (some in two) until their hops run out; rounds read the
    processes one at a time, interleaved with the messages.

    Whenever the detector says the loop ended, no message is in flight or being handled, and it says so
    within a few rounds once the loop is empty.
    """
    rng = random.Random(seed)
    in_flight: list[tuple[int, int]] = [(rng.randrange(processes), rng.randrange(5)) for _ in range(messages)]
    sent = [0] * processes
    processed = [0] * processes
    sent[0] += len(in_flight)  # process 0 sent the first messages
    detector = LoopTermination()
    round_: list[LoopStatus] = []
    quiet_rounds = 0
    for _ in range(10_000):
        if in_flight and rng.random() < 0.5:
            target, hops = in_flight.pop(rng.randrange(len(in_flight)))
            processed[target] += 1
            for _ in range(rng.choice((1, 1, 2)) if hops else 0):  # a message may fan out in two
                in_flight.append((rng.randrange(processes), hops - 1))
                sent[target] += 1
            continue
        reader = len(round_)
        round_.append(LoopStatus(str(reader), sent[reader], processed[reader], idle=True, inputs_ended=True))
        if len(round_) < processes:
            continue
        ended = detector.observe(round_)
        round_ = []
        if ended:
            assert not in_flight, "the loop was declared empty with messages going round"
            return
        quiet_rounds += not in_flight
        assert quiet_rounds <= 2, "an empty loop was not declared empty within two rounds"
    pytest.fail("the model did not finish")


# -- the loop head's input gate (sans-IO) -------------------------------------------------------------


def _rows(*values: int) -> pa.RecordBatch:
    return pa.record_batch({"left": pa.array(values, pa.int64())})


def test_a_loop_head_records_what_comes_round_until_the_barrier_does() -> None:
    """Chandy-Lamport at the head: snapshot on the input's barrier, then record the feedback channel."""
    gate = InputGate(2, feedback=1)
    gate.receive(ChannelMessage(0, 0, _rows(1), watermarks=((1, 50),), barrier=(1, 0.0)))
    assert isinstance(gate.poll(), Rows)
    gate.receive(ChannelMessage(1, 0, _rows(10)))  # came round before the snapshot, not processed yet
    aligned = gate.poll()
    assert isinstance(aligned, BarrierAligned) and aligned.channel_state
    gate.receive(ChannelMessage(1, 1, _rows(11)))  # after the snapshot, before the barrier came round
    gate.receive(ChannelMessage(1, 2, _rows(12), barrier=(1, 0.0)))  # rows sent before the barrier, then it
    gate.receive(ChannelMessage(1, 3, _rows(13)))  # after the barrier: not channel state
    events = list(gate.drain())
    assert [e.batch.column(0).to_pylist() for e in events if isinstance(e, Rows)] == [[10], [11], [12], [13]]
    (recorded,) = [e for e in events if isinstance(e, ChannelStateRecorded)]
    assert recorded.checkpoint_id == 1
    assert [m.batch.column(0).to_pylist() for m in recorded.messages] == [[10], [11], [12]]
    assert not any(isinstance(e, WatermarkAdvanced) for e in events), "a loop head holds event time back"


def _run_loop(gate: InputGate, steps: int = 200) -> tuple[int, int, bool]:
    """Drive a one-subtask loop: the head's output comes round on its last channel after a hop.

    The input sends rows (each a count of rounds to go), barrier 1, more rows, its end.
    Returns the snapshots taken, the channel states recorded, and whether the later input was processed.
    """
    gate.receive(ChannelMessage(0, 0, _rows(2, 1)))
    gate.receive(ChannelMessage(0, 1, barrier=(1, 0.0)))
    gate.receive(ChannelMessage(0, 2, _rows(99)))
    feedback_seq = 0
    snapshots = recorded = 0
    later_input = False
    in_transit: list[ChannelMessage] = []
    for _ in range(steps):
        for message in in_transit:
            gate.receive(message)
        in_transit = []
        for event in gate.drain():
            outgoing = None
            if isinstance(event, Rows):
                values = event.batch.column(0).to_pylist()
                later_input |= 99 in values
                again = [v - 1 for v in values if 0 < v < 99]
                outgoing = ChannelMessage(1, feedback_seq, _rows(*again)) if again else None
            elif isinstance(event, BarrierAligned):
                snapshots += 1
                outgoing = ChannelMessage(1, feedback_seq, barrier=(event.checkpoint_id, 0.0))
            elif isinstance(event, ChannelStateRecorded):
                recorded += 1
            if outgoing is not None:
                in_transit.append(outgoing)
                feedback_seq += 1
    return snapshots, recorded, later_input


def test_aligned_barriers_deadlock_on_a_cycle_and_chandy_lamport_completes() -> None:
    # Aligning over the feedback channel too: the head waits for a barrier that only its own snapshot
    # would send round, and holds its input back meanwhile. Nothing moves, for ever.
    assert _run_loop(InputGate(2)) == (0, 0, False)
    # The feedback channel declared: snapshot on the input's barrier, record until it comes round.
    assert _run_loop(InputGate(2, feedback=1)) == (1, 1, True)
