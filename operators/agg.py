"""Aggregations for window operators: ``count``, ``sum``, ``min``, ``max``, ``mean``.

An aggregation is a small, frozen, picklable config object. It says which
input column it reads, which *partial accumulators* it keeps (a mean keeps a
sum and a count), how partials of the same group combine (sum of sums, sum of
counts, min of mins) and how the final value is computed from them. Window
operators pre-aggregate every batch into partials, keep partials as state (and
in snapshots), and finalize when a window fires.

Output types: ``count`` gives int64; ``sum`` of integers int64 and of floats
float64; ``min``/``max`` keep the input type; ``mean`` gives float64. Nulls in
the input column are skipped; a group whose values are all null gets null
(``count()`` counts rows, nulls included).

:func:`reduce_groups` is the vectorised grouped reduction the window operator
runs on input rows and on partials: a sort-based numpy path for integer group
columns and numeric values, and ``pyarrow.Table.group_by`` for everything
else; both give one row per group, sorted by the group columns.

Example:
    >>> sum("amount")
    sum('amount')
    >>> [p.suffix for p in mean("amount").partials]
    ['sum', 'count']

"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from onceflow.errors import DataError, PlanError

__all__ = [
    "REDUCTIONS",
    "Aggregation",
    "Count",
    "Max",
    "Mean",
    "Min",
    "Partial",
    "Sum",
    "count",
    "max",
    "mean",
    "min",
    "reduce_groups",
    "sum",
]

REDUCTIONS = frozenset({"count_all", "count", "sum", "min", "max"})
"""The grouped reductions :func:`reduce_groups` knows.

``count_all`` counts rows (it reads no column), ``count`` counts non-null
values, ``sum``, ``min`` and ``max`` skip nulls and give null for a group
whose values are all null.
"""

_COMPOSITE_LIMIT = 1 << 62
_NUMPY_VALUE_TYPES = frozenset(
    {
        pa.int8(),
        pa.int16(),
        pa.int32(),
        pa.int64(),
        pa.uint8(),
        pa.uint16(),
        pa.uint32(),
        pa.uint64(),
        pa.float32(),
        pa.float64(),
    }
)


@dataclass(frozen=True, slots=True)
class Partial:
    """One partial-accumulator column of an aggregation.

    Attributes:
        suffix: the column's suffix in snapshots (``total.sum`` for the
            aggregate named ``total``).
        accumulate: the reduction that turns input rows into this partial
            (one of :data:`REDUCTIONS`).
        combine: the reduction that merges partials of the same group
            (``sum``, ``min`` or ``max``).

    """

    suffix: str
    accumulate: str
    combine: str


def _is_number(kind: pa.DataType) -> bool:
    return pa.types.is_integer(kind) or pa.types.is_floating(kind)


def _is_orderable(kind: pa.DataType) -> bool:
    return (
        _is_number(kind)
        or pa.types.is_temporal(kind)
        or pa.types.is_decimal(kind)
        or pa.types.is_boolean(kind)
        or pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or pa.types.is_binary(kind)
        or pa.types.is_large_binary(kind)
    )


class Aggregation:
    """Base class of the aggregations; use the factories (:func:`sum`, ...).

    Subclasses are frozen dataclasses. ``column`` is the input column (None
    for :class:`Count`), ``kind`` the function name and ``partials`` the
    partial-accumulator columns, in the order :meth:`finalize` takes them.
    """

    __slots__ = ()

    kind: ClassVar[str] = ""
    partials: ClassVar[tuple[Partial, ...]] = ()

    @property
    def column(self) -> str | None:
        """The input column this aggregation reads, or None."""
        return None

    def __repr__(self) -> str:
        """Return the call that builds this aggregation (``sum('amount')``)."""
        return f"{self.kind}()" if self.column is None else f"{self.kind}({self.column!r})"

    def input_type(self, schema: pa.Schema, *, operator: str = "") -> pa.DataType | None:
        """Validate the input column and return the type to accumulate it as.

        The caller casts the input column to the returned type before
        accumulating (a sum of int32 accumulates as int64).

        Args:
            schema: the schema of an input batch.
            operator: the operator's name, for error messages.

        Returns:
            The accumulation type, or None for an aggregation without input.

        Raises:
            DataError: the column is missing, duplicated or has a type this
                aggregation cannot use.

        """
        column = self.column
        if column is None:
            return None
        indices = schema.get_all_field_indices(column)
        if len(indices) != 1:
            problem = "is missing from the input" if not indices else "appears more than once in the input"
            msg = (
                f"operator {operator!r}: {self!r} reads column {column!r}, which {problem} "
                f"(columns: {', '.join(schema.names)}); aggregate a column the stream has exactly once"
            )
            raise DataError(msg, operator=operator, column=column)
        kind = schema.field(indices[0]).type
        accumulated = self._accumulation_type(kind)
        if accumulated is None:
            msg = (
                f"operator {operator!r}: {self!r} needs {self._expected()}, but column {column!r} "
                f"has type {kind}; cast {column!r} to such a type before aggregating"
            )
            raise DataError(msg, operator=operator, column=column)
        return accumulated

    def finalize(self, partials: Sequence[pa.Array | pa.ChunkedArray]) -> pa.Array | pa.ChunkedArray:
        """Compute the final values from this aggregation's combined partials.

        Args:
            partials: one array per entry of :attr:`partials`, in that order.

        Returns:
            The aggregate's output column.

        """
        return partials[0]

    def _accumulation_type(self, kind: pa.DataType) -> pa.DataType | None:
        raise NotImplementedError

    def _expected(self) -> str:
        return "an integer or floating-point column"


@dataclass(frozen=True, slots=True, repr=False)
class Count(Aggregation):
    """The number of rows per group (nulls included), as int64.

    Example:
        >>> count()
        count()
        >>> count().partials[0]
        Partial(suffix='count', accumulate='count_all', combine='sum')

    """

    kind: ClassVar[str] = "count"
    partials: ClassVar[tuple[Partial, ...]] = (Partial("count", "count_all", "sum"),)

    def _accumulation_type(self, kind: pa.DataType) -> pa.DataType | None:
        return None


def _check_column(kind: str, column: object) -> None:
    if not isinstance(column, str) or not column:
        msg = f"agg.{kind} needs the name of an input column, got {column!r}; pass the column's name as a string"
        raise PlanError(msg)


@dataclass(frozen=True, slots=True, repr=False)
class Sum(Aggregation):
    """The sum of a numeric column: int64 for integers, float64 for floats.

    Example:
        >>> sum("amount")
        sum('amount')
        >>> sum("amount").input_type(pa.schema({"amount": pa.int32()}))
        DataType(int64)

    """

    column: str  # type: ignore[misc]
    kind: ClassVar[str] = "sum"
    partials: ClassVar[tuple[Partial, ...]] = (Partial("sum", "sum", "sum"),)

    def __post_init__(self) -> None:
        """Validate the column name."""
        _check_column(self.kind, self.column)

    def _accumulation_type(self, kind: pa.DataType) -> pa.DataType | None:
        if pa.types.is_integer(kind):
            return pa.int64()
        if pa.types.is_floating(kind):
            return pa.float64()
        return None


@dataclass(frozen=True, slots=True, repr=False)
class _Extreme(Aggregation):
    """Shared by :class:`Min` and :class:`Max`: one orderable column, its type kept."""

    column: str  # type: ignore[misc]

    def __post_init__(self) -> None:
        """Validate the column name."""
        _check_column(self.kind, self.column)

    def _accumulation_type(self, kind: pa.DataType) -> pa.DataType | None:
        return kind if _is_orderable(kind) else None

    def _expected(self) -> str:
        return "a numeric, temporal, decimal, boolean, string or binary column"


@dataclass(frozen=True, slots=True, repr=False)
class Min(_Extreme):
    """The smallest value of a column, keeping its type.

    Numbers, temporal values, decimals, booleans, strings and binaries work.

    Example:
        >>> min("amount")
        min('amount')

    """

    kind: ClassVar[str] = "min"
    partials: ClassVar[tuple[Partial, ...]] = (Partial("min", "min", "min"),)


@dataclass(frozen=True, slots=True, repr=False)
class Max(_Extreme):
    """The largest value of a column, keeping its type.

    Numbers, temporal values, decimals, booleans, strings and binaries work.

    Example:
        >>> max("amount")
        max('amount')

    """

    kind: ClassVar[str] = "max"
    partials: ClassVar[tuple[Partial, ...]] = (Partial("max", "max", "max"),)


@dataclass(frozen=True, slots=True, repr=False)
class Mean(Aggregation):
    """The arithmetic mean of a numeric column, as float64 (sum / count).

    Example:
        >>> mean("amount")
        mean('amount')
        >>> mean("amount").finalize([pa.array([3.0, None]), pa.array([2, 0])]).to_pylist()
        [1.5, None]

    """

    column: str  # type: ignore[misc]
    kind: ClassVar[str] = "mean"
    partials: ClassVar[tuple[Partial, ...]] = (Partial("sum", "sum", "sum"), Partial("count", "count", "sum"))

    def __post_init__(self) -> None:
        """Validate the column name."""
        _check_column(self.kind, self.column)

    def _accumulation_type(self, kind: pa.DataType) -> pa.DataType | None:
        return pa.float64() if _is_number(kind) else None

    def finalize(self, partials: Sequence[pa.Array | pa.ChunkedArray]) -> pa.Array | pa.ChunkedArray:
        """Return sum / count as float64 (null where the count is 0)."""
        total, number = partials
        return pc.divide(pc.cast(total, pa.float64()), pc.cast(number, pa.float64()))


def count() -> Count:
    """Count the rows of each group (nulls included), as int64.

    Example:
        >>> count()
        count()

    """
    return Count()


def sum(column: str) -> Sum:  # noqa: A001 - the public name mirrors SQL and Flink
    """Sum ``column``: int64 for integer columns, float64 for floating-point ones.

    Example:
        >>> sum("amount").column
        'amount'

    """
    return Sum(column)


def min(column: str) -> Min:  # noqa: A001
    """Take the smallest value of ``column``, keeping its type.

    Example:
        >>> min("amount").kind
        'min'

    """
    return Min(column)


def max(column: str) -> Max:  # noqa: A001
    """Take the largest value of ``column``, keeping its type.

    Example:
        >>> max("amount").kind
        'max'

    """
    return Max(column)


def mean(column: str) -> Mean:
    """Average ``column`` as float64 (its partials are a sum and a count).

    Example:
        >>> mean("amount").kind
        'mean'

    """
    return Mean(column)


# --- the grouped reduction ----------------------------------------------------------------------


def reduce_groups(
    table: pa.Table,
    by: Sequence[str],
    reductions: Sequence[tuple[str, str | None, str]],
) -> pa.Table:
    """Reduce ``table`` to one row per distinct value of the ``by`` columns.

    Integer group columns without nulls and numeric values take a sort-based
    numpy path; other types go through ``pyarrow.Table.group_by``. Both give
    the same rows in the same order.

    Args:
        table: the rows to reduce.
        by: the group columns (at least one). The output is sorted by them,
            ascending, nulls last.
        reductions: ``(output name, input column, function)`` triples, the
            function one of :data:`REDUCTIONS` (``count_all`` takes None as its
            input column). Sums of integers give int64 (uint64 for unsigned),
            of floats float64; ``min``/``max`` keep the type.

    Returns:
        The ``by`` columns, then one column per reduction, in that order.

    Raises:
        ValueError: ``by`` is empty or a function is unknown.

    Example:
        >>> t = pa.table({"k": [2, 1, 2], "v": [1.0, 2.0, 4.0]})
        >>> reduce_groups(t, ["k"], [("n", None, "count_all"), ("s", "v", "sum")]).to_pylist()
        [{'k': 1, 'n': 1, 's': 2.0}, {'k': 2, 'n': 2, 's': 5.0}]

    """
    if not by:
        msg = "reduce_groups needs at least one group column; pass the columns to group by"
        raise ValueError(msg)
    for _, _, function in reductions:
        if function not in REDUCTIONS:
            msg = f"unknown reduction {function!r}; use one of {', '.join(sorted(REDUCTIONS))}"
            raise ValueError(msg)
    reduced = _reduce_numpy(table, by, reductions)
    if reduced is None:
        reduced = _reduce_arrow(table, by, reductions)
    return reduced


def _to_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return column.to_numpy() if isinstance(column, pa.ChunkedArray) else column.to_numpy(zero_copy_only=False)


def _order_codes(column: pa.ChunkedArray) -> list[np.ndarray] | None:
    """Integer arrays whose tuple sorts like ``column`` (nulls last), or None.

    Integers, booleans and temporal values are their own codes; strings and
    binaries are coded by the rank of their value among the distinct values.
    A column with nulls gets a leading 0/1 null flag.
    """
    kind = column.type
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_integer(kind):
        values = column
    elif pa.types.is_boolean(kind):
        values = pc.cast(column, pa.int8())
    elif pa.types.is_timestamp(kind) or pa.types.is_duration(kind) or pa.types.is_date64(kind):
        values = column.view(pa.int64())
    elif pa.types.is_date32(kind):
        values = column.view(pa.int32())
    elif (
        pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or pa.types.is_binary(kind)
        or (pa.types.is_large_binary(kind))
    ):
        encoded = pc.dictionary_encode(column)
        ranks = np.empty(len(encoded.dictionary), dtype=np.int64)
        ranks[_to_numpy(pc.sort_indices(encoded.dictionary))] = np.arange(len(ranks), dtype=np.int64)
        indices = _to_numpy(encoded.indices.fill_null(0))
        values = pa.array(ranks[indices] if len(ranks) else np.zeros(len(column), dtype=np.int64))
    else:
        return None
    if not column.null_count:
        return [_to_numpy(values)]
    null_flag = _to_numpy(column.is_null()).astype(np.int8)
    return [null_flag, _to_numpy(values.fill_null(pa.scalar(0, values.type)))]


def _composite_key(columns: list[np.ndarray]) -> np.ndarray | None:
    """Pack integer columns into one int64 that sorts like the tuple of them, or None if too wide."""
    packed: np.ndarray | None = None
    span = 1
    for values in columns:
        low = int(values.min())
        width = int(values.max()) - low + 1
        span *= width
        if span >= _COMPOSITE_LIMIT:
            return None
        if values.dtype == np.uint64:
            offsets = (values - np.uint64(low)).astype(np.int64)
        else:
            offsets = values.astype(np.int64, copy=False) - np.int64(low)
        packed = offsets if packed is None else packed * np.int64(width) + offsets
    return packed


def _stable_argsort(values: np.ndarray) -> np.ndarray:
    """Argsort stably; narrow ranges use numpy's radix sort (16-bit keys)."""
    low = int(values.min())
    if int(values.max()) - low < 1 << 16:
        values = (values - values.dtype.type(low)).astype(np.uint16)
    return np.argsort(values, kind="stable")


def _group_starts(codes: list[np.ndarray]) -> tuple[np.ndarray | None, np.ndarray]:
    """Sort rows by the tuple of ``codes``; return the order (None: as is) and each group's first position."""
    rows = len(codes[0])
    new_group = np.empty(rows, dtype=bool)
    new_group[0] = True
    packed = _composite_key(codes)
    order: np.ndarray | None = None
    if packed is not None:
        if rows > 1 and bool(np.any(packed[1:] < packed[:-1])):
            order = np.argsort(packed)
            packed = packed[order]
        np.not_equal(packed[1:], packed[:-1], out=new_group[1:])
        return order, np.flatnonzero(new_group)
    # too wide to pack: a least-significant-first sequence of stable sorts (lexsort, radix where narrow)
    order = np.argsort(codes[-1])
    for values in reversed(codes[:-1]):
        order = order[_stable_argsort(values[order])]
    new_group[1:] = False
    for values in codes:
        ordered = values[order]
        new_group[1:] |= ordered[1:] != ordered[:-1]
    return order, np.flatnonzero(new_group)


def _sum_type(kind: pa.DataType) -> pa.DataType:
    if pa.types.is_floating(kind):
        return pa.float64()
    if pa.types.is_unsigned_integer(kind):
        return pa.uint64()
    return pa.int64()


def _reduce_numpy(
    table: pa.Table,
    by: Sequence[str],
    reductions: Sequence[tuple[str, str | None, str]],
) -> pa.Table | None:
    """Reduce by sorting order-preserving integer codes of the groups; None where that does not apply."""
    rows = table.num_rows
    if rows == 0:
        return None
    for _, source, function in reductions:
        if function in ("sum", "min", "max") and table.column(source).type not in _NUMPY_VALUE_TYPES:
            return None
    codes: list[np.ndarray] = []
    for name in by:
        column_codes = _order_codes(table.column(name))
        if column_codes is None:
            return None
        codes += column_codes
    order, starts = _group_starts(codes)
    lengths = np.diff(np.append(starts, rows))
    first = starts if order is None else order[starts]

    names = list(by)
    arrays: list[pa.Array | pa.ChunkedArray] = [table.column(name).take(first) for name in by]
    for output, source, function in reductions:
        names.append(output)
        if function == "count_all":
            arrays.append(pa.array(lengths.astype(np.int64), type=pa.int64()))
            continue
        column = table.column(source)
        valid: np.ndarray | None = None
        if column.null_count:
            valid = _to_numpy(column.is_valid())
            if order is not None:
                valid = valid[order]
        if function == "count":
            counted = lengths if valid is None else np.add.reduceat(valid, starts, dtype=np.int64)
            arrays.append(pa.array(counted.astype(np.int64, copy=False), type=pa.int64()))
            continue
        arrays.append(_reduce_values(column, function, order, starts, valid))
    return pa.Table.from_arrays(arrays, names=names)


def _reduce_values(
    column: pa.ChunkedArray,
    function: str,
    order: np.ndarray | None,
    starts: np.ndarray,
    valid: np.ndarray | None,
) -> pa.Array:
    kind = column.type
    floating = pa.types.is_floating(kind)
    if valid is not None:
        if function == "sum":
            fill: object = 0
        elif floating:
            fill = float("inf") if function == "min" else float("-inf")
        else:
            info = np.iinfo(kind.to_pandas_dtype())
            fill = info.max if function == "min" else info.min
        column = column.fill_null(pa.scalar(fill, type=kind))
    values = _to_numpy(column)
    if order is not None:
        values = values[order]
    if function == "sum":
        out_type = _sum_type(kind)
        reduced = np.add.reduceat(values, starts, dtype=out_type.to_pandas_dtype())
    elif function == "min":
        out_type = kind
        reduced = (np.fmin if floating else np.minimum).reduceat(values, starts)
    else:
        out_type = kind
        reduced = (np.fmax if floating else np.maximum).reduceat(values, starts)
    mask = None
    if valid is not None:
        mask = np.add.reduceat(valid, starts, dtype=np.int64) == 0
    return pa.array(reduced, type=out_type, mask=mask)


def _reduce_arrow(
    table: pa.Table,
    by: Sequence[str],
    reductions: Sequence[tuple[str, str | None, str]],
) -> pa.Table:
    """Reduce with ``Table.group_by`` on positional names, then sort by the groups."""
    group_names = [f"g{i}" for i in range(len(by))]
    columns = {g: table.column(name) for g, name in zip(group_names, by, strict=True)}
    specs: list[tuple[object, ...]] = []
    for i, (_, source, function) in enumerate(reductions):
        if function == "count_all":
            specs.append(([], "count_all"))
            continue
        value = f"v{i}"
        columns[value] = table.column(source)
        if function == "count":
            specs.append((value, "count", pc.CountOptions(mode="only_valid")))
        else:
            specs.append((value, function, pc.ScalarAggregateOptions(skip_nulls=True, min_count=1)))
    grouped = pa.table(columns).group_by(group_names, use_threads=False).aggregate(specs)
    group_set = set(group_names)
    results = [i for i, name in enumerate(grouped.column_names) if name not in group_set]
    order = pc.sort_indices(grouped, sort_keys=[(g, "ascending", "at_end") for g in group_names])
    grouped = grouped.take(order)
    arrays = [grouped.column(g) for g in group_names] + [grouped.column(i) for i in results]
    names = list(by) + [output for output, _, _ in reductions]
    return pa.Table.from_arrays(arrays, names=names)
