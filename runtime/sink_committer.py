"""The two-phase-commit lifecycle of one sink subtask (no Ray, no asyncio).

A :class:`SinkCommitter` drives one subtask's
:class:`~onceflow.checkpoint.two_phase_commit.SinkWriter` and commits what it
pre-committed through the sink's
:class:`~onceflow.checkpoint.two_phase_commit.Committer`:

- **write**: rows go into the open transaction (:meth:`SinkCommitter.write`);
- **pre-commit on a barrier**: the writer flushes and prepares; its
  committables wait in :attr:`SinkCommitter.uncommitted` under the checkpoint's
  id, and the sink's snapshot (:meth:`SinkCommitter.pre_commit`) records all
  of them, so a restore can still commit them;
- **commit in order**: once checkpoint n completes,
  :meth:`SinkCommitter.commit_through` commits everything pre-committed for
  checkpoints up to n, oldest first (a notification for n also covers an
  earlier one whose notification was lost); what a failed commit leaves is
  retried by the next one, and the committer is idempotent;
- **without checkpoints**, the end of input pre-commits once
  (:meth:`SinkCommitter.end_of_input`) and the job commits
  (:meth:`SinkCommitter.commit_final`) after every subtask ended, or aborts
  (:meth:`SinkCommitter.abort`);
- **recovery** is one call for the whole sink operator, before a new
  attempt deploys (:func:`resolve_sink_operator`): commit what the restored
  checkpoint recorded, abort every other transaction of the operator.

Writes, commits and the abort run in worker threads (a write or a commit may
block on its external system): one lock keeps the writer from being aborted
under a write, another keeps the pre-committed transactions consistent
between a pre-commit and a commit in progress. The caller runs one commit at
a time.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from onceflow.checkpoint.state import sink_state

if TYPE_CHECKING:
    import pyarrow as pa

    from onceflow.checkpoint.two_phase_commit import Committable, Committer, SinkContext, TransactionalSink

__all__ = ["SinkCommitter", "resolve_sink_operator"]

log = logging.getLogger("onceflow")


class SinkCommitter:
    """Writes, pre-commits and commits one sink subtask's transactions (see the module docstring).

    Args:
        sink: the sink's configuration.
        ctx: where this writer runs (job, operator, subtask, run and attempt).

    Attributes:
        rows: rows written so far (by this attempt).
        uncommitted: checkpoint id -> the committables pre-committed on its
            barrier and not committed yet.
        final: the committables of the end of input (jobs without checkpoints).
        aborted: the writer was aborted; later writes are dropped.

    """

    def __init__(self, sink: TransactionalSink, ctx: SinkContext) -> None:
        self._sink = sink
        self._ctx = ctx
        self.writer = sink.create_writer(ctx)
        self.rows = 0
        self.uncommitted: dict[int, list[Committable]] = {}
        self.final: list[Committable] = []
        self.aborted = False
        self._writing = threading.Lock()
        """Guards :attr:`writer` between the thread that writes and the one that aborts."""
        self._pending = threading.Lock()
        """Guards :attr:`uncommitted` between the event loop (pre-commits) and the thread that commits."""

    def write(self, batch: pa.RecordBatch) -> None:
        """Add ``batch`` to the open transaction; dropped once the writer was aborted (it could never commit)."""
        with self._writing:
            if self.aborted:
                return
            self.writer.write(batch)
            self.rows += batch.num_rows

    def pre_commit(self, checkpoint_id: int) -> pa.Table:
        """Checkpoint ``checkpoint_id``'s barrier: prepare the open transaction; return the sink's state table."""
        self.writer.flush(end_of_input=False)
        committables = self.writer.prepare_commit(checkpoint_id)
        with self._pending:
            if committables:
                self.uncommitted[checkpoint_id] = committables
            return sink_state(self.uncommitted)

    def commit_through(self, checkpoint_id: int) -> int:
        """Checkpoint ``checkpoint_id`` completed: commit what was pre-committed up to it, oldest first.

        Returns:
            the number of committables committed.
        """
        with self._pending:
            ready = sorted(c_id for c_id in self.uncommitted if c_id <= checkpoint_id)
            committables = [c for c_id in ready for c in self.uncommitted[c_id]]
        if committables:
            self._committer().commit(committables)
        with self._pending:
            for c_id in ready:
                del self.uncommitted[c_id]
        return len(committables)

    def has_uncommitted(self, checkpoint_id: int) -> bool:
        """Whether anything pre-committed up to ``checkpoint_id`` waits for its commit."""
        with self._pending:
            return any(c_id <= checkpoint_id for c_id in self.uncommitted)

    def end_of_input(self) -> None:
        """Without checkpoints: flush and pre-commit once; the job commits after every subtask ended."""
        self.writer.flush(end_of_input=True)
        self.final = self.writer.prepare_commit()

    def commit_final(self) -> int:
        """Commit what :meth:`end_of_input` pre-committed; return the number of committables."""
        self._committer().commit(self.final)
        return len(self.final)

    def abort(self, wait_s: float, *, discard_final: bool) -> bool:
        """Abort the writer once the write in progress returns; later writes are dropped.

        A write blocked on its external system (a row lock that only a commit
        releases) is waited for at most ``wait_s``, then the writer is aborted
        under it. With ``discard_final`` (a job without checkpoints) the end of
        input's pre-committed transactions are aborted too; with checkpoints
        they are left for recovery, which commits those a completed checkpoint
        recorded.

        Returns:
            whether the writer was idle when it was aborted (``False``: a write
            still runs in its thread, so the writer may not count as gone).
        """
        self.aborted = True
        acquired = self._writing.acquire(timeout=wait_s)
        try:
            self.writer.abort()
        except Exception as error:  # noqa: BLE001 - what it leaves, recovery aborts (Committer.abort_lingering)
            log.debug("%s/%d: the writer's abort failed: %s", self._ctx.operator, self._ctx.subtask, error)
        finally:
            if acquired:
                self._writing.release()
        if discard_final:
            self._committer().abort(self.final)
        return acquired

    def _committer(self) -> Committer:
        return self._sink.create_committer(self._ctx)


def resolve_sink_operator(sink: TransactionalSink[Any], ctx: SinkContext, commit: list[Any], keep: list[Any]) -> None:
    """Recovery of one sink operator: commit ``commit``, then abort every other transaction except ``keep``.

    Runs once per sink operator (every subtask, run and attempt of it) with
    no writer of it alive: after the failed attempt was fenced, before the
    next one deploys. ``keep`` holds what the restored checkpoint recorded
    (``commit`` too, unless the job ends failed); both steps are idempotent.
    """
    committer = sink.create_committer(ctx)
    if commit:
        committer.commit(commit)
    committer.abort_lingering(keep)
