"""The two-phase-commit sink contract (after Flink's Sink V2).

A sink subtask owns a :class:`SinkWriter`. It ``write``s batches into an open
transaction; ``prepare_commit`` makes everything written so far durable but
invisible and returns *committables* (descriptions of the pre-committed
transactions); a :class:`Committer` later makes them visible.
``Committer.commit`` must be idempotent: recovery may commit the same
committable twice. ``abort`` discards what was never committed.

A committable is a frozen dataclass of its sink, a subclass of
:class:`Committable`. A checkpoint stores it as a :class:`CommittableRecord`:
the version its class writes and its fields, one msgpack map
``{"v": <version>, <field>: <value>, ...}``. Reading it back goes through the
sink (:meth:`TransactionalSink.read_committable`), whose committable class
reads every version it ever wrote, as Flink's ``SimpleVersionedSerializer``
does, so a checkpoint taken by an older onceflow stays restorable. A sink
whose committables are plain msgpack-able mappings with a ``"v"`` key is
stored as it is and gets its mappings back.

Without checkpointing, the runtime pre-commits at the end of input and commits
once every sink subtask has pre-committed, so a failed job publishes nothing.
With checkpointing it pre-commits on every barrier and commits when the
checkpoint is complete.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Self, TypeVar, cast

from onceflow.errors import CheckpointError, SinkCommitError

if TYPE_CHECKING:
    import pyarrow as pa

    from onceflow.checkpoint.config import CheckpointConfig
    from onceflow.runtime.restart import RestartStrategy

__all__ = [
    "Committable",
    "CommittableRecord",
    "Committer",
    "SinkContext",
    "SinkWriter",
    "TransactionalSink",
    "unsupported_version",
]


@dataclass(frozen=True, slots=True)
class CommittableRecord:
    """A committable as a checkpoint stores it: the version it was written in and its fields.

    Attributes:
        version: the version of the fields' layout (the ``"v"`` key of the stored map).
        fields: the msgpack-able fields, without the version.

    Example:
        >>> record = CommittableRecord.from_dict({"v": 1, "id": "a"})
        >>> record
        CommittableRecord(version=1, fields={'id': 'a'})
        >>> record.to_dict()
        {'v': 1, 'id': 'a'}

    """

    version: int
    fields: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The stored form: ``{"v": version, **fields}``."""
        return {"v": self.version, **self.fields}

    @classmethod
    def from_dict(cls, stored: Mapping[str, Any]) -> CommittableRecord:
        """Read the stored form of :meth:`to_dict`.

        Raises:
            CheckpointError: ``stored`` has no integer ``"v"`` key.

        """
        version = stored.get("v")
        if isinstance(version, bool) or not isinstance(version, int):
            msg = (
                f"a sink committable in the checkpoint has no version (its keys: {sorted(stored)}); "
                "the checkpoint was not written by onceflow: start the job without resume=True"
            )
            raise CheckpointError(msg, reason="unreadable")
        return cls(version, {key: value for key, value in stored.items() if key != "v"})


class Committable(ABC):
    """A pre-committed transaction of one sink: subclass it as a frozen dataclass.

    A subclass sets :attr:`VERSION` (the layout it writes), returns its
    msgpack-able fields from :meth:`fields` and reads every layout it ever
    wrote in :meth:`from_record`; raise :func:`unsupported_version` for any
    other. Change a layout by adding a version: never change what an old
    version means, checkpoints taken with it may still be restored.
    """

    __slots__ = ()

    VERSION: ClassVar[int]
    """The version of the layout :meth:`fields` returns."""

    @abstractmethod
    def fields(self) -> dict[str, Any]:
        """The msgpack-able fields of this committable, in the layout of :attr:`VERSION`."""

    @classmethod
    @abstractmethod
    def from_record(cls, record: CommittableRecord, *, operator: str = "") -> Self:
        """Read ``record``, written by this class in any of its versions.

        Args:
            record: the stored record.
            operator: the sink operator, for error messages.

        Raises:
            SinkCommitError: ``record.version`` is not one this class reads.

        """

    def to_record(self) -> CommittableRecord:
        """Return the record a checkpoint stores for this committable."""
        return CommittableRecord(self.VERSION, self.fields())


def unsupported_version(
    record: CommittableRecord, readable: tuple[int, ...], *, sink: str, operator: str = ""
) -> SinkCommitError:
    """The error for a committable whose version this onceflow cannot read.

    Args:
        record: the record read.
        readable: the versions the sink reads.
        sink: the kind of sink (``"parquet sink"``).
        operator: the sink operator, where known.

    Example:
        >>> str(unsupported_version(CommittableRecord(9), (1,), sink="parquet sink", operator="sink_1"))
        'parquet sink sink_1: committable version 9 is not supported (this onceflow reads versions 1); ...'

    """
    where = f"{sink} {operator}" if operator else sink
    msg = (
        f"{where}: committable version {record.version!r} is not supported (this onceflow reads versions "
        f"{', '.join(str(v) for v in readable)}); resolve the checkpoint with the onceflow version that wrote it"
    )
    return SinkCommitError(msg)


C = TypeVar("C")
"""The committable type of a sink: a :class:`Committable` subclass (or a union of them)."""


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


class SinkWriter(ABC, Generic[C]):
    """Writes one sink subtask's rows into an open transaction."""

    @abstractmethod
    def write(self, batch: pa.RecordBatch) -> None:
        """Add ``batch`` to the open transaction."""

    def flush(self, end_of_input: bool) -> None:
        """Push buffered rows to the transaction; ``end_of_input`` at the end."""

    @abstractmethod
    def prepare_commit(self, checkpoint_id: int | None = None) -> list[C]:
        """Pre-commit the open transaction; return its committables.

        Args:
            checkpoint_id: the checkpoint whose barrier this is, or ``None`` at
                the end of a job without checkpoints (transactions may be named after it).
        """

    @abstractmethod
    def abort(self) -> None:
        """Discard everything written and not yet pre-committed."""

    def close(self) -> None:
        """Let go of the writer's resources after :meth:`abort`, ending no pre-committed transaction.

        Called when the subtask's attempt is fenced and its actor is reset in
        place for the next attempt (a killed process lets go of everything by
        dying). What stays pre-committed is recovery's to commit or abort, from
        any process.
        """


class Committer(ABC, Generic[C]):
    """Makes pre-committed transactions visible; idempotent."""

    @abstractmethod
    def commit(self, committables: list[C]) -> None:
        """Publish ``committables``; publishing one twice is a no-op."""

    @abstractmethod
    def abort(self, committables: list[C]) -> None:
        """Discard pre-committed ``committables`` that will never be published."""

    def abort_lingering(self, keep: list[C]) -> None:
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


class TransactionalSink(ABC, Generic[C]):
    """A picklable sink config that builds a writer and a committer."""

    @abstractmethod
    def create_writer(self, ctx: SinkContext) -> SinkWriter[C]:
        """Return the writer for ``ctx.subtask``."""

    @abstractmethod
    def create_committer(self, ctx: SinkContext) -> Committer[C]:
        """Return a committer for this sink's committables."""

    def read_committable(self, record: CommittableRecord, *, operator: str = "") -> C:
        """Read a committable of this sink back from a checkpoint, whichever version wrote it.

        A sink with typed committables returns ``TheCommittable.from_record(record)``;
        this default returns the stored mapping, for sinks whose committables are mappings.

        Args:
            record: the stored record.
            operator: the sink operator, for error messages.

        Raises:
            SinkCommitError: the record's version is not one this sink reads.

        """
        return cast(C, record.to_dict())

    def check_job(self, checkpoint: CheckpointConfig | None, restart: RestartStrategy) -> None:
        """Check that this sink can keep its guarantee under the job's checkpoint and restart settings.

        ``submit`` calls it on the driver for every sink, before :meth:`prepare`
        and before any actor starts, so a setting the sink cannot work with
        fails the submit instead of a running job. The default accepts every job.

        Args:
            checkpoint: the job's checkpointing, or ``None`` when it takes no checkpoints.
            restart: the job's restart strategy.

        Raises:
            PlanError: the sink cannot run under these settings; the message says what to change.

        """

    def prepare(self) -> None:
        """Run once on the driver before any writer starts (create a table...)."""
