"""What a subtask is deployed with: data-plane options, checkpoint set-up, attempt, restored state.

These records travel from the job's driver to the subtask actors it creates;
:func:`load_restored` reads the restored state on the subtask's side (from
the object store copy, or from durable storage when that copy is gone).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import ray

from onceflow.checkpoint.state import read_source_state
from onceflow.operators.sources.base import RescaledOffsets

if TYPE_CHECKING:
    from ray.actor import ActorHandle

    from onceflow.checkpoint.storage import CheckpointStorage

__all__ = ["AttemptId", "CheckpointSetup", "RestoredState", "RuntimeOptions", "SubtaskRestore", "load_restored",
           "restored_position"]


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
    """

    coordinator: ActorHandle
    storage: str
    cache: bool = True


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
    """

    path: str
    cached: Any = None


@dataclass(slots=True)
class SubtaskRestore:
    """What one subtask restores: state key (operator uid, or ``@`` runtime entry) -> the handles to load.

    Decided by :func:`onceflow.runtime.restore.assign_restored_state`: several handles
    when state of several old subtasks lands here (rescaling).
    """

    checkpoint_id: int
    states: dict[str, list[RestoredState]] = field(default_factory=dict)


def load_restored(restore: SubtaskRestore | None, storage: CheckpointStorage | None) -> dict[str, list[pa.Table]]:
    """Read every state table ``restore`` names: state key -> tables (one per old subtask whose state lands here)."""
    if restore is None:
        return {}
    return {key: [_load(handle, storage) for handle in handles] for key, handles in restore.states.items()}


def _load(handle: RestoredState, storage: CheckpointStorage | None) -> pa.Table:
    if handle.cached is not None:
        with contextlib.suppress(Exception):
            table = ray.get(handle.cached, timeout=30)
            if isinstance(table, pa.Table):
                return table
    if storage is None:
        msg = f"restoring {handle.path!r} needs the checkpoint storage"
        raise ValueError(msg)
    return storage.read_state(handle.path)


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
