"""How many failed checkpoints a job tolerates (sans-IO, after Flink's ``CheckpointFailureManager``).

:class:`CheckpointFailureTolerance` is told of every checkpoint that did not
complete, with its :class:`CheckpointFailureReason`, and of every one that
did; it answers, for each failure, whether the job must now fail, as a
:class:`ToleranceExceeded` that carries the message. The
:class:`~onceflow.checkpoint.coordinator.CheckpointCoordinator` turns that
answer into its ``FailJob`` action.

Example:
    >>> tolerance = CheckpointFailureTolerance(tolerable_failures=1)
    >>> tolerance.on_failure(1, CheckpointFailureReason.EXPIRED) is None  # the one tolerated
    True
    >>> tolerance.on_failure(2, CheckpointFailureReason.SUBSUMED) is None  # not a checkpoint failure
    True
    >>> exceeded = tolerance.on_failure(3, CheckpointFailureReason.DECLINED)
    >>> exceeded.consecutive_failures, exceeded.message[:65]
    (2, 'checkpoint 3 failed (declined); 2 consecutive checkpoint failures')
    >>> tolerance.on_success(4)
    >>> tolerance.consecutive_failures, tolerance.failed_count
    (0, 2)

"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

__all__ = ["COUNTED_REASONS", "CheckpointFailureReason", "CheckpointFailureTolerance", "ToleranceExceeded"]


class CheckpointFailureReason(Enum):
    """Why a checkpoint did not complete."""

    EXPIRED = "expired"
    DECLINED = "declined"
    SUBSUMED = "subsumed"
    TASK_FAILURE = "task failure"
    PERSIST_FAILED = "manifest not written"


COUNTED_REASONS = frozenset(
    {CheckpointFailureReason.EXPIRED, CheckpointFailureReason.DECLINED, CheckpointFailureReason.PERSIST_FAILED}
)
"""The reasons that count as a failed checkpoint (see :class:`CheckpointFailureTolerance`)."""


@dataclass(frozen=True, slots=True)
class ToleranceExceeded:
    """More checkpoints failed in a row than tolerated: the job must fail.

    Attributes:
        checkpoint_id: the checkpoint whose failure went beyond the tolerance.
        reason: why it failed.
        consecutive_failures: the failures in a row, this one included.
        tolerable_failures: how many in a row the job tolerates.
    """

    checkpoint_id: int
    reason: CheckpointFailureReason
    consecutive_failures: int
    tolerable_failures: int

    @property
    def message(self) -> str:
        """Why the job fails, naming the setting that tolerates more."""
        return (
            f"checkpoint {self.checkpoint_id} failed ({self.reason.value}); "
            f"{self.consecutive_failures} consecutive checkpoint failures exceed the "
            f"{self.tolerable_failures} tolerated (CheckpointConfig.tolerable_failures)"
        )


class CheckpointFailureTolerance:
    """Counts failed checkpoints and decides when there were too many in a row.

    Which reasons count (:data:`COUNTED_REASONS`): a checkpoint that
    *expired* (not acknowledged within the timeout), that a subtask
    *declined* (could not snapshot), or whose manifest could not be written
    (*persist failed*) is a failed checkpoint: each says that checkpointing
    itself is not working. A checkpoint *subsumed* by a newer completed one
    did not fail (its successor covers it), and one aborted by a *task
    failure* is the restart's business, which the restart strategy counts
    already; neither counts.

    The job fails when the failures in a row exceed ``tolerable_failures``
    (``0``: the first failed checkpoint fails the job). A completed
    checkpoint resets the run of failures, and so does :meth:`reset` (a job
    that restarted from a completed checkpoint starts clean).
    ``failed_count`` keeps every counted failure for the metrics.

    Args:
        tolerable_failures: failed checkpoints in a row that the job survives.
    """

    def __init__(self, tolerable_failures: int) -> None:
        self.tolerable_failures = tolerable_failures
        self._consecutive = 0
        self._failed = 0

    @staticmethod
    def counts(reason: CheckpointFailureReason) -> bool:
        """Whether a checkpoint that ended for ``reason`` counts as failed."""
        return reason in COUNTED_REASONS

    @property
    def consecutive_failures(self) -> int:
        """Counted failures since the last completed checkpoint (or reset)."""
        return self._consecutive

    @property
    def failed_count(self) -> int:
        """Every counted failure so far."""
        return self._failed

    def on_failure(self, checkpoint_id: int, reason: CheckpointFailureReason) -> ToleranceExceeded | None:
        """A checkpoint did not complete; return why the job must fail, or ``None`` when it need not.

        Args:
            checkpoint_id: the checkpoint that did not complete.
            reason: why not; reasons outside :data:`COUNTED_REASONS` change nothing.
        """
        if not self.counts(reason):
            return None
        self._failed += 1
        self._consecutive += 1
        if self._consecutive <= self.tolerable_failures:
            return None
        return ToleranceExceeded(checkpoint_id, reason, self._consecutive, self.tolerable_failures)

    def on_success(self, checkpoint_id: int) -> None:
        """Checkpoint ``checkpoint_id`` completed: the run of failures is over."""
        self._consecutive = 0

    def reset(self) -> None:
        """Start a clean run of failures (the job restored from a completed checkpoint)."""
        self._consecutive = 0
