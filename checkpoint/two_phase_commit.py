"""The two-phase-commit sink contract (after Flink's Sink V2).

A sink subtask owns a :class:`SinkWriter`. It ``write``s batches into an open
transaction; ``prepare_commit`` makes everything written so far durable but
invisible and returns *committables* (small msgpack-able descriptions of the
pre-committed transactions); a :class:`Committer` later makes them visible.
``Committer.commit`` must be idempotent: recovery may commit the same
committable twice. ``abort`` discards what was never committed.

Without checkpointing, the runtime pre-commits at the end of input and commits
once every sink subtask has pre-committed, so a failed job publishes nothing.
With checkpointing it pre-commits on every barrier and commits when the
checkpoint is complete.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["Committable", "Committer", "SinkContext", "SinkWriter", "TransactionalSink"]

Committable = dict[str, Any]
"""A pre-committed transaction: a msgpack-able mapping with a ``"v"`` version key."""


@dataclass(frozen=True, slots=True)
class SinkContext:
    """Where a sink writer runs.

    Attributes:
        job: the job name.
        operator: the sink operator's name.
        subtask: this subtask's index.
        parallelism: the sink's parallelism.
        run: an id unique to this run of the job.
        attempt: the attempt of the run (1 for the first deployment, one more per restart).

    """

    job: str
    operator: str
    subtask: int = 0
    parallelism: int = 1
    run: str = ""
    attempt: int = 0


class SinkWriter(ABC):
    """Writes one sink subtask's rows into an open transaction."""

    @abstractmethod
    def write(self, batch: pa.RecordBatch) -> None:
        """Add ``batch`` to the open transaction."""

    def flush(self, end_of_input: bool) -> None:  # noqa: B027 - optional hook
        """Push buffered rows to the transaction; ``end_of_input`` at the end."""

    @abstractmethod
    def prepare_commit(self, checkpoint_id: int | None = None) -> list[Committable]:
        """Pre-commit the open transaction; return its committables.

        Args:
            checkpoint_id: the checkpoint whose barrier this is, or ``None`` at
                the end of a job without checkpoints (transactions may be named after it).
        """

    @abstractmethod
    def abort(self) -> None:
        """Discard everything written and not yet pre-committed."""


class Committer(ABC):
    """Makes pre-committed transactions visible; idempotent."""

    @abstractmethod
    def commit(self, committables: list[Committable]) -> None:
        """Publish ``committables``; publishing one twice is a no-op."""

    @abstractmethod
    def abort(self, committables: list[Committable]) -> None:
        """Discard pre-committed ``committables`` that will never be published."""

    def abort_lingering(self, keep: list[Committable]) -> None:  # noqa: B027 - optional hook
        """Discard every transaction of this job's sink operator except those ``keep`` names.

        The scope is the whole operator: every subtask, every run and every
        attempt of the job, pre-committed or still in progress. Names are
        matched by their job and operator fields exactly, so other jobs and
        other operators (even ones whose names share a prefix) are never
        touched. It runs with no writer of the operator alive (before a new
        attempt deploys, after the old one is confirmed dead), once per
        operator; ``keep`` holds the committables the restored checkpoint
        names (commit them before or after, in any order: neither step undoes
        the other). Idempotent.
        """

    def lingering(self) -> list[str]:
        """Name every transaction of this job's sink operator that is neither committed nor aborted.

        The scope is the one of :meth:`abort_lingering`; a sink that keeps
        nothing outside its committables returns ``[]``. Tests use it to check
        that a job left nothing pre-committed or in progress behind.
        """
        return []


class TransactionalSink(ABC):
    """A picklable sink config that builds a writer and a committer."""

    @abstractmethod
    def create_writer(self, ctx: SinkContext) -> SinkWriter:
        """Return the writer for ``ctx.subtask``."""

    @abstractmethod
    def create_committer(self, ctx: SinkContext) -> Committer:
        """Return a committer for this sink's committables."""

    def prepare(self) -> None:  # noqa: B027 - optional hook
        """Run once on the driver before any writer starts (create a table...)."""
