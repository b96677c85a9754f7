"""When a loop is empty (sans-IO): Mattern's four-counter method over the loop's subtasks.

A bounded job with a loop (``stream.iterate()`` / ``close_with``) ends when
every input of the loop has ended and the loop is empty: no row in a channel,
buffer or operator of the loop, so none can come round again. No subtask
sees that alone, so the job's driver watches: it asks every subtask of the
loop for its :class:`LoopStatus`, round after round, and feeds each complete
round to :class:`LoopTermination`. Once it answers ``True`` the driver tells
the loop heads to end their output; the end then travels round the loop like
any end of input, and the loop's subtasks finish.

The rule (Mattern's four-counter method, 1987): two consecutive rounds in
which every subtask reports its inputs from outside the loop ended, nothing
held in its input gate or buffered for the loop, and the same counts of
messages sent into the loop and processed from it, with the sums equal. A
subtask answers under its processing lock, so never halfway through a
message. Why that suffices: counts only grow, so equal counts in both rounds
mean that no subtask sent or processed a loop message between its two
answers; every moment after the first round ended and before the second
began lies inside all those intervals, and at such a moment every message
sent into the loop was processed and nothing was buffered, so the loop was
empty. An empty loop with its inputs ended stays empty: a subtask of the
loop sends only when it processes input.

Example:
    >>> detector = LoopTermination()
    >>> quiet = [LoopStatus("loop/0", sent=4, processed=4, idle=True, inputs_ended=True)]
    >>> detector.observe(quiet), detector.observe(quiet)
    (False, True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["LoopStatus", "LoopTermination"]


@dataclass(frozen=True, slots=True)
class LoopStatus:
    """What one subtask of a loop reports, read under its processing lock.

    Attributes:
        task: the subtask (``<operator>/<index>``).
        sent: messages it sent on channels to subtasks of the loop (this attempt)
            with rows, watermarks or the end; a barrier alone carries nothing that
            could come round, and counting them would let checkpoints keep a loop going.
        processed: such messages from subtasks of the loop it processed (this attempt).
        idle: nothing waits in its input gate (held, early, or replayed
            channel state) and nothing is buffered on its channels into the loop.
        inputs_ended: every input channel from outside the loop delivered its end.
    """

    task: str
    sent: int
    processed: int
    idle: bool
    inputs_ended: bool


class LoopTermination:
    """Decides from rounds of :class:`LoopStatus` when a loop is empty for good (see the module docstring)."""

    __slots__ = ("_previous",)

    def __init__(self) -> None:
        self._previous: dict[str, tuple[int, int]] | None = None

    def observe(self, statuses: Sequence[LoopStatus]) -> bool:
        """Take one complete round (every subtask of the loop, asked after the previous round ended).

        Returns:
            ``True`` once this round and the one before show the loop empty with the same counts.
        """
        quiet = all(s.idle and s.inputs_ended for s in statuses) and (
            sum(s.sent for s in statuses) == sum(s.processed for s in statuses))
        counts = {s.task: (s.sent, s.processed) for s in statuses} if quiet else None
        ended = counts is not None and counts == self._previous
        self._previous = counts
        return ended

    def reset(self) -> None:
        """Forget the previous round (a round that could not be completed, a new attempt)."""
        self._previous = None
