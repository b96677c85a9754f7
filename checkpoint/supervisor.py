"""The job lifecycle as a state machine (sans-IO): events in, actions out.

A :class:`JobSupervisor` decides everything about a job's life: when to deploy
an attempt, what a failure means in each phase, when to fence a failed
attempt, which checkpoint to restore, when the sinks' transactions are
resolved, when the job ends and in which state. It never waits, sleeps or
calls Ray: the job handle (the *driver*) carries out each returned action and
feeds back what happened as an event. That makes every interleaving of
failures with the lifecycle testable deterministically, without Ray.

Every attempt (the first run of the actors, and each restart) has a number;
events about an older attempt are *stale* and ignored, so an echo of a failure
that was already handled can never start a second recovery.

The phases of one attempt::

    RESOLVING -> DEPLOYING -> RUNNING -> FINISHING -> FINISHED
        ^                        |  (any failure, any phase)
        |                        v
    WAITING <---------------- FENCING -> ENDING -> FAILED | CANCELLED

``FENCING`` kills the attempt's actors and waits until they are confirmed dead
and the coordinator settled every checkpoint completion that was in flight, so
the checkpoint reported by :class:`Fenced` is the newest one that will ever
complete for that attempt. Only then are sink transactions resolved
(``RESOLVING``: commit what that checkpoint names, abort everything else), and
only after that does the next attempt deploy. Nothing a completed checkpoint
names is ever aborted.

Example:
    >>> from onceflow.runtime.restart import RestartStrategy
    >>> supervisor = JobSupervisor(RestartStrategy.fixed_delay(attempts=1, delay_s=0.5), checkpointing=True)
    >>> supervisor.start(restore=None)
    [ResolveSinks(checkpoint_id=None, end=<SinkEnd.RESTORE: 'restore'>)]
    >>> supervisor.on_event(SinksResolved(attempt=1))
    [DeployAttempt(attempt=1, restore=None)]
    >>> supervisor.on_event(Deployed(attempt=1))
    []
    >>> supervisor.on_event(Failed(attempt=1, reason="subtask 'job/map_1/0' died"))
    [FenceAttempt(attempt=1)]
    >>> supervisor.on_event(Fenced(attempt=1, latest_checkpoint=3))
    [ScheduleRestart(attempt=2, delay_s=0.5)]
    >>> supervisor.on_event(RestartDue(attempt=2))
    [ResolveSinks(checkpoint_id=3, end=<SinkEnd.RESTORE: 'restore'>)]
    >>> supervisor.on_event(SinksResolved(attempt=2))
    [DeployAttempt(attempt=2, restore=3)]
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from onceflow.runtime.restart import RestartStrategy

__all__ = [
    "CancelRequested",
    "CommitOutput",
    "Committed",
    "DeployAttempt",
    "Deployed",
    "Failed",
    "FenceAttempt",
    "Fenced",
    "FinalCheckpointCompleted",
    "Finish",
    "InputEnded",
    "JobEnd",
    "JobPhase",
    "JobSupervisor",
    "ResolveSinks",
    "RestartDue",
    "ScheduleRestart",
    "SinkEnd",
    "SinksResolved",
    "StopRequested",
    "StopSources",
    "SupervisorAction",
    "SupervisorEvent",
    "TakeFinalCheckpoint",
]


class JobPhase(Enum):
    """Where the job is in its lifecycle."""

    RESOLVING = "resolving"
    DEPLOYING = "deploying"
    RUNNING = "running"
    FINISHING = "finishing"
    FENCING = "fencing"
    WAITING = "waiting"
    ENDING = "ending"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        """Whether the job's life is over."""
        return self in (JobPhase.FINISHED, JobPhase.FAILED, JobPhase.CANCELLED)


class JobEnd(Enum):
    """How a job ended."""

    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"


class SinkEnd(Enum):
    """What resolving the sinks' transactions is for.

    ``RESTORE``: before an attempt deploys, commit what the restored checkpoint
    names and abort everything else. ``CANCEL``: the job was cancelled; commit
    what the newest completed checkpoint decided, abort everything else.
    ``FAIL``: the job failed for good; keep (prepared, not committed) exactly
    the newest completed checkpoint's transactions, which a resume commits, and
    abort everything else. Without checkpoints every end aborts everything.
    """

    RESTORE = "restore"
    CANCEL = "cancel"
    FAIL = "fail"


# -- events -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SinksResolved:
    """The sinks' transactions were resolved as :class:`ResolveSinks` asked."""

    attempt: int


@dataclass(frozen=True, slots=True)
class Deployed:
    """Every actor of ``attempt`` is created, restored and wired; sources run."""

    attempt: int


@dataclass(frozen=True, slots=True)
class InputEnded:
    """Every subtask of ``attempt`` processed its end of input."""

    attempt: int


@dataclass(frozen=True, slots=True)
class FinalCheckpointCompleted:
    """The final checkpoint of ``attempt`` completed and every sink committed it."""

    attempt: int
    checkpoint_id: int


@dataclass(frozen=True, slots=True)
class Committed:
    """Without checkpoints: every sink committed its output at the end of input."""

    attempt: int


@dataclass(frozen=True, slots=True)
class Failed:
    """Something of ``attempt`` failed: an actor died, a call failed or timed out, in any phase.

    Attributes:
        attempt: the attempt it happened in.
        reason: what failed, for messages.
        retryable: ``False`` for a failure a restart would only repeat (bad data, a bad plan).
        operator: the operator (``<operator>/<subtask>``) to blame, if known.
    """

    attempt: int
    reason: str
    retryable: bool = True
    operator: str = ""


@dataclass(frozen=True, slots=True)
class Fenced:
    """Every actor of ``attempt`` is confirmed dead and no checkpoint completion is in flight.

    Attributes:
        attempt: the fenced attempt.
        latest_checkpoint: the newest completed checkpoint of this run (final now), or ``None``.
    """

    attempt: int
    latest_checkpoint: int | None


@dataclass(frozen=True, slots=True)
class RestartDue:
    """The delay before restart ``attempt`` has passed."""

    attempt: int


@dataclass(frozen=True, slots=True)
class StopRequested:
    """The user asked the job to end its input, drain and commit (it survives restarts)."""


@dataclass(frozen=True, slots=True)
class CancelRequested:
    """The user asked the job to end at once.

    ``after_savepoint``: the job stops after a savepoint (Flink's stop with a
    savepoint): the end is the same as a cancel's (the newest completed
    checkpoint, the savepoint, is what the sinks keep), but the job *finished*.
    """

    after_savepoint: bool = False


SupervisorEvent = (
    SinksResolved | Deployed | InputEnded | FinalCheckpointCompleted | Committed | Failed | Fenced | RestartDue
    | StopRequested | CancelRequested
)


# -- actions ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResolveSinks:
    """Resolve every transaction of every sink operator (see :class:`SinkEnd`); then :class:`SinksResolved`.

    Attributes:
        checkpoint_id: the checkpoint whose transactions are committed (or kept), or ``None``.
        end: what the resolution is for.
    """

    checkpoint_id: int | None
    end: SinkEnd


@dataclass(frozen=True, slots=True)
class DeployAttempt:
    """Create, restore and wire the actors of ``attempt``; then :class:`Deployed` (or :class:`Failed`)."""

    attempt: int
    restore: int | None


@dataclass(frozen=True, slots=True)
class StopSources:
    """Tell the sources of ``attempt`` to end their input."""

    attempt: int


@dataclass(frozen=True, slots=True)
class TakeFinalCheckpoint:
    """Take the final checkpoint of ``attempt``; then :class:`FinalCheckpointCompleted`."""

    attempt: int


@dataclass(frozen=True, slots=True)
class CommitOutput:
    """Without checkpoints: commit every sink's output; then :class:`Committed`."""

    attempt: int


@dataclass(frozen=True, slots=True)
class FenceAttempt:
    """Kill the actors of ``attempt``, confirm their death, settle checkpoint completions; then :class:`Fenced`."""

    attempt: int


@dataclass(frozen=True, slots=True)
class ScheduleRestart:
    """Wait ``delay_s``, then send :class:`RestartDue` for ``attempt``."""

    attempt: int
    delay_s: float


@dataclass(frozen=True, slots=True)
class Finish:
    """The job ended: remove every actor that is left and report ``end``.

    Attributes:
        end: finished, failed or cancelled.
        reason: why it failed (empty otherwise).
        operator: the operator to blame, if known.
        latest_checkpoint: the newest completed checkpoint (to resume from), if any.
        gave_up: a retryable failure exhausted the restart strategy.
    """

    end: JobEnd
    reason: str = ""
    operator: str = ""
    latest_checkpoint: int | None = None
    gave_up: bool = False


SupervisorAction = (
    ResolveSinks | DeployAttempt | StopSources | TakeFinalCheckpoint | CommitOutput | FenceAttempt
    | ScheduleRestart | Finish
)


class JobSupervisor:
    """Decides a job's lifecycle.

    Args:
        strategy: how often and how soon to restart after a failure.
        checkpointing: whether the job takes checkpoints; without them a
            failure ends the job (nothing is committed) and the output commits
            once, at the end of input.

    Attributes:
        phase: where the job is.
        attempt: the current attempt's number (1 for the first).
        restarts: the restarts granted so far.
        stop_requested: the user asked for a graceful stop (kept across restarts).
        latest_checkpoint: the newest completed checkpoint known (from the last fencing or the start).
    """

    def __init__(self, strategy: RestartStrategy, *, checkpointing: bool) -> None:
        self._restarts = strategy.tracker()
        self.checkpointing = checkpointing
        self.phase = JobPhase.RESOLVING
        self.attempt = 0
        self.stop_requested = False
        self.latest_checkpoint: int | None = None
        self._ending: Finish | None = None
        self._delay_s = 0.0

    @property
    def restarts(self) -> int:
        """The restarts granted so far."""
        return self._restarts.attempts

    @property
    def strategy(self) -> RestartStrategy:
        """The restart strategy applied."""
        return self._restarts.strategy

    @property
    def finished(self) -> bool:
        """Whether the job's life is over."""
        return self.phase.terminal

    def start(self, restore: int | None) -> list[SupervisorAction]:
        """Begin the first attempt, from checkpoint ``restore`` (a resume) or from the start."""
        self.attempt = 1
        self.latest_checkpoint = restore
        self.phase = JobPhase.RESOLVING
        return [ResolveSinks(restore, SinkEnd.RESTORE)]

    # -- events ---------------------------------------------------------------------------

    def on_event(self, event: SupervisorEvent) -> list[SupervisorAction]:
        """Apply ``event``; return what the driver must do next."""
        if self.phase.terminal:
            return []
        if isinstance(event, StopRequested):
            return self._on_stop()
        if isinstance(event, CancelRequested):
            return self._on_cancel(event)
        if event.attempt != self.attempt:
            return []  # stale: about an attempt that was already fenced
        if isinstance(event, Failed):
            return self._on_failed(event)
        if isinstance(event, Fenced):
            return self._on_fenced(event)
        if isinstance(event, RestartDue):
            if self.phase is not JobPhase.WAITING:
                return []
            self.phase = JobPhase.RESOLVING
            return [ResolveSinks(self.latest_checkpoint, SinkEnd.RESTORE)]
        if isinstance(event, SinksResolved):
            return self._on_sinks_resolved()
        if isinstance(event, Deployed):
            if self.phase is not JobPhase.DEPLOYING:
                return []
            self.phase = JobPhase.RUNNING
            return [StopSources(self.attempt)] if self.stop_requested else []
        if isinstance(event, InputEnded):
            if self.phase is not JobPhase.RUNNING:
                return []
            self.phase = JobPhase.FINISHING
            return [TakeFinalCheckpoint(self.attempt) if self.checkpointing else CommitOutput(self.attempt)]
        if isinstance(event, FinalCheckpointCompleted | Committed):
            if self.phase is not JobPhase.FINISHING:
                return []
            if isinstance(event, FinalCheckpointCompleted):
                self.latest_checkpoint = event.checkpoint_id
            return self._end(Finish(JobEnd.FINISHED, latest_checkpoint=self.latest_checkpoint))
        return []

    def _on_stop(self) -> list[SupervisorAction]:
        already = self.stop_requested or self._ending is not None
        self.stop_requested = True
        # A running attempt stops now; one that deploys later stops as soon as it runs.
        return [StopSources(self.attempt)] if self.phase is JobPhase.RUNNING and not already else []

    def _on_cancel(self, event: CancelRequested) -> list[SupervisorAction]:
        if self._ending is not None:
            return []  # the job is already ending (failed, or cancelled before): that end stands
        self._ending = (Finish(JobEnd.FINISHED, reason="stopped with a savepoint") if event.after_savepoint
                        else Finish(JobEnd.CANCELLED, reason="cancelled"))
        if self.phase in (JobPhase.DEPLOYING, JobPhase.RUNNING, JobPhase.FINISHING):
            self.phase = JobPhase.FENCING
            return [FenceAttempt(self.attempt)]
        if self.phase is JobPhase.WAITING:
            return self._resolve_for_end()
        # FENCING, RESOLVING or ENDING: the step under way reports back, then the job ends.
        return []

    def _on_failed(self, event: Failed) -> list[SupervisorAction]:
        if self.phase in (JobPhase.FENCING, JobPhase.WAITING):
            return []  # one failure per attempt; the rest are its echoes
        if self.phase is JobPhase.ENDING:
            # Resolving the sinks for the end failed: what is left stays for a resume to resolve.
            assert self._ending is not None
            return self._end(self._ending)
        if self._ending is None:
            if not self.checkpointing or not event.retryable:
                suffix = "; nothing was committed" if not self.checkpointing else ""
                self._ending = Finish(JobEnd.FAILED, reason=event.reason + suffix, operator=event.operator)
            else:
                delay = self._restarts.on_failure()
                if delay is None:
                    self._ending = Finish(JobEnd.FAILED, reason=event.reason, operator=event.operator,
                                          gave_up=True)
                else:
                    self._delay_s = delay
        # Fence even when nothing was deployed yet (a failed resolution): it re-reads the restore point.
        self.phase = JobPhase.FENCING
        return [FenceAttempt(self.attempt)]

    def _on_fenced(self, event: Fenced) -> list[SupervisorAction]:
        if self.phase is not JobPhase.FENCING:
            return []
        self.latest_checkpoint = event.latest_checkpoint
        if self._ending is not None:
            return self._resolve_for_end()
        self.phase = JobPhase.WAITING
        self.attempt += 1
        return [ScheduleRestart(self.attempt, self._delay_s)]

    def _resolve_for_end(self) -> list[SupervisorAction]:
        assert self._ending is not None
        self.phase = JobPhase.ENDING
        end = SinkEnd.FAIL if self._ending.end is JobEnd.FAILED else SinkEnd.CANCEL
        return [ResolveSinks(self.latest_checkpoint, end)]

    def _on_sinks_resolved(self) -> list[SupervisorAction]:
        if self.phase is JobPhase.ENDING:
            assert self._ending is not None
            return self._end(self._ending)
        if self.phase is not JobPhase.RESOLVING:
            return []
        if self._ending is not None:  # cancelled while resolving for a restart
            return self._resolve_for_end()
        self.phase = JobPhase.DEPLOYING
        return [DeployAttempt(self.attempt, self.latest_checkpoint)]

    def _end(self, finish: Finish) -> list[SupervisorAction]:
        self.phase = {JobEnd.FINISHED: JobPhase.FINISHED, JobEnd.FAILED: JobPhase.FAILED,
                      JobEnd.CANCELLED: JobPhase.CANCELLED}[finish.end]
        done = dataclasses.replace(finish, latest_checkpoint=self.latest_checkpoint)
        self._ending = done
        return [done]
