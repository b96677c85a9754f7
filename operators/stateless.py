"""Stateless operators: row-wise ``map``/``filter``/``flat_map`` and ``map_batches``.

``map_batches`` (Arrow in, Arrow out) is the fast path: use ``pyarrow.compute``
or numpy in it. The row-wise operators turn every batch into Python dicts and
back, which costs about a microsecond per row; they exist for convenience.

Example:
    >>> import pyarrow as pa
    >>> from onceflow.operators.logic import OperatorContext
    >>> logic = Map(lambda row: {"x": row["x"] * 2}).build(OperatorContext("map_1"))
    >>> logic.on_batch(pa.record_batch({"x": [1, 2]}))[0][1].to_pydict()
    {'x': [2, 4]}

"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from onceflow.errors import DataError, OnceflowError, OperatorError, PlanError
from onceflow.operators.logic import DEAD_LETTERS, MAIN, Emitted, OperatorContext, OperatorLogic

__all__ = ["Filter", "FlatMap", "Forward", "LoopHead", "Map", "MapBatches"]

Row = dict[str, Any]


def _call_failed(operator: str, what: str, error: Exception) -> OperatorError:
    msg = f"operator {operator!r}: the {what} function raised {type(error).__name__}: {error}; fix the function"
    return OperatorError(msg, operator=operator)


class _RowsToBatch:
    """Builds output batches from dicts with a schema fixed by the first output."""

    __slots__ = ("_operator", "schema")

    def __init__(self, operator: str) -> None:
        self._operator = operator
        self.schema: pa.Schema | None = None

    def build(self, rows: list[Row]) -> Emitted:
        if not rows:
            return []
        for row in rows:
            if not isinstance(row, dict):
                msg = (
                    f"operator {self._operator!r}: the function returned {type(row).__name__}, "
                    "expected a dict of column name to value; return a dict"
                )
                raise DataError(msg, operator=self._operator)
        if self.schema is None:
            batch = pa.RecordBatch.from_pylist(rows)
            self.schema = batch.schema
            return [(MAIN, batch)]
        try:
            return [(MAIN, pa.RecordBatch.from_pylist(rows, schema=self.schema))]
        except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
            msg = (
                f"operator {self._operator!r}: an output row does not fit the schema of earlier outputs "
                f"({self.schema}): {error}; return the same keys with the same types every time"
            )
            raise DataError(msg, operator=self._operator) from error


class _MapLogic(OperatorLogic):
    def __init__(self, fn: Callable[[Row], Row], operator: str) -> None:
        self._fn = fn
        self._operator = operator
        self._out = _RowsToBatch(operator)

    def on_batch(self, batch: pa.RecordBatch) -> Emitted:
        fn = self._fn
        try:
            rows = [fn(row) for row in batch.to_pylist()]
        except Exception as error:
            raise _call_failed(self._operator, "map", error) from error
        return self._out.build(rows)


class _FilterLogic(OperatorLogic):
    def __init__(self, predicate: Callable[[Row], bool], operator: str) -> None:
        self._predicate = predicate
        self._operator = operator

    def on_batch(self, batch: pa.RecordBatch) -> Emitted:
        predicate = self._predicate
        try:
            keep = [bool(predicate(row)) for row in batch.to_pylist()]
        except Exception as error:
            raise _call_failed(self._operator, "filter", error) from error
        kept = batch.filter(pa.array(keep, type=pa.bool_()))
        return [(MAIN, kept)] if kept.num_rows else []


class _FlatMapLogic(OperatorLogic):
    def __init__(self, fn: Callable[[Row], Iterable[Row]], operator: str) -> None:
        self._fn = fn
        self._operator = operator
        self._out = _RowsToBatch(operator)

    def on_batch(self, batch: pa.RecordBatch) -> Emitted:
        fn = self._fn
        try:
            rows = [out for row in batch.to_pylist() for out in fn(row)]
        except Exception as error:
            raise _call_failed(self._operator, "flat_map", error) from error
        return self._out.build(rows)


class _MapBatchesLogic(OperatorLogic):
    def __init__(self, fn: Callable[[pa.RecordBatch], pa.RecordBatch | pa.Table], operator: str,
                 schema: pa.Schema | None, dead_letters: bool = False) -> None:
        self._fn = fn
        self._operator = operator
        self._schema = schema
        self._dead_letters = dead_letters

    def on_batch(self, batch: pa.RecordBatch) -> Emitted:
        if not self._dead_letters:
            out = self._apply(batch)
            return [(MAIN, out)] if out.num_rows else []
        emitted: Emitted = []
        self._isolate(batch, emitted)
        return emitted

    def _isolate(self, batch: pa.RecordBatch, emitted: Emitted) -> None:
        """Apply the function; where it fails, to halves of the batch, down to the rows it fails on alone."""
        try:
            out = self._apply(batch)
        except OnceflowError as error:
            if batch.num_rows > 1:
                half = batch.num_rows // 2
                self._isolate(batch.slice(0, half), emitted)
                self._isolate(batch.slice(half), emitted)
            else:
                reason = str(error).removeprefix(f"operator {self._operator!r}: ")
                emitted.append((DEAD_LETTERS, batch.append_column("error", pa.array([reason], pa.string()))))
            return
        if out.num_rows:
            emitted.append((MAIN, out))

    def _apply(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """``fn(batch)`` as a batch of the operator's one schema, or an error that says what went wrong."""
        try:
            out = self._fn(batch)
        except Exception as error:
            raise _call_failed(self._operator, "map_batches", error) from error
        if isinstance(out, pa.Table):
            out = out.combine_chunks().to_batches()[0] if out.num_rows else pa.RecordBatch.from_pylist(
                [], schema=out.schema)
        if not isinstance(out, pa.RecordBatch):
            msg = (
                f"operator {self._operator!r}: map_batches returned {type(out).__name__}, "
                "expected a pyarrow.RecordBatch or Table; return Arrow data"
            )
            raise DataError(msg, operator=self._operator)
        if self._schema is None:
            self._schema = out.schema
        elif not out.schema.equals(self._schema):
            expected = set(self._schema.names)
            got = set(out.schema.names)
            column = next(iter(sorted(expected ^ got)), None) or next(
                (f.name for f in out.schema if self._schema.field(f.name).type != f.type), None)
            msg = (
                f"operator {self._operator!r}: map_batches returned schema [{_describe(out.schema)}] "
                f"but earlier batches had [{_describe(self._schema)}] (first difference: column {column!r}); "
                "return the same columns and types for every batch"
            )
            raise DataError(msg, operator=self._operator, column=column)
        return out


def _describe(schema: pa.Schema) -> str:
    return ", ".join(f"{f.name}: {f.type}" for f in schema)


@dataclass(frozen=True, slots=True)
class Map:
    """Apply ``fn(row: dict) -> dict`` to every row (row-wise, slower than map_batches)."""

    fn: Callable[[Row], Row]

    def build(self, ctx: OperatorContext) -> OperatorLogic:
        """Return the live logic."""
        return _MapLogic(self.fn, ctx.operator)


@dataclass(frozen=True, slots=True)
class Filter:
    """Keep the rows for which ``predicate(row: dict)`` is true (row-wise)."""

    predicate: Callable[[Row], bool]

    def build(self, ctx: OperatorContext) -> OperatorLogic:
        """Return the live logic."""
        return _FilterLogic(self.predicate, ctx.operator)


@dataclass(frozen=True, slots=True)
class FlatMap:
    """Replace every row by the rows ``fn(row: dict)`` returns (row-wise)."""

    fn: Callable[[Row], Iterable[Row]]

    def build(self, ctx: OperatorContext) -> OperatorLogic:
        """Return the live logic."""
        return _FlatMapLogic(self.fn, ctx.operator)


@dataclass(frozen=True, slots=True)
class MapBatches:
    """Apply ``fn(batch) -> batch`` to every Arrow batch; every output has one schema.

    Args:
        fn: the vectorised function.
        schema: the output schema, if known; otherwise the first output's schema.
        errors: ``"fail"``: a batch the function raises on, or answers with
            something else than a batch of the schema, fails the job;
            ``"dead_letter"``: the batch is split in halves and each retried,
            down to single rows, and the rows it fails on alone go to the
            :data:`~onceflow.operators.logic.DEAD_LETTERS` port with an
            ``error`` column, while the others go on (so ``fn`` must treat
            rows independently, as a row-wise map would).

    """

    fn: Callable[[pa.RecordBatch], pa.RecordBatch | pa.Table]
    schema: pa.Schema | None = None
    errors: str = "fail"

    def __post_init__(self) -> None:
        if self.errors not in ("fail", "dead_letter"):
            msg = f"map_batches: errors must be 'fail' or 'dead_letter', got {self.errors!r}"
            raise PlanError(msg)

    def side_ports(self) -> frozenset[int]:
        """``{DEAD_LETTERS}`` with ``errors="dead_letter"``, else no side port."""
        return frozenset({DEAD_LETTERS}) if self.errors == "dead_letter" else frozenset()

    def build(self, ctx: OperatorContext) -> OperatorLogic:
        """Return the live logic."""
        return _MapBatchesLogic(self.fn, ctx.operator, self.schema, dead_letters=self.errors == "dead_letter")


@dataclass(frozen=True, slots=True)
class Forward:
    """Pass every batch on unchanged: the named step that starts a side output's stream (``dead_letters()``)."""

    def build(self, ctx: OperatorContext) -> OperatorLogic:
        """Return the live logic."""
        return _ForwardLogic()


class _ForwardLogic(OperatorLogic):
    __slots__ = ()

    def on_batch(self, batch: pa.RecordBatch) -> Emitted:
        return [(MAIN, batch)]


@dataclass(frozen=True, slots=True)
class LoopHead:
    """The head of a loop (``stream.iterate()``): passes on its input's rows and the rows fed back.

    Every batch must have the columns of the first one, so what comes round
    fits what the loop's body expects.
    """

    def build(self, ctx: OperatorContext) -> OperatorLogic:
        """Return the live logic."""
        return _LoopHeadLogic(ctx.operator)


class _LoopHeadLogic(OperatorLogic):
    __slots__ = ("_operator", "_schema")

    def __init__(self, operator: str) -> None:
        self._operator = operator
        self._schema: pa.Schema | None = None

    def on_batch(self, batch: pa.RecordBatch) -> Emitted:
        if self._schema is None:
            self._schema = batch.schema
        elif not batch.schema.equals(self._schema):
            msg = (f"loop {self._operator!r}: a batch with columns {batch.schema.names} "
                   f"({', '.join(str(t) for t in batch.schema.types)}) met the loop's columns "
                   f"{self._schema.names} ({', '.join(str(t) for t in self._schema.types)}); the stream given "
                   "to close_with() must keep the columns and types of the loop's input")
            raise DataError(msg, operator=self._operator)
        return [(MAIN, batch)]
