"""The checkpoint coordinator's state machine (sans-IO, after Flink's).

:class:`CheckpointCoordinator` decides when to trigger a checkpoint, collects
acknowledgements into a :class:`PendingCheckpoint`, and turns a fully
acknowledged one into a :class:`CompletedCheckpoint`, which is complete only
once its manifest is durable (``on_persisted``). It never does I/O: every
event returns actions (trigger, persist, notify, discard, abort, fail) that
the coordinator actor carries out. Time comes from an injected clock, so tests
drive it.

Example:
    >>> from onceflow.checkpoint.config import CheckpointConfig
    >>> now = [0.0]
    >>> coordinator = CheckpointCoordinator(CheckpointConfig(interval_s=1.0), ["a", "b"], clock=lambda: now[0])
    >>> coordinator.poll()
    [TriggerCheckpoint(checkpoint_id=1, timestamp=0.0)]
    >>> coordinator.on_ack(1, TaskAck("a"))[0], coordinator.on_ack(1, TaskAck("a"))[0]
    (<AckResult.SUCCESS: 'success'>, <AckResult.DUPLICATE: 'duplicate'>)
    >>> [type(a).__name__ for a in coordinator.on_ack(1, TaskAck("b"))[1]]
    ['PersistCheckpoint']
    >>> coordinator.on_persisted(1)
    [NotifyCheckpointComplete(checkpoint_id=1)]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from onceflow.checkpoint.config import CheckpointConfig
from onceflow.checkpoint.failure_tolerance import CheckpointFailureReason, CheckpointFailureTolerance

__all__ = [
    "AbortCheckpoint",
    "AckResult",
    "CheckpointAction",
    "CheckpointCoordinator",
    "CheckpointFailureReason",
    "CompletedCheckpoint",
    "CompletedCheckpointStore",
    "DiscardCheckpoint",
    "FailJob",
    "NotifyCheckpointComplete",
    "PendingCheckpoint",
    "PersistCheckpoint",
    "TaskAck",
    "TriggerCheckpoint",
]


class AckResult(Enum):
    """What an acknowledgement did to its pending checkpoint."""

    SUCCESS = "success"
    DUPLICATE = "duplicate"
    UNKNOWN = "unknown"
    DISCARDED = "discarded"


@dataclass(frozen=True, slots=True)
class TaskAck:
    """One subtask's acknowledgement of a checkpoint.

    Attributes:
        task: the subtask (``<vertex>/<subtask>``).
        states: per operator, the durable state handle (JSON-able: path, bytes, rows).
        cache: per operator, an in-memory copy (a Ray object reference); not persisted.
        metrics: sync/async durations, alignment time, start delay, bytes.
        attempt: the job attempt the subtask belongs to (acknowledgements of a
            fenced attempt are ignored).
    """

    task: str
    states: dict[str, dict[str, Any]] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    attempt: int = 0


@dataclass(frozen=True, slots=True)
class CompletedCheckpoint:
    """A checkpoint every subtask acknowledged (complete once persisted)."""

    checkpoint_id: int
    trigger_time: float
    completion_time: float
    acks: dict[str, TaskAck]

    @property
    def duration_s(self) -> float:
        """End-to-end duration: trigger to last acknowledgement."""
        return self.completion_time - self.trigger_time

    @property
    def state_bytes(self) -> int:
        """Total size of the durable state."""
        return sum(int(s.get("bytes", 0)) for a in self.acks.values() for s in a.states.values())


class PendingCheckpoint:
    """A triggered checkpoint collecting acknowledgements."""

    def __init__(self, checkpoint_id: int, trigger_time: float, tasks: Iterable[str]) -> None:
        self.checkpoint_id = checkpoint_id
        self.trigger_time = trigger_time
        self.not_yet_acknowledged = set(tasks)
        self.acks: dict[str, TaskAck] = {}
        self.discarded: CheckpointFailureReason | None = None
        self.completed: CompletedCheckpoint | None = None

    @property
    def persisting(self) -> bool:
        """Whether every subtask acknowledged and the manifest is being written."""
        return self.completed is not None

    @property
    def is_fully_acknowledged(self) -> bool:
        """Whether every subtask acknowledged."""
        return not self.not_yet_acknowledged and self.discarded is None

    def acknowledge(self, ack: TaskAck) -> AckResult:
        """Record ``ack``."""
        if self.discarded is not None:
            return AckResult.DISCARDED
        if ack.task in self.acks:
            return AckResult.DUPLICATE
        if ack.task not in self.not_yet_acknowledged:
            return AckResult.UNKNOWN
        self.not_yet_acknowledged.remove(ack.task)
        self.acks[ack.task] = ack
        return AckResult.SUCCESS

    def discard(self, reason: CheckpointFailureReason) -> None:
        """Abandon the checkpoint."""
        self.discarded = reason

    def finalize(self, completion_time: float) -> CompletedCheckpoint:
        """Turn a fully acknowledged checkpoint into a completed one."""
        if not self.is_fully_acknowledged:
            msg = f"checkpoint {self.checkpoint_id} is not fully acknowledged"
            raise RuntimeError(msg)
        return CompletedCheckpoint(self.checkpoint_id, self.trigger_time, completion_time, dict(self.acks))


class CompletedCheckpointStore:
    """Keeps the newest ``retain`` completed checkpoints."""

    def __init__(self, retain: int) -> None:
        self.retain = retain
        self._checkpoints: list[CompletedCheckpoint] = []

    def add(self, checkpoint: CompletedCheckpoint) -> list[CompletedCheckpoint]:
        """Add ``checkpoint``; return the ones it pushed out (to discard)."""
        if self._checkpoints and checkpoint.checkpoint_id <= self._checkpoints[-1].checkpoint_id:
            msg = f"checkpoint {checkpoint.checkpoint_id} is not newer than {self._checkpoints[-1].checkpoint_id}"
            raise ValueError(msg)
        self._checkpoints.append(checkpoint)
        dropped = self._checkpoints[: -self.retain]
        self._checkpoints = self._checkpoints[-self.retain :]
        return dropped

    @property
    def latest(self) -> CompletedCheckpoint | None:
        """The newest completed checkpoint."""
        return self._checkpoints[-1] if self._checkpoints else None

    def all(self) -> list[CompletedCheckpoint]:
        """The retained checkpoints, oldest first."""
        return list(self._checkpoints)


@dataclass(frozen=True, slots=True)
class TriggerCheckpoint:
    """Tell every source subtask to inject barrier ``checkpoint_id``."""

    checkpoint_id: int
    timestamp: float


@dataclass(frozen=True, slots=True)
class PersistCheckpoint:
    """Write the checkpoint's manifest durably, then call ``on_persisted``."""

    checkpoint: CompletedCheckpoint


@dataclass(frozen=True, slots=True)
class NotifyCheckpointComplete:
    """Tell every subtask (sinks commit) that ``checkpoint_id`` is complete."""

    checkpoint_id: int


@dataclass(frozen=True, slots=True)
class AbortCheckpoint:
    """Tell every subtask to stop working on ``checkpoint_id``."""

    checkpoint_id: int
    reason: CheckpointFailureReason


@dataclass(frozen=True, slots=True)
class DiscardCheckpoint:
    """Delete a checkpoint's durable files (subsumed by newer ones)."""

    checkpoint_id: int


@dataclass(frozen=True, slots=True)
class FailJob:
    """Too many checkpoints failed in a row: fail the job (``reason`` says why)."""

    reason: str


CheckpointAction = (
    TriggerCheckpoint | PersistCheckpoint | NotifyCheckpointComplete | AbortCheckpoint | DiscardCheckpoint | FailJob
)


class CheckpointCoordinator:
    """Triggers checkpoints and collects acknowledgements.

    Args:
        config: interval, timeout, minimum pause, concurrency, retention, tolerance.
        tasks: the subtasks that must acknowledge every checkpoint.
        clock: returns seconds.
        next_id: the id of the next checkpoint (one more than the newest on record).

    Attributes:
        failures: counts failed checkpoints and decides when the job must
            fail (which failure reasons count is documented there).
    """

    def __init__(
        self, config: CheckpointConfig, tasks: Iterable[str], clock: Callable[[], float], next_id: int = 1
    ) -> None:
        self.config = config
        self.tasks = frozenset(tasks)
        self._clock = clock
        self.next_id = next_id
        self.pending: dict[int, PendingCheckpoint] = {}
        self.store = CompletedCheckpointStore(config.retain)
        self.failures = CheckpointFailureTolerance(config.tolerable_failures)
        self.paused = False
        self.completed_count = 0
        self._last_trigger: float | None = None
        self._last_completion: float | None = None

    @property
    def consecutive_failures(self) -> int:
        """Failed checkpoints since the last completed one (or the last resume)."""
        return self.failures.consecutive_failures

    @property
    def failed_count(self) -> int:
        """Every failed checkpoint so far."""
        return self.failures.failed_count

    # -- triggering -------------------------------------------------------------------

    def _due(self, now: float) -> bool:
        if self.paused or len(self.pending) >= self.config.max_concurrent:
            return False
        if self._last_trigger is not None and now - self._last_trigger < self.config.interval_s:
            return False
        return self._last_completion is None or now - self._last_completion >= self.config.min_pause_s

    def poll(self) -> list[CheckpointAction]:
        """Expire timed-out checkpoints and trigger one if it is due."""
        now = self._clock()
        actions: list[CheckpointAction] = []
        for pending in list(self.pending.values()):
            if not pending.persisting and now - pending.trigger_time >= self.config.timeout_s:
                actions += self._abort(pending, CheckpointFailureReason.EXPIRED)
        if self._due(now):
            actions.append(self._trigger(now))
        return actions

    def trigger_now(self) -> list[CheckpointAction]:
        """Trigger a checkpoint regardless of the interval (a final checkpoint or a savepoint).

        Returns no action while paused or when ``max_concurrent`` are pending.
        """
        if self.paused or len(self.pending) >= self.config.max_concurrent:
            return []
        return [self._trigger(self._clock())]

    def _trigger(self, now: float) -> TriggerCheckpoint:
        checkpoint_id = self.next_id
        self.next_id += 1
        self._last_trigger = now
        self.pending[checkpoint_id] = PendingCheckpoint(checkpoint_id, now, self.tasks)
        return TriggerCheckpoint(checkpoint_id, now)

    # -- acknowledgements -------------------------------------------------------------

    def on_ack(self, checkpoint_id: int, ack: TaskAck) -> tuple[AckResult, list[CheckpointAction]]:
        """A subtask acknowledged; return the result and, when complete, the persist action."""
        pending = self.pending.get(checkpoint_id)
        if pending is None:
            return AckResult.UNKNOWN, []
        result = pending.acknowledge(ack)
        if result is AckResult.SUCCESS and pending.is_fully_acknowledged:
            pending.completed = pending.finalize(self._clock())
            return result, [PersistCheckpoint(pending.completed)]
        return result, []

    def on_decline(self, checkpoint_id: int, task: str) -> list[CheckpointAction]:
        """A subtask could not snapshot: abort the checkpoint."""
        pending = self.pending.get(checkpoint_id)
        if pending is None or task not in self.tasks:
            return []
        return self._abort(pending, CheckpointFailureReason.DECLINED)

    def on_persisted(self, checkpoint_id: int) -> list[CheckpointAction]:
        """The manifest is durable: the checkpoint is complete."""
        pending = self.pending.get(checkpoint_id)
        if pending is None or pending.completed is None:
            return []
        del self.pending[checkpoint_id]
        completed = pending.completed
        now = self._clock()
        self._last_completion = now
        self.failures.on_success(checkpoint_id)
        self.completed_count += 1
        actions: list[CheckpointAction] = [NotifyCheckpointComplete(checkpoint_id)]
        for older in sorted(i for i in self.pending if i < checkpoint_id):
            actions += self._abort(self.pending[older], CheckpointFailureReason.SUBSUMED)
        latest = self.store.latest
        if latest is None or latest.checkpoint_id < checkpoint_id:
            actions += [DiscardCheckpoint(c.checkpoint_id) for c in self.store.add(completed)]
        return actions

    def on_persist_failed(self, checkpoint_id: int) -> list[CheckpointAction]:
        """Writing the manifest failed: the checkpoint did not complete."""
        pending = self.pending.get(checkpoint_id)
        if pending is None:
            return []
        return self._abort(pending, CheckpointFailureReason.PERSIST_FAILED)

    def _abort(self, pending: PendingCheckpoint, reason: CheckpointFailureReason) -> list[CheckpointAction]:
        """Abort and discard ``pending``; fail the job when the failure tolerance says so."""
        pending.discard(reason)
        self.pending.pop(pending.checkpoint_id, None)
        actions: list[CheckpointAction] = [
            AbortCheckpoint(pending.checkpoint_id, reason),
            DiscardCheckpoint(pending.checkpoint_id),
        ]
        exceeded = self.failures.on_failure(pending.checkpoint_id, reason)
        if exceeded is not None:
            actions.append(FailJob(exceeded.message))
        return actions

    # -- job failures -----------------------------------------------------------------

    def on_job_failure(self) -> list[CheckpointAction]:
        """The job is restarting: abort every pending checkpoint and stop triggering."""
        self.paused = True
        actions: list[CheckpointAction] = []
        for pending in sorted(self.pending.values(), key=lambda p: p.checkpoint_id):
            if pending.persisting:
                continue  # its manifest may be on its way; on_persisted decides
            actions += self._abort(pending, CheckpointFailureReason.TASK_FAILURE)
        return actions

    def resume(self) -> None:
        """Start triggering again (after the job restored), with a clean failure count.

        The restored attempt starts from a completed checkpoint: the failures
        of the attempt before it are not held against it.
        """
        self.paused = False
        self.failures.reset()
        self._last_trigger = self._clock()
