"""JobSupervisor: the job lifecycle decided without Ray, every event in every phase."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from onceflow.checkpoint.supervisor import (
    CancelRequested,
    CommitOutput,
    Committed,
    DeployAttempt,
    Deployed,
    Failed,
    FenceAttempt,
    Fenced,
    FinalCheckpointCompleted,
    Finish,
    InputEnded,
    JobEnd,
    JobPhase,
    JobSupervisor,
    ResolveSinks,
    RestartDue,
    ScheduleRestart,
    SinkEnd,
    SinksResolved,
    StopRequested,
    StopSources,
    SupervisorAction,
    SupervisorEvent,
    TakeFinalCheckpoint,
)
from onceflow.runtime.restart import RestartStrategy


def started(attempts: int = 3, *, checkpointing: bool = True, restore: int | None = None) -> JobSupervisor:
    supervisor = JobSupervisor(RestartStrategy.fixed_delay(attempts=attempts, delay_s=0.5),
                               checkpointing=checkpointing)
    assert supervisor.start(restore) == [ResolveSinks(restore, SinkEnd.RESTORE)]
    assert supervisor.on_event(SinksResolved(1)) == [DeployAttempt(1, restore)]
    assert supervisor.on_event(Deployed(1)) == []
    assert supervisor.phase is JobPhase.RUNNING
    return supervisor


def test_a_bounded_job_ends_with_its_final_checkpoint() -> None:
    supervisor = started()
    assert supervisor.on_event(InputEnded(1)) == [TakeFinalCheckpoint(1)]
    assert supervisor.on_event(FinalCheckpointCompleted(1, 7)) == [Finish(JobEnd.FINISHED, latest_checkpoint=7)]
    assert supervisor.finished and supervisor.phase is JobPhase.FINISHED
    assert supervisor.on_event(Failed(1, "late echo")) == []


def test_without_checkpoints_the_output_commits_at_the_end_and_a_failure_aborts_everything() -> None:
    supervisor = started(checkpointing=False)
    assert supervisor.on_event(InputEnded(1)) == [CommitOutput(1)]
    assert supervisor.on_event(Committed(1)) == [Finish(JobEnd.FINISHED)]

    failing = started(checkpointing=False)
    assert failing.on_event(Failed(1, "actor died")) == [FenceAttempt(1)]
    assert failing.on_event(Fenced(1, None)) == [ResolveSinks(None, SinkEnd.FAIL)]
    assert failing.on_event(SinksResolved(1)) == [
        Finish(JobEnd.FAILED, reason="actor died; nothing was committed")]


def test_a_failure_while_deploying_is_one_failure_for_the_restart_strategy() -> None:
    supervisor = JobSupervisor(RestartStrategy.fixed_delay(attempts=1, delay_s=0.0), checkpointing=True)
    supervisor.start(None)
    supervisor.on_event(SinksResolved(1))
    assert supervisor.on_event(Failed(1, "the actor never ran")) == [FenceAttempt(1)]
    assert supervisor.on_event(Fenced(1, None)) == [ScheduleRestart(2, 0.0)]
    assert supervisor.restarts == 1


def test_echoes_of_one_failure_and_events_of_fenced_attempts_are_ignored() -> None:
    supervisor = started()
    assert supervisor.on_event(Failed(1, "a")) == [FenceAttempt(1)]
    assert supervisor.on_event(Failed(1, "b: the same failure, seen elsewhere")) == []
    assert supervisor.on_event(Fenced(1, 4)) == [ScheduleRestart(2, 0.5)]
    for stale in (Failed(1, "c"), Deployed(1), InputEnded(1), FinalCheckpointCompleted(1, 9), SinksResolved(1)):
        assert supervisor.on_event(stale) == []
    assert supervisor.restarts == 1
    assert supervisor.on_event(RestartDue(2)) == [ResolveSinks(4, SinkEnd.RESTORE)]
    assert supervisor.on_event(SinksResolved(2)) == [DeployAttempt(2, 4)]


def test_the_restore_point_is_read_only_after_fencing() -> None:
    """Recovery restores what the fenced attempt reports: a completion in flight is settled first."""
    supervisor = started()
    actions = supervisor.on_event(Failed(1, "subtask died while checkpoint 5's manifest was written"))
    assert actions == [FenceAttempt(1)]  # no restore decision yet
    supervisor.on_event(Fenced(1, latest_checkpoint=5))
    supervisor.on_event(RestartDue(2))
    assert supervisor.on_event(SinksResolved(2)) == [DeployAttempt(2, 5)]


def test_restarts_run_out_and_the_failed_job_keeps_the_newest_checkpoints_transactions() -> None:
    supervisor = started(attempts=1)
    supervisor.on_event(Failed(1, "x"))
    supervisor.on_event(Fenced(1, 2))
    supervisor.on_event(RestartDue(2))
    supervisor.on_event(SinksResolved(2))
    supervisor.on_event(Deployed(2))
    assert supervisor.on_event(Failed(2, "y", operator="window_2/0")) == [FenceAttempt(2)]
    assert supervisor.on_event(Fenced(2, 3)) == [ResolveSinks(3, SinkEnd.FAIL)]
    assert supervisor.on_event(SinksResolved(2)) == [
        Finish(JobEnd.FAILED, reason="y", operator="window_2/0", latest_checkpoint=3, gave_up=True)]


def test_a_failure_a_restart_would_repeat_fails_the_job_at_once() -> None:
    supervisor = started()
    supervisor.on_event(Failed(1, "bad column", retryable=False))
    assert supervisor.on_event(Fenced(1, 1)) == [ResolveSinks(1, SinkEnd.FAIL)]
    assert supervisor.restarts == 0


def test_stop_survives_a_restart() -> None:
    supervisor = started()
    supervisor.on_event(Failed(1, "x"))
    assert supervisor.on_event(StopRequested()) == []  # nothing running to stop now
    supervisor.on_event(Fenced(1, 2))
    supervisor.on_event(RestartDue(2))
    supervisor.on_event(SinksResolved(2))
    assert supervisor.on_event(Deployed(2)) == [StopSources(2)]
    assert supervisor.on_event(InputEnded(2)) == [TakeFinalCheckpoint(2)]


def test_cancel_in_every_phase_fences_then_commits_what_completed_checkpoints_decided() -> None:
    running = started()
    assert running.on_event(CancelRequested()) == [FenceAttempt(1)]
    assert running.on_event(Fenced(1, 6)) == [ResolveSinks(6, SinkEnd.CANCEL)]
    assert running.on_event(SinksResolved(1)) == [Finish(JobEnd.CANCELLED, reason="cancelled", latest_checkpoint=6)]

    waiting = started()
    waiting.on_event(Failed(1, "x"))
    waiting.on_event(Fenced(1, 6))
    assert waiting.phase is JobPhase.WAITING
    assert waiting.on_event(CancelRequested()) == [ResolveSinks(6, SinkEnd.CANCEL)]
    assert waiting.on_event(RestartDue(2)) == []  # the timer fires too late: no deployment

    resolving = started()
    resolving.on_event(Failed(1, "x"))
    resolving.on_event(Fenced(1, 6))
    resolving.on_event(RestartDue(2))
    assert resolving.on_event(CancelRequested()) == []  # the resolution under way reports back first
    assert resolving.on_event(SinksResolved(2)) == [ResolveSinks(6, SinkEnd.CANCEL)]
    assert resolving.on_event(SinksResolved(2))[0].end is JobEnd.CANCELLED  # type: ignore[union-attr]

    deploying = started()
    deploying.on_event(Failed(1, "x"))
    deploying.on_event(Fenced(1, 6))
    deploying.on_event(RestartDue(2))
    deploying.on_event(SinksResolved(2))
    assert deploying.on_event(CancelRequested()) == [FenceAttempt(2)]  # kills whatever was deployed
    assert deploying.on_event(Deployed(2)) == []


def test_a_stop_after_a_savepoint_ends_as_a_cancel_does_but_finished() -> None:
    running = started()
    assert running.on_event(CancelRequested(after_savepoint=True)) == [FenceAttempt(1)]
    assert running.on_event(Fenced(1, 7)) == [ResolveSinks(7, SinkEnd.CANCEL)]  # the savepoint's output stays
    assert running.on_event(SinksResolved(1)) == [Finish(JobEnd.FINISHED, reason="stopped with a savepoint",
                                                         latest_checkpoint=7)]
    assert running.phase is JobPhase.FINISHED
    failing = started()
    failing.on_event(Failed(1, "x", retryable=False))
    assert failing.on_event(CancelRequested(after_savepoint=True)) == []  # the failure's end stands


# -- a model-based property test -------------------------------------------------------------------


@dataclass
class World:
    """What the driver would have done: the invariants are checked against it."""

    live_attempt: int | None = None
    deployed: list[int] = field(default_factory=list)
    fenced: set[int] = field(default_factory=set)
    outstanding: list[SupervisorEvent] = field(default_factory=list)
    finish: Finish | None = None
    resolved_ends: list[SinkEnd] = field(default_factory=list)
    stop_sent: set[int] = field(default_factory=set)


def carry_out(world: World, supervisor: JobSupervisor, actions: list[SupervisorAction], latest: int) -> None:
    for action in actions:
        assert world.finish is None, f"{action} after {world.finish}"
        if isinstance(action, DeployAttempt):
            assert world.live_attempt is None, "deployed over a live attempt"
            assert not world.deployed or action.attempt > world.deployed[-1]
            assert all(a in world.fenced for a in world.deployed), "an earlier attempt was never fenced"
            world.live_attempt = action.attempt
            world.deployed.append(action.attempt)
            world.outstanding.append(Deployed(action.attempt))
        elif isinstance(action, FenceAttempt):
            world.live_attempt = None
            world.fenced.add(action.attempt)
            world.outstanding.append(Fenced(action.attempt, latest))
        elif isinstance(action, ResolveSinks):
            assert world.live_attempt is None, "sinks resolved while an attempt's writers live"
            world.resolved_ends.append(action.end)
            world.outstanding.append(SinksResolved(supervisor.attempt))
        elif isinstance(action, ScheduleRestart):
            world.outstanding.append(RestartDue(action.attempt))
        elif isinstance(action, TakeFinalCheckpoint):
            world.outstanding.append(FinalCheckpointCompleted(action.attempt, latest + 1))
        elif isinstance(action, CommitOutput):
            world.outstanding.append(Committed(action.attempt))
        elif isinstance(action, StopSources):
            world.stop_sent.add(action.attempt)
            world.outstanding.append(InputEnded(action.attempt))
        elif isinstance(action, Finish):
            world.finish = action


STEPS = st.lists(st.tuples(st.sampled_from(["deliver", "fail", "fail_fatal", "end_input", "stop", "cancel"]),
                           st.integers(0, 10)), min_size=1, max_size=60)


@settings(max_examples=400, deadline=None)
@given(steps=STEPS, checkpointing=st.booleans(), attempts=st.integers(0, 3))
def test_any_interleaving_of_failures_and_requests_keeps_the_lifecycle_invariants(
        steps: list[tuple[str, int]], checkpointing: bool, attempts: int) -> None:
    """Whatever happens in whatever order: no attempt deploys before the one before it is fenced,
    sinks are resolved only while no attempt lives, the job ends exactly once with no attempt alive,
    a cancel ends it cancelled, and restarts never exceed the strategy."""
    supervisor = JobSupervisor(RestartStrategy.fixed_delay(attempts=attempts, delay_s=0.0),
                               checkpointing=checkpointing)
    world = World()
    latest = 0
    cancelled = stopped = False
    carry_out(world, supervisor, supervisor.start(None), latest)
    for kind, pick in steps:
        if supervisor.finished:
            break
        event: SupervisorEvent | None = None
        if kind == "deliver" and world.outstanding:
            event = world.outstanding.pop(pick % len(world.outstanding))
        elif kind in ("fail", "fail_fatal"):
            # A failure can be reported about the live attempt or, late, about an older one.
            attempt = supervisor.attempt - (pick % 2)
            event = Failed(attempt, "boom", retryable=kind == "fail")
        elif kind == "end_input" and world.live_attempt is not None:
            event = InputEnded(world.live_attempt)
        elif kind == "stop":
            stopped = True
            event = StopRequested()
        elif kind == "cancel":
            cancelled = True
            event = CancelRequested()
        if event is not None:
            latest += 1
            carry_out(world, supervisor, supervisor.on_event(event), latest)
    # Let everything outstanding happen, in order, until the job settles.
    for _ in range(200):
        if supervisor.finished or not world.outstanding:
            break
        carry_out(world, supervisor, supervisor.on_event(world.outstanding.pop(0)), latest)
    assert supervisor.restarts <= attempts
    if supervisor.finished:
        assert world.finish is not None
        assert world.live_attempt is None or world.finish.end is JobEnd.FINISHED
        if world.finish.end is JobEnd.CANCELLED:
            assert cancelled and world.resolved_ends[-1] is SinkEnd.CANCEL
        if world.finish.end is JobEnd.FAILED:
            assert world.resolved_ends[-1] is SinkEnd.FAIL
    else:
        # Only a job still running (or finishing) with nothing outstanding may be unfinished.
        assert not cancelled or world.outstanding, "a cancel did not end the job"
        assert supervisor.phase in (JobPhase.RUNNING, JobPhase.FINISHING)
    if stopped and world.deployed and supervisor.phase is JobPhase.RUNNING:
        assert world.deployed[-1] in world.stop_sent, "a stop was lost across a restart"
