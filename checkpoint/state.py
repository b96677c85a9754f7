"""Arrow layouts of the non-keyed parts of a snapshot: source offsets and sink committables.

Keyed operators snapshot themselves (``OperatorLogic.snapshot``); a source's
position and a sink's pre-committed transactions are small values, kept here
as one-column msgpack tables so every snapshot file is Arrow.

Example:
    >>> table = source_state({"next_batch": 7}, max_event_time=41)
    >>> read_source_state(table)
    ({'next_batch': 7}, 41)
    >>> read_sink_state(sink_state({3: [{"v": 1, "id": "a"}]}))
    {3: [{'v': 1, 'id': 'a'}]}
"""

from __future__ import annotations

from typing import Any

import msgpack
import pyarrow as pa

from onceflow.checkpoint.two_phase_commit import Committable

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


def sink_state(uncommitted: dict[int, list[Committable]]) -> pa.Table:
    """Return a sink subtask's pre-committed, not yet committed transactions."""
    ids = [checkpoint_id for checkpoint_id, items in uncommitted.items() for _ in items]
    blobs = [msgpack.packb(item) for items in uncommitted.values() for item in items]
    return pa.table([pa.array(ids, pa.int64()), pa.array(blobs, pa.binary())], schema=_SINK)


def read_sink_state(table: pa.Table) -> dict[int, list[Committable]]:
    """Return the committables of :func:`sink_state`'s table, by checkpoint id."""
    result: dict[int, list[Committable]] = {}
    for row in table.to_pylist():
        result.setdefault(row["checkpoint_id"], []).append(msgpack.unpackb(row["committable"]))
    return result
