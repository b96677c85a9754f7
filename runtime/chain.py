"""The operator chain of a subtask (sans-IO): fused operators, the routing between them, their snapshots.

A vertex is a chain of nodes fused into one subtask (:class:`~onceflow.runtime.plan.VertexSpec`):
perhaps a source first, then operators, perhaps a sink last. The
:class:`OperatorChain` runs the operators' logic and routes what each
emits: a node's main output goes to the next node of the chain, and every
output port wired to another vertex leaves the chain as an :class:`Output`.
Rows that reach the chain's sink leave it too, as an :class:`Output` on the
port :data:`INTO_SINK`. The subtask sends the outputs on (to its output
gates, to its sink committer), in the order the chain returns them.

The chain counts records into and out of every node, and blames a failure
on the node that raised it (:func:`operator_failure`). The source and the
sink are not run here (the subtask owns the source reader and the sink
committer); the chain only routes the source's rows and counts the sink's.

Nothing here imports Ray or asyncio.

Example:
    >>> import pyarrow as pa
    >>> from onceflow.operators.logic import OperatorLogic
    >>> class Double(OperatorLogic):
    ...     def on_batch(self, batch):
    ...         return [(MAIN, pa.record_batch({"x": pa.compute.multiply(batch["x"], 2)}))]
    >>> chain = OperatorChain(["double", "sink"], {0: Double()}, wired=set(), sink=1)
    >>> [(o.stage, o.port, o.batch["x"].to_pylist()) for o in chain.on_input(pa.record_batch({"x": [1, 2]}))]
    [(1, -1, [2, 4])]
    >>> chain.records_in, chain.records_out
    ([2, 2], [2, 0])

"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from onceflow.errors import OnceflowError, OperatorError
from onceflow.operators.logic import DEAD_LETTERS, MAIN, OperatorLogic, StatePieces

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    import pyarrow as pa

__all__ = ["INTO_SINK", "OperatorChain", "Output", "operator_failure"]

INTO_SINK = -1
"""The port of an :class:`Output` whose rows go into the chain's sink."""


@dataclass(frozen=True, slots=True)
class Output:
    """Rows leaving the chain.

    Attributes:
        stage: the node that emitted them (the sink's index for :data:`INTO_SINK`).
        port: the node's output port, or :data:`INTO_SINK`.
        batch: the rows.
    """

    stage: int
    port: int
    batch: pa.RecordBatch


def operator_failure(error: BaseException, operator: str, subtask: int) -> BaseException:
    """The failure a subtask reports for ``error`` raised by ``operator``: an onceflow error as it is.

    Anything else becomes an :class:`~onceflow.errors.OperatorError`
    that names the operator and subtask, with ``error`` as its cause.
    """
    if isinstance(error, OnceflowError):
        return error
    msg = f"operator {operator!r} (subtask {subtask}) failed: {type(error).__name__}: {error}"
    wrapped = OperatorError(msg, operator=operator, subtask=subtask)
    wrapped.__cause__ = error
    return wrapped


class OperatorChain:
    """Runs the operators of one subtask's chain and routes their outputs (see the module docstring).

    Args:
        names: every node's name, in chain order (source and sink included).
        logics: the live logic of each operator node, by its index in ``names``.
        wired: the ``(node, port)`` pairs that feed another vertex.
        sink: the index of the sink node, if the chain ends in one.
        subtask: the subtask's index, for error messages.

    """

    __slots__ = ("_logics", "_names", "_ordered", "_sink", "_subtask", "_wired", "dead_letters", "records_in",
                 "records_out")

    def __init__(self, names: Sequence[str], logics: dict[int, OperatorLogic], *, wired: set[tuple[int, int]],
                 sink: int | None = None, subtask: int = 0) -> None:
        self._names = list(names)
        self._logics = dict(logics)
        self._ordered = sorted(self._logics.items())
        self._wired = wired
        self._sink = sink
        self._subtask = subtask
        self.records_in = [0] * len(self._names)
        self.records_out = [0] * len(self._names)
        self.dead_letters = [0] * len(self._names)

    # -- events ---------------------------------------------------------------------

    def on_input(self, batch: pa.RecordBatch) -> list[Output]:
        """Rows from the subtask's input channels enter the chain's first node."""
        outputs: list[Output] = []
        self._deliver(0, batch, outputs)
        return outputs

    def on_source_rows(self, batch: pa.RecordBatch, side: Sequence[tuple[int, pa.RecordBatch]] = ()) -> list[Output]:
        """Rows the chain's source (node 0) read, and the ``(port, batch)`` pairs it set aside (dead letters)."""
        outputs: list[Output] = []
        self._route(0, [(MAIN, batch), *side], outputs)
        return outputs

    def on_watermark(self, watermark: int) -> list[Output]:
        """Event time reached ``watermark``: every operator, upstream first, emits what it completes."""
        outputs: list[Output] = []
        for stage, logic in self._ordered:
            with self._blame(stage):
                emitted = logic.on_watermark(watermark)
            self._route(stage, emitted, outputs)
        return outputs

    def on_eof(self) -> list[Output]:
        """The input ended: every operator, upstream first, emits what it still holds."""
        outputs: list[Output] = []
        for stage, logic in self._ordered:
            with self._blame(stage):
                emitted = logic.on_eof()
            self._route(stage, emitted, outputs)
        return outputs

    def snapshot(self, uids: Sequence[str], *, pieces: bool = False) -> dict[str, pa.Table | StatePieces]:
        """Every operator's state, by its node's uid (``uids`` in chain order); stateless ones have none.

        With ``pieces`` (an incremental checkpoint), an operator that keeps its
        state in immutable pieces gives them (:meth:`OperatorLogic.snapshot_pieces`).
        """
        tables: dict[str, pa.Table | StatePieces] = {}
        for stage, logic in self._ordered:
            with self._blame(stage):
                table = (logic.snapshot_pieces() if pieces else None) or logic.snapshot()
            if table is not None:
                tables[uids[stage]] = table
        return tables

    def metrics(self) -> dict[str, dict[str, int | float]]:
        """Per node: records in and out, and the operator's own counters."""
        return {
            name: {"records_in": self.records_in[stage], "records_out": self.records_out[stage],
                   **({"dead_letters": self.dead_letters[stage]} if self.dead_letters[stage] else {}),
                   **(self._logics[stage].metrics() if stage in self._logics else {})}
            for stage, name in enumerate(self._names)
        }

    # -- routing --------------------------------------------------------------------

    def _deliver(self, stage: int, batch: pa.RecordBatch, outputs: list[Output]) -> None:
        self.records_in[stage] += batch.num_rows
        if stage == self._sink:
            outputs.append(Output(stage, INTO_SINK, batch))
            return
        with self._blame(stage):
            emitted = self._logics[stage].on_batch(batch)
        self._route(stage, emitted, outputs)

    def _route(self, stage: int, emitted: Sequence[tuple[int, pa.RecordBatch]], outputs: list[Output]) -> None:
        for port, batch in emitted:
            if batch.num_rows == 0:
                continue
            self.records_out[stage] += batch.num_rows
            if port == DEAD_LETTERS:
                self.dead_letters[stage] += batch.num_rows
            if port == MAIN and stage + 1 < len(self._names):
                self._deliver(stage + 1, batch, outputs)
            if (stage, port) in self._wired:
                outputs.append(Output(stage, port, batch))

    @contextlib.contextmanager
    def _blame(self, stage: int) -> Iterator[None]:
        try:
            yield
        except Exception as error:
            failure = operator_failure(error, self._names[stage], self._subtask)
            if failure is error:
                raise
            raise failure from error
