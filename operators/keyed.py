"""Keyed stateful operators with per-key state: ``process`` and ``reduce``.

Both are row-wise (a Python call per row) and keep one Python value of state
per key. The state is snapshotted per key group as an Arrow table, so it can
be checkpointed and re-assigned when the parallelism changes.

Example:
    >>> import pyarrow as pa
    >>> from operators.logic import OperatorContext
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

import pyarrow as pa

from checkpoint.errors import OnceflowError, OperatorError
from operators.keygroups import key_groups_of, require_key_columns
from operators.logic import Emitted, OperatorContext, OperatorLogic
from operators.stateless import Row, _RowsToBatch

__all__ = ["KeyedProcess", "KeyedReduce"]

ProcessFn = Callable[[Any, Row], tuple[Any, Row | Iterable[Row] | None]]
ReduceFn = Callable[[Row, Row], Row]


class _KeyedLogic(OperatorLogic):
    """Shared machinery: key extraction, per-key state, snapshot and restore."""

    def __init__(self, keys: Sequence[str], ctx: OperatorContext, resume_state: pa.Table | None) -> None:
        self._keys = list(keys)
        self._ctx = ctx
        self._out = _RowsToBatch(ctx.operator)
        self._state: dict[tuple[Any, ...], Any] = {}
        if resume_state is not None:
            self._restore(resume_state)

    def _step(self, key: tuple[Any, ...], row: Row) -> Row | Iterable[Row] | None:
        raise NotImplementedError

    def on_batch(self, batch: pa.RecordBatch) -> Emitted:
        require_key_columns(batch.schema, self._keys, operator=self._ctx.operator)
        keys = self._keys
        outputs: list[Row] = []
        try:
            for row in batch.to_pylist():
                emitted = self._step(tuple(row[k] for k in keys), row)
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
                f"operator {self._ctx.operator!r}: the function raised {type(error).__name__}: {error}; "
                "fix the function"
            )
            raise OperatorError(msg, operator=self._ctx.operator, subtask=self._ctx.subtask) from error
        return self._out.build(outputs)

    def snapshot(self) -> pa.Table | None:
        if not self._state:
            return None
        columns: dict[str, list[Any]] = {k: [] for k in self._keys}
        states: list[bytes] = []
        for key, value in self._state.items():
            for name, part in zip(self._keys, key, strict=True):
                columns[name].append(part)
            states.append(pickle.dumps(value, protocol=5))
        table = pa.table({**columns, "state": pa.array(states, pa.binary())})
        groups = key_groups_of(table.combine_chunks().to_batches()[0], self._keys, self._ctx.max_parallelism)
        return table.add_column(0, "key_group", pa.array(groups, pa.int32()))

    def _restore(self, table: pa.Table) -> None:
        owned = self._ctx.key_groups
        rows = table.to_pylist()
        for row in rows:
            if row["key_group"] in owned:
                self._state[tuple(row[k] for k in self._keys)] = pickle.loads(row["state"])  # noqa: S301

    def metrics(self) -> dict[str, int]:
        return {"keys": len(self._state)}



class _ProcessLogic(_KeyedLogic):
    def __init__(self, fn: ProcessFn, keys: Sequence[str], ctx: OperatorContext,
                 resume_state: pa.Table | None) -> None:
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
                 resume_state: pa.Table | None) -> None:
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

    def build(self, ctx: OperatorContext, resume_state: pa.Table | None = None) -> OperatorLogic:
        """Return the live logic."""
        return _ProcessLogic(self.fn, self.keys, ctx, resume_state)


@dataclass(frozen=True, slots=True)
class KeyedReduce:
    """Fold rows per key with ``fn(accumulated, row) -> accumulated``; emit every update.

    As Flink's ``KeyedStream.reduce``: the first row of a key is its
    accumulator; every later row emits the new accumulated row.
    """

    fn: ReduceFn
    keys: Sequence[str]

    def build(self, ctx: OperatorContext, resume_state: pa.Table | None = None) -> OperatorLogic:
        """Return the live logic."""
        return _ReduceLogic(self.fn, self.keys, ctx, resume_state)
