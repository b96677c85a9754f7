"""The contract between the runtime and an operator's live logic.

A user-facing operator is a small picklable *config* object; the subtask actor
calls ``build(ctx)`` on it to get the live :class:`OperatorLogic`. All live
state derives from what ``build`` receives, never from the config's
constructor: a stateful operator's ``build(ctx, resume_state)`` restores the
tables its :meth:`OperatorLogic.snapshot` returned.

Every event handler returns the batches it emits as ``(port, batch)`` pairs:
port :data:`MAIN` is the operator's main output, other ports are side outputs
(window aggregations send late events to :data:`LATE`; a source sends the
messages that do not decode to :data:`DEAD_LETTERS`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = [
    "DEAD_LETTERS",
    "LATE",
    "MAIN",
    "Emitted",
    "OperatorContext",
    "OperatorLogic",
    "StatePieces",
]

MAIN = 0
"""The main output port of an operator."""

LATE = 1
"""The side output port that carries late events of a window aggregation."""

DEAD_LETTERS = 2
"""The side output port of a source that carries the messages it could not decode."""

Emitted = list[tuple[int, "pa.RecordBatch"]]
"""What an event handler returns: ``(port, batch)`` pairs, in emission order."""


@dataclass(frozen=True, slots=True)
class OperatorContext:
    """Where a live operator runs.

    Attributes:
        operator: the operator's unique name in the job (``window_2``).
        subtask: this subtask's index, ``0 <= subtask < parallelism``.
        parallelism: the operator's parallelism.
        max_parallelism: the number of key groups.
        key_groups: the contiguous key-group range this subtask owns.
        options: runtime options an operator may read (batch sizes).

    """

    operator: str
    subtask: int = 0
    parallelism: int = 1
    max_parallelism: int = 128
    key_groups: range = field(default_factory=lambda: range(128))
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StatePieces:
    """An operator's snapshot as pieces, for incremental checkpoints.

    Attributes:
        head: a table written with every checkpoint (what changes each time:
            the watermark, counters; often no rows).
        pieces: the state's immutable parts, each with the object that
            identifies it: a piece whose identity object is the same one as at
            the newest completed checkpoint is not written again. Restoring
            passes ``[head, *tables]`` to ``build`` as ``resume_state``.
    """

    head: pa.Table
    pieces: list[tuple[object, pa.Table]]


class OperatorLogic:
    """The live logic of one operator in one subtask.

    Subclasses override the handlers they need; the defaults emit nothing.
    ``on_batch`` is called with every input batch in order, ``on_watermark``
    whenever the operator's input watermark (the minimum over its inputs)
    advances, ``on_eof`` once when every input has ended. ``snapshot``
    returns the operator's state as an Arrow table (or ``None`` when it has
    none); a restored subtask passes it back to ``build`` as ``resume_state``.
    """

    def on_batch(self, batch: pa.RecordBatch) -> Emitted:
        """Process one input batch; return what it emits."""
        return []

    def on_watermark(self, watermark: int) -> Emitted:
        """React to the input watermark advancing to ``watermark`` (ms)."""
        return []

    def on_eof(self) -> Emitted:
        """Flush at the end of input; return the final outputs."""
        return []

    def snapshot(self) -> pa.Table | None:
        """Return the operator's state as an immutable Arrow table."""
        return None

    def snapshot_pieces(self) -> StatePieces | None:
        """The state as pieces for an incremental checkpoint; ``None``: write :meth:`snapshot` in full."""
        return None

    def metrics(self) -> dict[str, int]:
        """Return operator-specific counters (``late_events``, ...)."""
        return {}
