"""Arrow layouts of the non-keyed parts of a snapshot: source offsets and sink committables.

Keyed operators snapshot themselves (``OperatorLogic.snapshot``); a source's
position and a sink's pre-committed transactions are small values, kept here
as one-column msgpack tables so every snapshot file is Arrow. A committable is
stored as its :class:`~onceflow.checkpoint.two_phase_commit.CommittableRecord`
(``{"v": <version>, **fields}``) and read back as that record; the sink turns
it into its committable (``TransactionalSink.read_committable``).

Example:
    >>> table = source_state({"next_batch": 7}, max_event_time=41)
    >>> read_source_state(table)
    ({'next_batch': 7}, 41)
    >>> read_sink_state(sink_state({3: [{"v": 1, "id": "a"}]}))
    {3: [CommittableRecord(version=1, fields={'id': 'a'})]}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import msgpack
import pyarrow as pa

from onceflow.checkpoint.two_phase_commit import Committable, CommittableRecord

__all__ = ["read_sink_state", "read_source_state", "sink_state", "source_state"]

_SOURCE = pa.schema([("offset", pa.binary()), ("max_event_time", pa.int64())],
                    metadata={"onceflow.state": "source", "onceflow.version": "1"})
_SINK = pa.schema([("checkpoint_id", pa.int64()), ("committable", pa.binary())],
                  metadata={"onceflow.state": "sink", "onceflow.version": "1"})


def source_state(offset: Any, max_event_time: int | None) -> pa.Table:
    """Return a source subtask's position as a one-row table."""
    return pa.table([pa.array([msgpack.packb(offset)], pa.binary()), pa.array([max_event_time], pa.int64())],
                    schema=_SOURCE)


def read_source_state(table: pa.Table) -> tuple[Any, int | None]:
    """Return ``(offset, max_event_time)`` from :func:`source_state`'s table."""
    row = table.to_pylist()[0]
    return msgpack.unpackb(row["offset"]), row["max_event_time"]


def _stored(committable: Committable | Mapping[str, Any]) -> dict[str, Any]:
    """The stored map of a committable: a typed one's record, or a mapping committable as it is."""
    if isinstance(committable, Committable):
        return committable.to_record().to_dict()
    return dict(committable)


def sink_state(uncommitted: Mapping[int, Sequence[Any]]) -> pa.Table:
    """Return a sink subtask's pre-committed, not yet committed transactions.

    Args:
        uncommitted: per checkpoint id, the committables its barrier pre-committed
            (:class:`~onceflow.checkpoint.two_phase_commit.Committable` objects, or
            msgpack-able mappings with a ``"v"`` key).

    """
    ids = [checkpoint_id for checkpoint_id, items in uncommitted.items() for _ in items]
    blobs = [msgpack.packb(_stored(item)) for items in uncommitted.values() for item in items]
    return pa.table([pa.array(ids, pa.int64()), pa.array(blobs, pa.binary())], schema=_SINK)


def read_sink_state(table: pa.Table) -> dict[int, list[CommittableRecord]]:
    """Return the committable records of :func:`sink_state`'s table, by checkpoint id.

    Raises:
        CheckpointError: a stored committable has no version.

    """
    result: dict[int, list[CommittableRecord]] = {}
    for row in table.to_pylist():
        record = CommittableRecord.from_dict(msgpack.unpackb(row["committable"]))
        result.setdefault(row["checkpoint_id"], []).append(record)
    return result
