"""Keyed stateful operators with per-key state: ``process`` and ``reduce``.

Both are row-wise (a Python call per row) and keep one Python value of state
per key. The state is snapshotted per key group as an Arrow table, so it can
be checkpointed and re-assigned when the parallelism changes.

Example:
    >>> import pyarrow as pa
    >>> from onceflow.operators.logic import OperatorContext
    >>> def running_count(state, row):
    ...     count = (state or 0) + 1
    ...     return count, {"user": row["user"], "count": count}
    >>> logic = KeyedProcess(running_count, ["user"]).build(OperatorContext("process_1"))
    >>> logic.on_batch(pa.record_batch({"user": ["a", "b", "a"]}))[0][1].to_pydict()
    {'user': ['a', 'b', 'a'], 'count': [1, 1, 2]}

"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from onceflow.errors import DataError, OnceflowError, OperatorError
from onceflow.operators.keygroups import canonical_key, in_key_groups, key_groups_of, require_key_columns
from onceflow.operators.logic import Emitted, OperatorContext, OperatorLogic
from onceflow.operators.stateless import Row, _RowsToBatch

__all__ = ["STATE_FORMAT_VERSION", "KeyedProcess", "KeyedReduce"]

STATE_FORMAT_VERSION = 1
"""The version of the snapshot table layout (schema metadata ``onceflow.version``)."""

_METADATA = {b"onceflow.state": b"keyed", b"onceflow.version": str(STATE_FORMAT_VERSION).encode()}

ProcessFn = Callable[[Any, Row], tuple[Any, Row | Iterable[Row] | None]]
ReduceFn = Callable[[Row, Row], Row]


class _KeyedLogic(OperatorLogic):
    """Shared machinery: key extraction, per-key state, snapshot and restore.

    The snapshot is one table: ``key_group`` (int32, the group routing sent
    the key's rows to), the key columns with the input's Arrow types, and
    ``state`` (the pickled value). Restore keeps the rows of
    ``ctx.key_groups`` by that stored group, from one table or several (one per
    old subtask, separately or concatenated).
    """

    def __init__(self, keys: Sequence[str], ctx: OperatorContext,
                 resume_state: pa.Table | Sequence[pa.Table] | None) -> None:
        self._keys = list(keys)
        self._ctx = ctx
        self._out = _RowsToBatch(ctx.operator)
        self._state: dict[tuple[Any, ...], Any] = {}
        # The key group of every key in _state, as routing computed it from the key's rows.
        self._key_groups: dict[tuple[Any, ...], int] = {}
        # The Arrow types of the key columns (None before the first batch or restored table).
        self._key_types: list[pa.DataType] | None = None
        if resume_state is not None:
            self._restore([resume_state] if isinstance(resume_state, pa.Table) else list(resume_state))

    def _step(self, key: tuple[Any, ...], row: Row) -> Row | Iterable[Row] | None:
        raise NotImplementedError

    def on_batch(self, batch: pa.RecordBatch) -> Emitted:
        operator = self._ctx.operator
        require_key_columns(batch.schema, self._keys, operator=operator)
        self._note_key_types(batch.schema)
        groups = key_groups_of(batch, self._keys, self._ctx.max_parallelism, operator=operator).tolist()
        keys = self._keys
        state, key_groups = self._state, self._key_groups
        outputs: list[Row] = []
        try:
            for row, group in zip(self._rows(batch), groups, strict=True):
                key = tuple(canonical_key(row[k]) for k in keys)
                emitted = self._step(key, row)
                if key in state:
                    key_groups[key] = group
                else:
                    key_groups.pop(key, None)
                if emitted is None:
                    continue
                if isinstance(emitted, dict):
                    outputs.append(emitted)
                else:
                    outputs.extend(emitted)
        except OnceflowError:
            raise
        except Exception as error:
            msg = (
                f"operator {operator!r}: the function raised {type(error).__name__}: {error}; "
                "fix the function"
            )
            raise OperatorError(msg, operator=operator, subtask=self._ctx.subtask) from error
        return self._out.build(outputs)

    def _rows(self, batch: pa.RecordBatch) -> list[Row]:
        """The rows of ``batch`` as dicts of Python values.

        Raises:
            DataError: a column holds values Python cannot represent
                (nanoseconds without pandas); the message names the column.

        """
        columns: list[list[Any]] = []
        for name, column in zip(batch.schema.names, batch.columns, strict=True):
            try:
                columns.append(column.to_pylist())
            except (ValueError, OverflowError, pa.ArrowException) as error:
                kind = column.type
                unit = getattr(kind, "unit", None)
                if unit == "ns":
                    target = (
                        pa.timestamp("us", kind.tz) if pa.types.is_timestamp(kind)
                        else pa.duration("us") if pa.types.is_duration(kind) else pa.time64("us")
                    )
                    advice = f"cast it to {target} first (or install pandas)"
                else:
                    advice = "cast it to a type Python can hold first"
                msg = (
                    f"operator {self._ctx.operator!r}: column {name!r} ({kind}) holds a value Python cannot "
                    f"represent ({error}); {advice}"
                )
                raise DataError(msg, operator=self._ctx.operator, column=name) from error
        names = batch.schema.names
        return [dict(zip(names, values, strict=True)) for values in zip(*columns, strict=True)]

    def _note_key_types(self, schema: pa.Schema) -> None:
        """Remember the key columns' Arrow types, widening them as batches require.

        Raises:
            DataError: a key column changed to a type that cannot hold both
                (string, then int64).

        """
        kinds = [schema.field(k).type for k in self._keys]
        if self._key_types is None:
            self._key_types = kinds
            return
        for index, (key, known, kind) in enumerate(zip(self._keys, self._key_types, kinds, strict=True)):
            if kind == known:
                continue
            try:
                unified = pa.unify_schemas(
                    [pa.schema([(key, known)]), pa.schema([(key, kind)])], promote_options="permissive"
                )
            except (pa.ArrowTypeError, pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
                msg = (
                    f"operator {self._ctx.operator!r}: key column {key!r} changed type from {known} to {kind}; "
                    "give every batch the same schema (cast the column before this operator)"
                )
                raise DataError(msg, operator=self._ctx.operator, column=key) from error
            self._key_types[index] = unified.field(0).type

    def snapshot(self) -> pa.Table | None:
        if not self._state:
            return None
        assert self._key_types is not None  # state comes from a batch or a restored table
        keys = list(self._state)
        columns = [
            pa.array([key[i] for key in keys], type=kind) for i, kind in enumerate(self._key_types)
        ]
        groups = pa.array([self._key_groups[key] for key in keys], pa.int32())
        states = pa.array([pickle.dumps(self._state[key], protocol=5) for key in keys], pa.binary())
        names = ["key_group", *self._keys, "state"]
        return pa.Table.from_arrays([groups, *columns, states], names=names).replace_schema_metadata(_METADATA)

    def _restore(self, tables: list[pa.Table]) -> None:
        """Restore the keys of this subtask's key groups from snapshot tables.

        Raises:
            DataError: a table is not keyed state of these key columns.

        """
        operator = self._ctx.operator
        for table in tables:
            kind = (table.schema.metadata or {}).get(b"onceflow.state", b"keyed")
            if kind != b"keyed":
                msg = (
                    f"operator {operator!r}: resume_state is {kind.decode()} state, not keyed state; "
                    "restore from this operator's snapshot"
                )
                raise DataError(msg, operator=operator)
            for name in ["key_group", *self._keys, "state"]:
                if table.schema.get_field_index(name) < 0:
                    msg = (
                        f"operator {operator!r}: resume_state lacks column {name!r}, so it was not written by "
                        "this operator; restore from a snapshot of the same keys"
                    )
                    raise DataError(msg, operator=operator, column=name)
            self._note_key_types(table.schema)
            groups = np.asarray(table.column("key_group").to_numpy(), dtype=np.int64)
            mine = in_key_groups(groups, self._ctx.key_groups)
            if not mine.any():
                continue
            rows = np.flatnonzero(mine).tolist()
            columns = [table.column(k).to_pylist() for k in self._keys]
            states = table.column("state").to_pylist()
            for row in rows:
                key = tuple(canonical_key(column[row]) for column in columns)
                self._state[key] = pickle.loads(states[row])  # noqa: S301 - the job's own checkpoint
                self._key_groups[key] = int(groups[row])

    def metrics(self) -> dict[str, int]:
        return {"keys": len(self._state)}


class _ProcessLogic(_KeyedLogic):
    def __init__(self, fn: ProcessFn, keys: Sequence[str], ctx: OperatorContext,
                 resume_state: pa.Table | Sequence[pa.Table] | None) -> None:
        super().__init__(keys, ctx, resume_state)
        self._fn = fn

    def _step(self, key: tuple[Any, ...], row: Row) -> Row | Iterable[Row] | None:
        state, emitted = self._fn(self._state.get(key), row)
        if state is None:
            self._state.pop(key, None)
        else:
            self._state[key] = state
        return emitted


class _ReduceLogic(_KeyedLogic):
    def __init__(self, fn: ReduceFn, keys: Sequence[str], ctx: OperatorContext,
                 resume_state: pa.Table | Sequence[pa.Table] | None) -> None:
        super().__init__(keys, ctx, resume_state)
        self._fn = fn

    def _step(self, key: tuple[Any, ...], row: Row) -> Row:
        previous = self._state.get(key)
        reduced = row if previous is None else self._fn(previous, row)
        self._state[key] = reduced
        return reduced


@dataclass(frozen=True, slots=True)
class KeyedProcess:
    """Run ``fn(state, row) -> (state, output)`` per row with one state per key.

    ``state`` is ``None`` for a key's first row; returning ``None`` as the new
    state forgets the key. ``output`` is ``None``, a dict, or an iterable of
    dicts. The state must be picklable.
    """

    fn: ProcessFn
    keys: Sequence[str]

    def build(self, ctx: OperatorContext,
              resume_state: pa.Table | Sequence[pa.Table] | None = None) -> OperatorLogic:
        """Return the live logic, restored from snapshot table(s) when given (see ``snapshot``)."""
        return _ProcessLogic(self.fn, self.keys, ctx, resume_state)


@dataclass(frozen=True, slots=True)
class KeyedReduce:
    """Fold rows per key with ``fn(accumulated, row) -> accumulated``; emit every update.

    As Flink's ``KeyedStream.reduce``: the first row of a key is its
    accumulator; every later row emits the new accumulated row.
    """

    fn: ReduceFn
    keys: Sequence[str]

    def build(self, ctx: OperatorContext,
              resume_state: pa.Table | Sequence[pa.Table] | None = None) -> OperatorLogic:
        """Return the live logic, restored from snapshot table(s) when given (see ``snapshot``)."""
        return _ReduceLogic(self.fn, self.keys, ctx, resume_state)
