"""CheckpointCoordinator, PendingCheckpoint, CompletedCheckpointStore: triggering, acks, completion, failures."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onceflow.checkpoint.config import CheckpointConfig
from onceflow.checkpoint.coordinator import (
    AbortCheckpoint,
    AckResult,
    CheckpointAction,
    CheckpointCoordinator,
    CheckpointFailureReason,
    CompletedCheckpoint,
    CompletedCheckpointStore,
    DiscardCheckpoint,
    FailJob,
    NotifyCheckpointComplete,
    PendingCheckpoint,
    PersistCheckpoint,
    TaskAck,
    TriggerCheckpoint,
)

EXPIRED = CheckpointFailureReason.EXPIRED
DECLINED = CheckpointFailureReason.DECLINED
SUBSUMED = CheckpointFailureReason.SUBSUMED
TASK_FAILURE = CheckpointFailureReason.TASK_FAILURE
PERSIST_FAILED = CheckpointFailureReason.PERSIST_FAILED
COUNTED = {EXPIRED, DECLINED, PERSIST_FAILED}


class FakeClock:
    """Seconds that only move when a test says so."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(tasks: tuple[str, ...] = ("a", "b"), **options: Any) -> tuple[CheckpointCoordinator, FakeClock]:
    clock = FakeClock()
    config = CheckpointConfig(**{"interval_s": 1.0, "timeout_s": 10.0, **options})
    return CheckpointCoordinator(config, tasks, clock=clock), clock


def ack_all(coordinator: CheckpointCoordinator, checkpoint_id: int) -> list[CheckpointAction]:
    actions: list[CheckpointAction] = []
    for task in sorted(coordinator.tasks):
        result, more = coordinator.on_ack(checkpoint_id, TaskAck(task))
        assert result is AckResult.SUCCESS
        actions += more
    return actions


def complete(coordinator: CheckpointCoordinator, checkpoint_id: int) -> list[CheckpointAction]:
    actions = ack_all(coordinator, checkpoint_id)
    assert [type(a) for a in actions] == [PersistCheckpoint]
    return coordinator.on_persisted(checkpoint_id)


def aborted(checkpoint_id: int, reason: CheckpointFailureReason) -> list[CheckpointAction]:
    return [AbortCheckpoint(checkpoint_id, reason), DiscardCheckpoint(checkpoint_id)]


# -- triggering ----------------------------------------------------------------------------


def test_first_poll_triggers_then_interval_is_respected() -> None:
    coordinator, clock = make(max_concurrent=3)
    assert coordinator.poll() == [TriggerCheckpoint(1, 0.0)]
    clock.advance(0.75)
    assert coordinator.poll() == []
    clock.advance(0.25)
    assert coordinator.poll() == [TriggerCheckpoint(2, 1.0)]
    assert coordinator.poll() == []
    assert sorted(coordinator.pending) == [1, 2]


def test_min_pause_is_measured_from_the_last_completion() -> None:
    coordinator, clock = make(interval_s=1.0, min_pause_s=2.0)
    assert coordinator.poll() == [TriggerCheckpoint(1, 0.0)]  # no completion yet: no pause
    clock.advance(0.5)
    assert complete(coordinator, 1) == [NotifyCheckpointComplete(1)]
    clock.advance(1.0)  # 1.5: the interval passed, the pause did not
    assert coordinator.poll() == []
    clock.advance(0.75)  # 2.25
    assert coordinator.poll() == []
    clock.advance(0.25)  # 2.5: two seconds after the completion
    assert coordinator.poll() == [TriggerCheckpoint(2, 2.5)]


def test_max_concurrent_limits_pending_checkpoints() -> None:
    coordinator, clock = make(max_concurrent=2)
    assert coordinator.poll() == [TriggerCheckpoint(1, 0.0)]
    clock.advance(1.0)
    assert coordinator.poll() == [TriggerCheckpoint(2, 1.0)]
    clock.advance(1.0)
    assert coordinator.poll() == []
    assert coordinator.trigger_now() == []
    assert complete(coordinator, 1) == [NotifyCheckpointComplete(1)]
    assert coordinator.poll() == [TriggerCheckpoint(3, 2.0)]


def test_one_pending_checkpoint_by_default() -> None:
    coordinator, clock = make()
    assert coordinator.poll() == [TriggerCheckpoint(1, 0.0)]
    clock.advance(5.0)
    assert coordinator.poll() == []
    complete(coordinator, 1)
    assert coordinator.poll() == [TriggerCheckpoint(2, 5.0)]


def test_trigger_now_ignores_the_interval_but_not_the_limits() -> None:
    coordinator, clock = make(max_concurrent=2)
    assert coordinator.trigger_now() == [TriggerCheckpoint(1, 0.0)]
    clock.advance(0.25)
    assert coordinator.trigger_now() == [TriggerCheckpoint(2, 0.25)]
    assert coordinator.trigger_now() == []  # max_concurrent
    clock.advance(0.75)
    assert coordinator.poll() == []  # the interval counts from the last trigger, trigger_now included
    coordinator.on_job_failure()
    assert coordinator.trigger_now() == []  # paused


def test_pause_and_resume() -> None:
    coordinator, clock = make()
    coordinator.poll()
    assert coordinator.on_job_failure() == aborted(1, TASK_FAILURE)
    assert coordinator.paused
    clock.advance(5.0)
    assert coordinator.poll() == []
    coordinator.resume()
    assert not coordinator.paused
    assert coordinator.poll() == []  # the interval starts again at the resume
    clock.advance(1.0)
    assert coordinator.poll() == [TriggerCheckpoint(2, 6.0)]


def test_resume_starts_from_a_clean_failure_count() -> None:
    """An expired checkpoint fails the attempt; the restored attempt must not inherit that failure."""
    clock = FakeClock()
    coordinator = CheckpointCoordinator(CheckpointConfig(interval_s=1.0, timeout_s=2.0), ["a"], clock=clock)
    clock.now = 1.0
    coordinator.poll()
    clock.now = 3.5
    assert any(isinstance(a, FailJob) for a in coordinator.poll())
    coordinator.on_job_failure()
    coordinator.resume()
    assert coordinator.consecutive_failures == 0
    clock.now = 4.5
    triggered = coordinator.poll()
    assert [type(a) for a in triggered] == [TriggerCheckpoint]
    assert not any(isinstance(a, FailJob) for a in coordinator.on_ack(triggered[0].checkpoint_id, TaskAck("a"))[1])


def test_next_id_continues_from_the_checkpoints_on_record() -> None:
    clock = FakeClock()
    coordinator = CheckpointCoordinator(CheckpointConfig(), ["a"], clock=clock, next_id=8)
    assert coordinator.poll() == [TriggerCheckpoint(8, 0.0)]
    assert coordinator.next_id == 9


# -- acknowledgements ----------------------------------------------------------------------


def test_ack_results() -> None:
    coordinator, _ = make()
    coordinator.poll()
    assert coordinator.on_ack(1, TaskAck("a")) == (AckResult.SUCCESS, [])
    assert coordinator.on_ack(1, TaskAck("a")) == (AckResult.DUPLICATE, [])
    assert coordinator.on_ack(1, TaskAck("ghost")) == (AckResult.UNKNOWN, [])
    assert coordinator.on_ack(2, TaskAck("a")) == (AckResult.UNKNOWN, [])
    assert coordinator.on_ack(0, TaskAck("b")) == (AckResult.UNKNOWN, [])
    result, actions = coordinator.on_ack(1, TaskAck("b"))
    assert result is AckResult.SUCCESS
    assert [type(a) for a in actions] == [PersistCheckpoint]
    assert coordinator.on_ack(1, TaskAck("b")) == (AckResult.DUPLICATE, [])  # while persisting


def test_ack_of_an_aborted_checkpoint_is_unknown_to_the_coordinator() -> None:
    coordinator, _ = make()
    coordinator.poll()
    coordinator.on_decline(1, "a")
    assert coordinator.on_ack(1, TaskAck("b")) == (AckResult.UNKNOWN, [])


def test_pending_checkpoint_ack_results_and_finalize() -> None:
    pending = PendingCheckpoint(3, 1.0, ["a", "b"])
    with pytest.raises(RuntimeError, match="checkpoint 3 is not fully acknowledged"):
        pending.finalize(2.0)
    state = {"op": {"path": "x", "bytes": 7}}
    assert pending.acknowledge(TaskAck("a", states=state)) is AckResult.SUCCESS
    assert pending.acknowledge(TaskAck("a")) is AckResult.DUPLICATE
    assert pending.acknowledge(TaskAck("c")) is AckResult.UNKNOWN
    assert not pending.is_fully_acknowledged
    assert pending.acknowledge(TaskAck("b", states={"op": {"bytes": 5}, "op2": {}})) is AckResult.SUCCESS
    assert pending.is_fully_acknowledged
    completed = pending.finalize(3.5)
    assert completed.checkpoint_id == 3
    assert completed.duration_s == 2.5
    assert completed.state_bytes == 12
    assert set(completed.acks) == {"a", "b"}
    pending.discard(EXPIRED)
    assert pending.discarded is EXPIRED
    assert not pending.is_fully_acknowledged
    assert pending.acknowledge(TaskAck("a")) is AckResult.DISCARDED
    with pytest.raises(RuntimeError):
        pending.finalize(4.0)


def test_pending_checkpoint_discarded_before_an_ack() -> None:
    pending = PendingCheckpoint(1, 0.0, ["a"])
    pending.discard(DECLINED)
    assert pending.acknowledge(TaskAck("a")) is AckResult.DISCARDED
    assert pending.acknowledge(TaskAck("ghost")) is AckResult.DISCARDED


# -- completion ----------------------------------------------------------------------------


def test_complete_only_after_persisted() -> None:
    coordinator, clock = make()
    coordinator.poll()
    clock.advance(0.5)
    assert coordinator.on_ack(1, TaskAck("b", states={"op": {"bytes": 3}})) == (AckResult.SUCCESS, [])
    result, actions = coordinator.on_ack(1, TaskAck("a"))
    assert result is AckResult.SUCCESS
    [persist] = actions
    assert isinstance(persist, PersistCheckpoint)
    assert persist.checkpoint.checkpoint_id == 1
    assert persist.checkpoint.trigger_time == 0.0
    assert set(persist.checkpoint.acks) == {"a", "b"}
    assert persist.checkpoint.state_bytes == 3
    # not complete yet: still pending, nothing in the store, not expiring
    assert coordinator.store.latest is None
    assert coordinator.completed_count == 0
    assert 1 in coordinator.pending
    clock.advance(30.0)
    assert coordinator.poll() == []
    assert coordinator.on_persisted(1) == [NotifyCheckpointComplete(1)]
    assert coordinator.pending == {}
    assert coordinator.completed_count == 1
    latest = coordinator.store.latest
    assert latest is not None
    assert latest.checkpoint_id == 1
    assert coordinator.on_persisted(1) == []  # once


def test_persisted_for_an_unknown_checkpoint_does_nothing() -> None:
    coordinator, _ = make()
    assert coordinator.on_persisted(5) == []
    assert coordinator.on_persist_failed(5) == []


def test_persisted_before_every_ack_leaves_the_pending_checkpoint_alone() -> None:
    coordinator, _ = make()
    coordinator.poll()
    coordinator.on_ack(1, TaskAck("a"))
    assert coordinator.on_persisted(1) == []
    assert 1 in coordinator.pending
    result, actions = coordinator.on_ack(1, TaskAck("b"))
    assert result is AckResult.SUCCESS
    assert [type(a) for a in actions] == [PersistCheckpoint]


def test_the_stored_checkpoint_is_the_one_persisted() -> None:
    coordinator, clock = make()
    coordinator.poll()
    clock.advance(0.5)
    [persist] = ack_all(coordinator, 1)
    assert isinstance(persist, PersistCheckpoint)
    clock.advance(2.0)
    coordinator.on_persisted(1)
    assert coordinator.store.latest == persist.checkpoint
    assert coordinator.store.latest.duration_s == 0.5


def test_completion_subsumes_older_pending_checkpoints() -> None:
    coordinator, clock = make(max_concurrent=3, tolerable_failures=0)
    for _ in range(3):
        coordinator.poll()
        clock.advance(1.0)
    assert sorted(coordinator.pending) == [1, 2, 3]
    coordinator.on_ack(1, TaskAck("a"))
    assert complete(coordinator, 2) == [NotifyCheckpointComplete(2), *aborted(1, SUBSUMED)]
    assert sorted(coordinator.pending) == [3]
    assert coordinator.consecutive_failures == 0  # subsumed is not a failure: no FailJob
    assert coordinator.failed_count == 0
    assert coordinator.on_ack(1, TaskAck("b")) == (AckResult.UNKNOWN, [])
    assert complete(coordinator, 3) == [NotifyCheckpointComplete(3)]


def test_completion_subsumes_an_older_checkpoint_that_is_persisting() -> None:
    coordinator, clock = make(max_concurrent=2)
    coordinator.poll()
    clock.advance(1.0)
    coordinator.poll()
    assert [type(a) for a in ack_all(coordinator, 1)] == [PersistCheckpoint]
    assert complete(coordinator, 2) == [NotifyCheckpointComplete(2), *aborted(1, SUBSUMED)]
    assert coordinator.on_persisted(1) == []  # its manifest arrived too late
    assert [c.checkpoint_id for c in coordinator.store.all()] == [2]


def test_store_keeps_the_newest_and_returns_the_rest() -> None:
    store = CompletedCheckpointStore(retain=2)
    assert store.latest is None
    assert store.all() == []

    def checkpoint(checkpoint_id: int) -> CompletedCheckpoint:
        return CompletedCheckpoint(checkpoint_id, 0.0, 1.0, {})

    assert store.add(checkpoint(1)) == []
    assert store.add(checkpoint(3)) == []
    assert store.add(checkpoint(4)) == [checkpoint(1)]
    assert store.all() == [checkpoint(3), checkpoint(4)]
    assert store.latest == checkpoint(4)
    with pytest.raises(ValueError, match="checkpoint 4 is not newer than 4"):
        store.add(checkpoint(4))
    with pytest.raises(ValueError, match="checkpoint 2 is not newer than 4"):
        store.add(checkpoint(2))
    assert store.all() == [checkpoint(3), checkpoint(4)]


def test_coordinator_discards_checkpoints_the_store_pushes_out() -> None:
    coordinator, clock = make(retain=2)
    notified = []
    for checkpoint_id in range(1, 5):
        assert coordinator.poll() == [TriggerCheckpoint(checkpoint_id, clock.now)]
        notified.append(complete(coordinator, checkpoint_id))
        clock.advance(1.0)
    assert notified == [
        [NotifyCheckpointComplete(1)],
        [NotifyCheckpointComplete(2)],
        [NotifyCheckpointComplete(3), DiscardCheckpoint(1)],
        [NotifyCheckpointComplete(4), DiscardCheckpoint(2)],
    ]
    assert [c.checkpoint_id for c in coordinator.store.all()] == [3, 4]


# -- failures ------------------------------------------------------------------------------


def test_expiry_aborts_and_fails_the_job_when_nothing_is_tolerated() -> None:
    coordinator, clock = make(timeout_s=3.0)
    coordinator.poll()
    clock.advance(2.75)
    assert coordinator.poll() == []
    clock.advance(0.25)
    actions = coordinator.poll()
    assert actions[:2] == aborted(1, EXPIRED)
    assert isinstance(actions[2], FailJob)
    assert "tolerable_failures" in actions[2].reason
    assert actions[3:] == [TriggerCheckpoint(2, 3.0)]  # expired first, so one can be triggered
    assert coordinator.consecutive_failures == 1
    assert coordinator.failed_count == 1


def test_failures_beyond_the_tolerated_fail_the_job() -> None:
    coordinator, clock = make(timeout_s=2.0, tolerable_failures=2)
    coordinator.poll()
    clock.advance(2.0)
    assert coordinator.poll() == [*aborted(1, EXPIRED), TriggerCheckpoint(2, 2.0)]
    assert coordinator.on_decline(2, "a") == aborted(2, DECLINED)
    clock.advance(1.0)
    coordinator.poll()
    ack_all(coordinator, 3)
    actions = coordinator.on_persist_failed(3)
    assert actions[:2] == aborted(3, PERSIST_FAILED)
    assert len(actions) == 3
    assert isinstance(actions[2], FailJob)
    assert coordinator.consecutive_failures == 3


def test_a_completion_resets_the_failure_count() -> None:
    coordinator, clock = make(tolerable_failures=1)
    coordinator.poll()
    assert coordinator.on_decline(1, "b") == aborted(1, DECLINED)
    assert coordinator.consecutive_failures == 1
    clock.advance(1.0)
    coordinator.poll()
    complete(coordinator, 2)
    assert coordinator.consecutive_failures == 0
    clock.advance(1.0)
    coordinator.poll()
    assert coordinator.on_decline(3, "a") == aborted(3, DECLINED)  # one failure again: tolerated
    clock.advance(1.0)
    coordinator.poll()
    assert isinstance(coordinator.on_decline(4, "a")[-1], FailJob)
    assert coordinator.failed_count == 3
    assert coordinator.completed_count == 1


def test_decline_from_an_unknown_task_or_for_an_unknown_checkpoint_is_ignored() -> None:
    coordinator, _ = make()
    coordinator.poll()
    assert coordinator.on_decline(1, "ghost") == []
    assert coordinator.on_decline(2, "a") == []
    assert 1 in coordinator.pending
    assert coordinator.consecutive_failures == 0


def test_a_persisting_checkpoint_does_not_expire() -> None:
    coordinator, clock = make(timeout_s=1.0)
    coordinator.poll()
    ack_all(coordinator, 1)
    clock.advance(100.0)
    assert coordinator.poll() == []
    assert coordinator.on_persisted(1) == [NotifyCheckpointComplete(1)]


def test_job_failure_aborts_pending_but_not_persisting_checkpoints_and_pauses() -> None:
    coordinator, clock = make(max_concurrent=3, tolerable_failures=0)
    for _ in range(3):
        coordinator.poll()
        clock.advance(1.0)
    ack_all(coordinator, 2)  # 2 is persisting
    assert coordinator.on_job_failure() == [*aborted(1, TASK_FAILURE), *aborted(3, TASK_FAILURE)]
    assert coordinator.paused
    assert sorted(coordinator.pending) == [2]
    assert coordinator.consecutive_failures == 0  # a task failure is not a checkpoint failure
    assert coordinator.on_persisted(2) == [NotifyCheckpointComplete(2)]
    assert coordinator.paused  # only resume() unpauses
    assert coordinator.poll() == []


# -- a random walk over the protocol ----------------------------------------------------------


@st.composite
def configs(draw: st.DrawFn) -> CheckpointConfig:
    return CheckpointConfig(
        interval_s=draw(st.sampled_from([0.25, 0.5, 1.0, 2.0])),
        timeout_s=draw(st.sampled_from([0.5, 2.0, 10.0, 30.0])),
        min_pause_s=draw(st.sampled_from([0.0, 0.25, 1.0, 2.0])),
        max_concurrent=draw(st.integers(1, 3)),
        retain=draw(st.integers(1, 3)),
        tolerable_failures=draw(st.integers(0, 3)),
    )


# Weighted by repetition: acknowledgements and persists are the common events, failures rarer.
KINDS = (["ack"] * 10 + ["ack_rest"] * 3 + ["persisted"] * 4 + ["poll"] * 8 + ["advance"] * 6 + ["resume"] * 4
         + ["trigger_now", "decline", "persist_failed", "job_failure"])
EVENTS = st.tuples(
    st.sampled_from(KINDS),
    st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.0, 5.0]),  # seconds, for advance
    st.integers(0, 9),  # the task: mostly one yet to acknowledge, see pick_task
    st.integers(0, 20),  # the checkpoint: mostly an open one, see pick_id
)
Event = tuple[str, float, int, int]


@dataclass
class Model:
    """What the coordinator's actions must agree with, kept apart from the coordinator."""

    config: CheckpointConfig
    tasks: tuple[str, ...]
    clock: FakeClock
    triggered: dict[int, float] = field(default_factory=dict)  # id -> trigger time
    acked: dict[int, set[str]] = field(default_factory=dict)
    persisting: set[int] = field(default_factory=set)  # PersistCheckpoint emitted
    outstanding: set[int] = field(default_factory=set)  # persisting, no on_persisted/on_persist_failed yet
    persisted_called: set[int] = field(default_factory=set)
    ended: set[int] = field(default_factory=set)  # notified or aborted
    completed: list[int] = field(default_factory=list)
    discarded: set[int] = field(default_factory=set)
    consecutive: int = 0
    paused: bool = False
    last_trigger: float | None = None
    last_completion: float | None = None

    def open(self) -> list[int]:
        return sorted(set(self.triggered) - self.ended)

    def due(self) -> bool:
        now = self.clock.now
        return (not self.paused and len(self.open()) < self.config.max_concurrent
                and (self.last_trigger is None or now - self.last_trigger >= self.config.interval_s)
                and (self.last_completion is None or now - self.last_completion >= self.config.min_pause_s))


def pick_id(model: Model, pick: int) -> int:
    """Mostly an open checkpoint (often the newest, so newer ones overtake older ones); sometimes an ended
    one or one never triggered."""
    open_ids = model.open()
    others = [*sorted(model.ended), 0, max(model.triggered, default=0) + 1]
    if open_ids and pick % 8 != 7:
        return open_ids[-1] if pick % 2 else open_ids[pick % len(open_ids)]
    return others[pick % len(others)]


def pick_task(model: Model, checkpoint_id: int, pick: int) -> str:
    """Mostly a task that has not acknowledged ``checkpoint_id`` yet; sometimes any task or an unknown one."""
    waiting = [t for t in model.tasks if t not in model.acked.get(checkpoint_id, set())]
    if waiting and pick < 7:
        return waiting[pick % len(waiting)]
    everyone = [*model.tasks, "ghost"]
    return everyone[pick % len(everyone)]


def check_actions(model: Model, kind: str, target: int | None, actions: list[CheckpointAction]) -> None:
    """Walk the ``actions`` of event ``kind`` (on checkpoint ``target``) in order, checking and updating the model."""
    now = model.clock.now
    i = 0
    while i < len(actions):
        action = actions[i]
        if isinstance(action, TriggerCheckpoint):
            assert kind in ("poll", "trigger_now")
            assert not model.paused
            assert len(model.open()) < model.config.max_concurrent
            if kind == "poll":
                assert model.due()
            assert action.checkpoint_id == max(model.triggered, default=0) + 1  # strictly increasing
            assert action.timestamp == now
            model.triggered[action.checkpoint_id] = now
            model.acked[action.checkpoint_id] = set()
            model.last_trigger = now
        elif isinstance(action, PersistCheckpoint):
            checkpoint_id = action.checkpoint.checkpoint_id
            assert kind in ("ack", "ack_rest")
            assert model.acked[checkpoint_id] == set(model.tasks)
            assert set(action.checkpoint.acks) == set(model.tasks)
            assert checkpoint_id not in model.persisting
            model.persisting.add(checkpoint_id)
            model.outstanding.add(checkpoint_id)
        elif isinstance(action, NotifyCheckpointComplete):
            checkpoint_id = action.checkpoint_id
            assert kind == "persisted"
            assert target == checkpoint_id
            assert checkpoint_id in model.persisted_called
            assert model.acked[checkpoint_id] == set(model.tasks)
            assert checkpoint_id not in model.ended  # at most once
            assert not model.completed or checkpoint_id > model.completed[-1]
            model.ended.add(checkpoint_id)
            model.completed.append(checkpoint_id)
            model.consecutive = 0
            model.last_completion = now
        elif isinstance(action, AbortCheckpoint):
            checkpoint_id = action.checkpoint_id
            assert checkpoint_id in model.triggered
            assert checkpoint_id not in model.ended
            assert actions[i + 1] == DiscardCheckpoint(checkpoint_id)
            expected_reason = {"poll": EXPIRED, "decline": DECLINED, "persist_failed": PERSIST_FAILED,
                               "persisted": SUBSUMED, "job_failure": TASK_FAILURE}[kind]
            assert action.reason is expected_reason
            if action.reason in (EXPIRED, TASK_FAILURE):
                assert checkpoint_id not in model.persisting
            if action.reason is EXPIRED:
                assert now - model.triggered[checkpoint_id] >= model.config.timeout_s
            if action.reason is SUBSUMED:
                assert model.completed and checkpoint_id < model.completed[-1]
            model.ended.add(checkpoint_id)
            model.discarded.add(checkpoint_id)
            i += 1
            if action.reason in COUNTED:
                model.consecutive += 1
                fails = model.consecutive > model.config.tolerable_failures
                has_fail = i + 1 < len(actions) and isinstance(actions[i + 1], FailJob)
                assert fails == has_fail, "FailJob exactly when consecutive failures exceed the tolerated"
                i += int(has_fail)
        elif isinstance(action, DiscardCheckpoint):
            # not after an abort: a completed checkpoint the store pushed out
            assert kind == "persisted"
            assert action.checkpoint_id in model.completed[:-model.config.retain]
            assert action.checkpoint_id not in model.discarded
            model.discarded.add(action.checkpoint_id)
        else:
            pytest.fail(f"unexpected {action!r} after {kind} {target}")
        i += 1


def check_state(model: Model, coordinator: CheckpointCoordinator) -> None:
    assert sorted(coordinator.pending) == model.open()
    assert len(coordinator.pending) <= model.config.max_concurrent
    if model.completed:  # a completion subsumes every older checkpoint
        assert all(n > model.completed[-1] for n in coordinator.pending)
    assert coordinator.paused == model.paused
    assert coordinator.consecutive_failures == model.consecutive
    retained = [c.checkpoint_id for c in coordinator.store.all()]
    assert len(retained) <= model.config.retain
    assert retained == model.completed[-model.config.retain:]
    assert set(model.completed[:-model.config.retain]) <= model.discarded
    assert coordinator.completed_count == len(model.completed)


@settings(max_examples=200, deadline=None)
@given(config=configs(), task_count=st.integers(1, 4), events=st.lists(EVENTS, min_size=20, max_size=100))
def test_random_protocol_runs_keep_the_invariants(config: CheckpointConfig, task_count: int,
                                                  events: list[Event]) -> None:
    tasks = tuple(f"t{n}" for n in range(task_count))
    clock = FakeClock()
    coordinator = CheckpointCoordinator(config, tasks, clock=clock)
    model = Model(config, tasks, clock)
    for kind, seconds, task_pick, id_pick in events:
        actions: list[CheckpointAction] = []
        target: int | None = None
        if kind == "advance":
            clock.advance(seconds)
        elif kind == "poll":
            actions = coordinator.poll()
        elif kind == "trigger_now":
            can = not model.paused and len(model.open()) < config.max_concurrent
            actions = coordinator.trigger_now()
            assert len(actions) == int(can)
        elif kind == "ack_rest":  # every task yet to acknowledge does, in one burst
            target = pick_id(model, id_pick)
            for task in sorted(set(tasks) - model.acked.get(target, set())):
                result, more = coordinator.on_ack(target, TaskAck(task))
                assert result is (AckResult.SUCCESS if target in model.open() else AckResult.UNKNOWN)
                if result is AckResult.SUCCESS:
                    model.acked[target].add(task)
                actions += more
        elif kind in ("ack", "decline"):
            target = pick_id(model, id_pick)
            task = pick_task(model, target, task_pick)
            is_open = target in model.open()
            if kind == "ack":
                if not is_open or task not in tasks:
                    expected = AckResult.UNKNOWN
                elif task in model.acked[target]:
                    expected = AckResult.DUPLICATE
                else:
                    expected = AckResult.SUCCESS
                result, actions = coordinator.on_ack(target, TaskAck(task))
                assert result is expected
                if result is AckResult.SUCCESS:
                    model.acked[target].add(task)
                else:
                    assert actions == []
            else:
                actions = coordinator.on_decline(target, task)
                assert bool(actions) == (is_open and task in tasks)
        elif kind in ("persisted", "persist_failed"):
            if not model.outstanding:
                continue
            outstanding = sorted(model.outstanding)
            target = outstanding[id_pick % len(outstanding)]
            model.outstanding.discard(target)
            was_open = target in model.open()
            if kind == "persisted":
                model.persisted_called.add(target)
                actions = coordinator.on_persisted(target)
                if was_open:
                    assert actions[0] == NotifyCheckpointComplete(target)
            else:
                actions = coordinator.on_persist_failed(target)
                if was_open:
                    assert actions[:1] == [AbortCheckpoint(target, PERSIST_FAILED)]
            if not was_open:
                assert actions == []  # subsumed meanwhile: its manifest changes nothing
        elif kind == "job_failure":
            expected_aborts = [n for n in model.open() if n not in model.persisting]
            actions = coordinator.on_job_failure()
            assert [a.checkpoint_id for a in actions if isinstance(a, AbortCheckpoint)] == expected_aborts
            model.paused = True
        else:
            coordinator.resume()
            model.paused = False
            model.consecutive = 0  # a restored attempt starts from a clean failure count
            model.last_trigger = clock.now
        check_actions(model, kind, target, actions)
        if kind == "poll":
            if not any(isinstance(a, TriggerCheckpoint) for a in actions):
                assert not model.due(), "poll must trigger when a checkpoint is due"
            for checkpoint_id in model.open():  # nothing left that should have expired
                age = clock.now - model.triggered[checkpoint_id]
                assert checkpoint_id in model.persisting or age < config.timeout_s
        check_state(model, coordinator)
