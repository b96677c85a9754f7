"""What a subtask is deployed with: data-plane options, checkpoint set-up, attempt, restored state.

These records travel from the job's driver to the subtask actors it creates;
:func:`load_restored` reads the restored state on the subtask's side (from
the object store copy, or from durable storage when that copy is gone).
"""

from __future__ import annotations

import collections
import contextlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import ray

from onceflow.checkpoint.state import read_source_state
from onceflow.checkpoint.storage import StateHandle, matches, state_handles
from onceflow.errors import PlanError
from onceflow.operators.keygroups import hash_columns, in_key_groups, key_group_range
from onceflow.operators.sources.base import RescaledOffsets
from onceflow.runtime.channel import ChannelMessage, read_channel_state
from onceflow.runtime.plan import Routing

if TYPE_CHECKING:
    from ray.actor import ActorHandle

    from onceflow.checkpoint.storage import CheckpointStorage
    from onceflow.runtime.plan import PhysicalPlan, VertexSpec

__all__ = ["AttemptId", "CheckpointSetup", "RestoredState", "RuntimeOptions", "SubtaskRestore", "load_restored",
           "replayed_channel_state", "restored_position"]

log = logging.getLogger("onceflow")


@dataclass(frozen=True, slots=True)
class RuntimeOptions:
    """Data-plane settings shared by every subtask of a job.

    Attributes:
        batch_bytes: a channel sends once it buffers this many bytes (4 MiB
            measured best on the feature-window benchmark: far above Ray's
            100 KiB inline-argument cliff, where transport per row is cheapest).
        linger_s: a channel sends buffered rows at the latest after this long.
        log_level: the level of the ``onceflow`` logger in the actors (the
            driver's, when the job starts).
        credits: unacknowledged messages per channel (bounds memory in flight).
            Two keep the pipeline full on the feature-window benchmark and halve
            the data a barrier queues behind (checkpoint p99 0.8 s -> 0.6 s)
            compared with four.
    """

    batch_bytes: int = 4 << 20
    linger_s: float = 0.05
    credits: int = 2
    log_level: int = logging.WARNING


@dataclass(frozen=True, slots=True)
class CheckpointSetup:
    """How a subtask takes part in checkpoints.

    Attributes:
        coordinator: the ``<job>/coordinator`` actor (owns the cached snapshots).
        storage: the durable storage URI of ``CheckpointConfig.storage``.
        cache: also put every snapshot table in the object store, owned by the
            coordinator, so a restore reads it from memory (Ray only).
        unaligned: barriers overtake the messages in flight (``CheckpointConfig.mode="unaligned"``).
        aligned_timeout_s: an aligned checkpoint whose alignment runs longer switches to unaligned.
        incremental: write only the state pieces the newest completed checkpoint does not hold
            (``CheckpointConfig.incremental``).
    """

    coordinator: ActorHandle
    storage: str = field(repr=False)  # may carry S3 credentials (see onceflow.checkpoint.s3)
    cache: bool = True
    unaligned: bool = False
    aligned_timeout_s: float | None = None
    incremental: bool = False


@dataclass(frozen=True, slots=True)
class AttemptId:
    """Which run of a job, and which attempt of that run, an actor belongs to.

    Attributes:
        run: the run's id (a fresh run gets a new one; ``resume=True`` too).
        number: the attempt (1 for the first deployment, one more per restart);
            the coordinator ignores acknowledgements of any other attempt.
    """

    run: str = ""
    number: int = 0


@dataclass(frozen=True, slots=True)
class RestoredState:
    """Where one operator's state of one subtask is kept in a checkpoint.

    Attributes:
        path: the Arrow IPC file in durable storage.
        cached: a Ray object reference to the same table, or ``None`` when the
            object store copy is gone (the coordinator restarted).
        recorded: the file's handle as the checkpoint recorded it (size and
            CRC-32, checked when the file is read); ``None`` reads it unchecked.
        pieces: an incremental snapshot's files (head first); ``path`` and
            ``recorded`` are then the head's, and ``cached`` a list of tables.
    """

    path: str
    cached: Any = None
    recorded: StateHandle | None = None
    pieces: tuple[StateHandle, ...] = ()

    @classmethod
    def recorded_in(cls, state: dict[str, Any], cached: Any = None) -> RestoredState:
        """The state a manifest entry (:meth:`StateHandle.to_manifest`, or pieces) names, checked when read."""
        handles = state_handles(state)
        return cls(handles[0].path, cached, handles[0], tuple(handles) if "pieces" in state else ())


@dataclass(slots=True)
class SubtaskRestore:
    """What one subtask restores: state key (operator uid, or ``@`` runtime entry) -> the handles to load.

    Decided by :func:`onceflow.runtime.restore.assign_restored_state`: several handles
    when state of several old subtasks lands here (rescaling).
    """

    checkpoint_id: int
    states: dict[str, list[RestoredState]] = field(default_factory=dict)


def load_restored(restore: SubtaskRestore | None, storage: CheckpointStorage | None,
                  tally: collections.Counter[str] | None = None) -> dict[str, list[pa.Table]]:
    """Read every state table ``restore`` names: state key -> tables (one per old subtask whose state lands here).

    ``tally`` (if given) counts where each table came from: ``"cache"`` (the
    object store) or ``"storage"`` (its checkpoint file).
    """
    if restore is None:
        return {}
    tally = tally if tally is not None else collections.Counter()
    return {key: [table for handle in handles for table in _load_pieces(handle, storage, tally)]
            for key, handles in restore.states.items()}


def _load_pieces(handle: RestoredState, storage: CheckpointStorage | None,
                 tally: collections.Counter[str]) -> list[pa.Table]:
    """The tables of one restored state: one, or an incremental snapshot's pieces (head first)."""
    if not handle.pieces:
        return [_load(handle, storage, tally)]
    cached = None
    if handle.cached is not None:
        with contextlib.suppress(Exception):
            cached = ray.get(handle.cached, timeout=30)
    if isinstance(cached, list) and len(cached) == len(handle.pieces) and all(
            isinstance(t, pa.Table) and (h.crc32 is None or matches(h, t)) for h, t in zip(handle.pieces, cached,
                                                                                           strict=True)):
        tally["cache"] += len(cached)
        return cached
    return [_load(RestoredState(piece.path, None, piece), storage, tally) for piece in handle.pieces]


def _load(handle: RestoredState, storage: CheckpointStorage | None, tally: collections.Counter[str]) -> pa.Table:
    """The object-store copy if it is there and matches the recorded file's CRC-32, else the file (checked)."""
    if handle.cached is not None:
        try:
            table = ray.get(handle.cached, timeout=30)
        except Exception as error:  # noqa: BLE001 - the copy is only a cache: read the file
            log.info("restoring %s from its checkpoint file: the object-store copy is gone (%s)", handle.path,
                     type(error).__name__)
        else:
            if isinstance(table, pa.Table):
                if handle.recorded is None or handle.recorded.crc32 is None or matches(handle.recorded, table):
                    tally["cache"] += 1
                    return table
                log.warning("the object-store copy of %s does not match its checkpoint file's CRC-32; "
                            "restoring from the file", handle.path)
    if storage is None:
        msg = f"restoring {handle.path!r} needs the checkpoint storage"
        raise ValueError(msg)
    table = storage.read_state(handle.recorded or handle.path)
    tally["storage"] += 1
    return table


def restored_position(tables: list[pa.Table], subtask: int, parallelism: int) -> tuple[Any, int | None]:
    """Return a source subtask's resume offset and max event time from the old readers' states (old subtask order).

    At an unchanged parallelism the subtask resumes from its own reader's
    state; at another one the readers take the old ones over together
    (:class:`~onceflow.operators.sources.base.RescaledOffsets`), and event time
    restarts from the lowest old maximum, so no row becomes late because of the rescale.
    """
    if not tables:
        return None, None
    positions = [read_source_state(table) for table in tables]
    if len(positions) == parallelism:
        return positions[subtask]
    times = [t for _, t in positions]
    lowest = None if any(t is None for t in times) else min(t for t in times if t is not None)
    return RescaledOffsets(tuple(o for o, _ in positions)), lowest


def replayed_channel_state(tables: list[pa.Table], plan: PhysicalPlan, vertex: VertexSpec,
                           subtask: int) -> list[ChannelMessage]:
    """The in-flight messages ``subtask`` of ``vertex`` replays, from the channel state of the old subtasks.

    At the parallelism the checkpoint was taken at, a subtask replays its own
    messages as they were recorded. After a rescale every old subtask's
    messages reach every new one, and each keeps its share: by key group when
    every input of the vertex is hash-partitioned (rows go where the new
    routing sends their keys), else old subtask *i*'s messages go to new
    subtask ``i % parallelism``. Watermark marks are dropped then: the input
    watermarks restart at their conservative restored value anyway.

    Raises:
        PlanError: the vertex mixes hash-partitioned and other inputs, so the
            in-flight rows of a rescaled checkpoint cannot be routed.
    """
    own = [t for t in tables if _channel_state_owner(t) == (subtask, vertex.parallelism)]
    if len(own) == len(tables) == 1:
        return read_channel_state(tables[0], operator=f"{vertex.name}/{subtask}")
    edges = [spec for upstream in plan.vertices for spec in upstream.outputs if spec.target == vertex.id]
    keys = {spec.keys for spec in edges if spec.routing is Routing.HASH}
    if keys and (len(keys) > 1 or any(spec.routing is not Routing.HASH for spec in edges)):
        msg = (f"vertex {vertex.name!r}: cannot rescale a checkpoint with in-flight rows (unaligned channel state) "
               "into a vertex whose inputs are partitioned in different ways; restore it at its old parallelism, "
               "or take an aligned checkpoint first")
        raise PlanError(msg)
    owned = key_group_range(subtask, vertex.parallelism, plan.max_parallelism)
    replayed: list[ChannelMessage] = []
    for table in tables:
        old_subtask, _ = _channel_state_owner(table)
        if not keys and old_subtask % vertex.parallelism != subtask:
            continue
        for message in read_channel_state(table, operator=f"{vertex.name}/{subtask}"):
            batch = message.batch
            if batch is not None and keys:
                (columns,) = keys
                assert columns is not None
                groups = hash_columns(batch, columns) % np.uint32(plan.max_parallelism)
                batch = batch.filter(pa.array(in_key_groups(groups, owned)))
            if batch is not None and batch.num_rows:
                replayed.append(ChannelMessage(0, len(replayed), batch))
    return replayed


def _channel_state_owner(table: pa.Table) -> tuple[int, int]:
    metadata = table.schema.metadata or {}
    return int(metadata.get(b"onceflow.subtask", b"-1")), int(metadata.get(b"onceflow.parallelism", b"0"))
