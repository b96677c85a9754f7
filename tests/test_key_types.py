"""Keyed state lands in exactly the key groups its rows were routed to, for every key type.

The router hashes each row's key columns to a key group; every keyed operator
(``process``/``reduce``, window aggregations, exact dedupe) must snapshot its
state under that same key group and restore it, at any parallelism, into the
subtask that routing sends the key's later rows to.
"""

from __future__ import annotations

import datetime as dt
import decimal
import pickle
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import onceflow as of
from onceflow.checkpoint.storage import CheckpointStorage
from onceflow.errors import DataError
from onceflow.operators import agg
from onceflow.operators.dedupe import Dedupe
from onceflow.operators.keyed import KeyedProcess, KeyedReduce
from onceflow.operators.keygroups import (
    hash64_columns,
    hash_columns,
    key_group_range,
    key_groups_of,
    require_key_columns,
    split_by_subtask,
    subtask_of_key_group,
    take_rows,
)
from onceflow.operators.logic import MAIN, OperatorContext, OperatorLogic
from onceflow.operators.windows import Tumbling, WindowAggregate

MAX_PARALLELISM = 128


def route(batch: pa.RecordBatch, keys: Sequence[str], parallelism: int) -> list[pa.RecordBatch | None]:
    """Split ``batch`` across ``parallelism`` subtasks as the runtime's keyed exchange does."""
    if parallelism == 1:
        require_key_columns(batch.schema, keys, operator="key_by_1")
        return [batch]
    groups = hash_columns(batch, keys, operator="key_by_1") % np.uint32(MAX_PARALLELISM)
    owner = np.zeros(MAX_PARALLELISM, dtype=np.int64)
    for subtask in range(parallelism):
        owner[list(key_group_range(subtask, parallelism, MAX_PARALLELISM))] = subtask
    return split_by_subtask(batch, owner[groups], parallelism)


def ctx_of(operator: str, subtask: int, parallelism: int) -> OperatorContext:
    return OperatorContext(operator, subtask, parallelism, MAX_PARALLELISM,
                           key_group_range(subtask, parallelism, MAX_PARALLELISM))


def count(state: Any, row: dict[str, Any]) -> tuple[Any, None]:
    return (state or 0) + 1, None


def keyed_counts(snapshot: pa.Table | None, keys: Sequence[str]) -> dict[tuple[Any, ...], int]:
    if snapshot is None:
        return {}
    columns = [snapshot.column(k).to_pylist() for k in keys]
    states = [pickle.loads(s) for s in snapshot.column("state").to_pylist()]
    return dict(zip(zip(*columns, strict=True), states, strict=True))


# --- regression tests, one per bug ---------------------------------------------------------------------


def timestamp_batch(unit: str = "ms") -> pa.RecordBatch:
    return pa.record_batch({"t": pa.array(range(0, 16_000, 1_000), pa.timestamp(unit)),
                            "v": pa.array(range(16), pa.int64())})


def test_process_keyed_by_a_timestamp_ms_column_restores_every_key_where_routing_sends_it() -> None:
    data = timestamp_batch()
    old = [KeyedProcess(count, ["t"]).build(ctx_of("process_1", s, 2)) for s in range(2)]
    for logic, part in zip(old, route(data, ["t"], 2), strict=True):
        if part is not None:
            logic.on_batch(part)
    snapshots = [s for s in (logic.snapshot() for logic in old) if s is not None]
    new = [KeyedProcess(count, ["t"]).build(ctx_of("process_1", s, 2), resume_state=pa.concat_tables(snapshots))
           for s in range(2)]
    for logic, part in zip(new, route(data, ["t"], 2), strict=True):
        if part is not None:
            logic.on_batch(part)
    counts: dict[tuple[Any, ...], int] = {}
    for logic in new:
        counts.update(keyed_counts(logic.snapshot(), ["t"]))
    assert sorted(counts.values()) == [2] * 16, counts


def test_keyed_snapshot_keeps_the_key_columns_arrow_types_and_routing_key_groups() -> None:
    data = timestamp_batch("ms")
    logic = KeyedReduce(lambda acc, row: row, ["t"]).build(ctx_of("reduce_1", 0, 1))
    logic.on_batch(data)
    snapshot = logic.snapshot()
    assert snapshot is not None
    assert snapshot.schema.field("t").type == pa.timestamp("ms")
    groups = dict(zip(data.column("t").to_pylist(), key_groups_of(data, ["t"]).tolist(), strict=True))
    assert dict(zip(snapshot.column("t").to_pylist(), snapshot.column("key_group").to_pylist(),
                    strict=True)) == groups


def test_a_null_string_key_hashes_the_same_in_every_batch() -> None:
    first = hash_columns(pa.record_batch({"s": pa.array(["a", None], pa.string())}), ["s"])
    second = hash_columns(pa.record_batch({"s": pa.array(["b", None], pa.string())}), ["s"])
    alone = hash_columns(pa.record_batch({"s": pa.array([None], pa.string())}), ["s"])
    assert first[1] == second[1] == alone[0]
    assert first[0] != first[1]


def test_a_null_key_hashes_the_same_in_every_column_type() -> None:
    kinds = [pa.null(), pa.int64(), pa.string(), pa.large_binary(), pa.timestamp("ms"), pa.decimal128(5, 2),
             pa.dictionary(pa.int32(), pa.string()), pa.float64(), pa.bool_()]
    hashes = {hash_columns(pa.record_batch({"k": pa.array([None], kind)}), ["k"])[0] for kind in kinds}
    assert len(hashes) == 1


def test_window_rows_with_a_null_string_key_meet_in_one_subtask_whatever_else_is_in_their_batch() -> None:
    # "a" and "c" fall into different subtasks at parallelism 2: the null rows must not follow them.
    owners = {s: subtask_of_key_group(int(key_groups_of(pa.record_batch({"k": [s]}), ["k"])[0]), 2, 128)
              for s in ("a", "c")}
    assert owners["a"] != owners["c"]
    op = WindowAggregate(Tumbling(10), keys=["k"], time_column="t", aggregates={"n": agg.count()})
    logics = [op.build(ctx_of("window_1", s, 2)) for s in range(2)]
    for keys in (["a", None], ["c", None]):
        data = pa.record_batch({"k": pa.array(keys, pa.string()), "t": pa.array([1, 2], pa.int64())})
        for logic, part in zip(logics, route(data, ["k"], 2), strict=True):
            if part is not None:
                logic.on_batch(part)
    rows = [r for logic in logics for _, out in logic.on_eof() for r in out.to_pylist()]
    assert sorted((r["k"] or "", r["n"]) for r in rows) == [("", 2), ("a", 1), ("c", 1)]


@pytest.mark.parametrize("build", [
    lambda: KeyedProcess(count, ["d"]).build(ctx_of("process_1", 0, 1)),
    lambda: WindowAggregate(Tumbling(10), keys=["d"], time_column="t",
                            aggregates={"n": agg.count()}).build(ctx_of("window_1", 0, 1)),
], ids=["process", "window"])
def test_decimal_keys_snapshot_and_restore_at_parallelism_one(build: Callable[[], OperatorLogic]) -> None:
    data = pa.record_batch({"d": pa.array([decimal.Decimal("1.50"), None, decimal.Decimal("-2.25")],
                                          pa.decimal128(6, 2)),
                            "t": pa.array([1, 2, 3], pa.int64())})
    route(data, ["d"], 1)  # passes routing at parallelism 1 ...
    logic = build()
    logic.on_batch(data)
    snapshot = logic.snapshot()  # ... and must not fail at the first snapshot
    assert snapshot is not None
    assert snapshot.column("key_group").to_pylist() == [
        dict(zip(data.column("d").to_pylist(), key_groups_of(data, ["d"]).tolist(), strict=True))[d]
        for d in snapshot.column("d").to_pylist()]


def test_all_null_keys_snapshot_and_restore_at_parallelism_one() -> None:
    data = pa.record_batch({"k": pa.array([None, None], pa.null()), "v": [1, 2]})
    route(data, ["k"], 1)
    logic = KeyedProcess(count, ["k"]).build(ctx_of("process_1", 0, 1))
    logic.on_batch(data)
    snapshot = logic.snapshot()
    assert snapshot is not None
    restored = KeyedProcess(count, ["k"]).build(ctx_of("process_1", 0, 1), resume_state=snapshot)
    assert keyed_counts(restored.snapshot(), ["k"]) == {(None,): 2}


def test_negative_zero_and_zero_are_one_key() -> None:
    data = pa.record_batch({"f": pa.array([0.0, -0.0], pa.float64())})
    assert hash_columns(data, ["f"])[0] == hash_columns(data, ["f"])[1]
    assert hash64_columns(data, ["f"])[0] == hash64_columns(data, ["f"])[1]


FLOAT_KEYS = st.lists(st.sampled_from([0.0, -0.0, float("nan"), float("-nan"), 1.5, -1.5, float("inf")]),
                      min_size=1, max_size=40)


def canonical(value: float) -> float | str:
    """What one key is, as routing sees it: every NaN alike, -0.0 as 0.0."""
    return "nan" if value != value else value + 0.0


@settings(max_examples=60, deadline=None)
@given(FLOAT_KEYS, st.integers(1, 3), st.integers(1, 7))
def test_float_keys_count_as_routing_groups_them_in_every_keyed_operator(keys: list[float], parallelism: int,
                                                                          batch_size: int) -> None:
    """NaN keys are one key (not one per row), -0.0 and 0.0 are one key: in process, reduce and windows."""
    expected = Counter(canonical(k) for k in keys)
    data = pa.record_batch({"f": pa.array(keys, pa.float64()), "t": pa.array(range(len(keys)), pa.int64()),
                            "n": pa.array([1] * len(keys), pa.int64())})
    batches = [data.slice(i, batch_size) for i in range(0, len(keys), batch_size)]
    builders: dict[str, Callable[[OperatorContext], OperatorLogic]] = {
        "process": lambda ctx: KeyedProcess(count, ["f"]).build(ctx),
        "reduce": lambda ctx: KeyedReduce(lambda a, r: {**r, "n": a["n"] + r["n"]}, ["f"]).build(ctx),
        "window": lambda ctx: WindowAggregate(Tumbling(10**6), keys=["f"], time_column="t",
                                              aggregates={"n": agg.count()}).build(ctx),
    }
    for name, build in builders.items():
        logics = [build(ctx_of(name, s, parallelism)) for s in range(parallelism)]
        found: Counter[float | str] = Counter()
        for batch in batches:
            for logic, part in zip(logics, route(batch, ["f"], parallelism), strict=True):
                if part is None:
                    continue
                for port, out in logic.on_batch(part):
                    if name == "reduce" and port == MAIN:
                        for row in out.to_pylist():
                            found[canonical(row["f"])] = max(found[canonical(row["f"])], row["n"])
        if name == "process":
            for logic in logics:
                for key, n in keyed_counts(logic.snapshot(), ["f"]).items():
                    found[canonical(key[0])] += n
        if name == "window":
            for logic in logics:
                for _, out in logic.on_eof():
                    for row in out.to_pylist():
                        found[canonical(row["f"])] += row["n"]
        assert found == expected, name


@pytest.mark.parametrize("kind", [pa.list_(pa.int64()), pa.struct([("a", pa.int64())]),
                                  pa.month_day_nano_interval(), pa.map_(pa.string(), pa.int64())],
                         ids=str)
@pytest.mark.parametrize("parallelism", [1, 2])
def test_a_key_type_the_router_cannot_hash_is_refused_at_the_first_batch(kind: pa.DataType,
                                                                         parallelism: int) -> None:
    data = pa.record_batch({"k": pa.array([None, None], kind), "v": [1, 2]})
    expected = r"operator 'key_by_1': key column 'k' has type .*, which cannot be a key; key by .*decimal"
    with pytest.raises(DataError, match=expected) as info:
        route(data, ["k"], parallelism)
    assert info.value.column == "k"
    with pytest.raises(DataError, match=r"operator 'process_1': key column 'k' has type"):
        KeyedProcess(count, ["k"]).build(ctx_of("process_1", 0, 1)).on_batch(data)


def test_nanosecond_keys_python_cannot_hold_are_a_clear_error_in_process() -> None:
    data = pa.record_batch({"t": pa.array([1, 2], pa.timestamp("ns"))})
    with pytest.raises(DataError, match=r"operator 'process_1': .*column 't'.*timestamp\[us\]"):
        KeyedProcess(count, ["t"]).build(ctx_of("process_1", 0, 1)).on_batch(data)


# --- the property: snapshot -> restore -> routing agree, for every key type --------------------------


@dataclass(frozen=True)
class KeyType:
    """An Arrow key type and the Python values (never null) that build arrays of it."""

    arrow: pa.DataType
    values: st.SearchStrategy[Any]


def _ints(bits: int, signed: bool = True) -> st.SearchStrategy[int]:
    return st.integers(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else st.integers(0, 2**bits - 1)


_SECONDS = 6 * 10**10  # datetime holds years 1 to 9999: +-6e10 s from the epoch, at every unit


def _decimals(precision: int, scale: int) -> st.SearchStrategy[decimal.Decimal]:
    bound = decimal.Decimal(10) ** (precision - scale - 1)
    return st.decimals(min_value=-bound, max_value=bound, places=scale, allow_nan=False, allow_infinity=False)


KEY_TYPES = [
    *(KeyType(getattr(pa, f"int{b}")(), _ints(b)) for b in (8, 16, 32, 64)),
    *(KeyType(getattr(pa, f"uint{b}")(), _ints(b, signed=False)) for b in (8, 16, 32, 64)),
    KeyType(pa.bool_(), st.booleans()),
    KeyType(pa.float32(), st.floats(width=32, allow_nan=False)),
    KeyType(pa.float64(), st.floats(allow_nan=False)),
    KeyType(pa.decimal32(7, 2), _decimals(7, 2)),
    KeyType(pa.decimal64(15, 3), _decimals(15, 3)),
    KeyType(pa.decimal128(20, 4), _decimals(20, 4)),
    KeyType(pa.decimal256(50, 6), _decimals(50, 6)),
    KeyType(pa.string(), st.text(max_size=4)),
    KeyType(pa.large_string(), st.text(max_size=4)),
    KeyType(pa.string_view(), st.text(max_size=20)),
    KeyType(pa.binary(), st.binary(max_size=4)),
    KeyType(pa.large_binary(), st.binary(max_size=4)),
    KeyType(pa.binary_view(), st.binary(max_size=20)),
    KeyType(pa.binary(3), st.binary(min_size=3, max_size=3)),
    KeyType(pa.dictionary(pa.int32(), pa.string()), st.text(max_size=4)),
    *(KeyType(pa.timestamp(unit), st.integers(-_SECONDS, _SECONDS)) for unit in ("s", "ms", "us")),
    KeyType(pa.timestamp("ns"), st.integers(-(2**62) // 1000, 2**62 // 1000).map(lambda us: us * 1000)),
    KeyType(pa.timestamp("ms", tz="UTC"), st.integers(-_SECONDS, _SECONDS)),
    KeyType(pa.timestamp("us", tz="America/New_York"), st.integers(-_SECONDS, _SECONDS)),
    KeyType(pa.date32(), st.dates()),
    KeyType(pa.date64(), st.dates()),
    KeyType(pa.time32("s"), st.integers(0, 86_399)),
    KeyType(pa.time32("ms"), st.integers(0, 86_399_999)),
    KeyType(pa.time64("us"), st.times()),
    KeyType(pa.time64("ns"), st.integers(0, 86_399_999_999).map(lambda us: us * 1000)),
    *(KeyType(pa.duration(unit), st.integers(-_SECONDS, _SECONDS)) for unit in ("s", "ms", "us")),
    KeyType(pa.duration("ns"), st.integers(-(2**62) // 1000, 2**62 // 1000).map(lambda us: us * 1000)),
    KeyType(pa.null(), st.none()),
]


@dataclass(frozen=True)
class Case:
    """A keyed input: several batches of the same schema, and the parallelism before and after restore."""

    keys: list[str]
    batches: list[pa.RecordBatch]
    old_parallelism: int
    new_parallelism: int


@st.composite
def cases(draw: st.DrawFn) -> Case:
    kinds = draw(st.lists(st.sampled_from(KEY_TYPES), min_size=1, max_size=3))
    keys = [f"k{i}" for i in range(len(kinds))]
    pools = []
    for kind in kinds:
        pool = draw(st.lists(kind.values, min_size=1, max_size=4, unique_by=_python_identity))
        pools.append([*pool, None])  # every column may be null
    batches = []
    for _ in range(draw(st.integers(1, 3))):
        rows = draw(st.lists(st.tuples(*(st.sampled_from(pool) for pool in pools)), min_size=1, max_size=12))
        columns = {key: pa.array([row[i] for row in rows], kind.arrow) for i, (key, kind) in enumerate(
            zip(keys, kinds, strict=True))}
        columns["t"] = pa.array(range(len(rows)), pa.int64())
        batches.append(pa.record_batch(columns))
    return Case(keys, batches, draw(st.integers(1, 4)), draw(st.integers(1, 4)))


def _python_identity(value: Any) -> Hashable:
    """Values equal in Python are one key to ``process`` (``-0.0 == 0.0``): draw one of them."""
    return value if not isinstance(value, float) or value else 0.0


def python_keys(batch: pa.RecordBatch, keys: Sequence[str]) -> list[tuple[Any, ...]]:
    return list(zip(*(batch.column(k).to_pylist() for k in keys), strict=True))


def routed_key_groups(case: Case) -> dict[tuple[Any, ...], int]:
    """Each key's key group as routing computes it; a key must hash alike in every batch."""
    seen: dict[tuple[Any, ...], set[int]] = defaultdict(set)
    for batch in case.batches:
        for key, group in zip(python_keys(batch, case.keys), key_groups_of(batch, case.keys).tolist(), strict=True):
            seen[key].add(group)
    assert all(len(groups) == 1 for groups in seen.values()), dict(seen)
    return {key: groups.pop() for key, groups in seen.items()}


def run_round(logics: list[OperatorLogic], case: Case, parallelism: int,
              select: Callable[[pa.RecordBatch], pa.RecordBatch] = lambda b: b) -> list[pa.RecordBatch]:
    """Route every batch of ``case`` into ``logics``; return what they emitted on MAIN."""
    out = []
    for batch in case.batches:
        batch = select(batch)
        if batch.num_rows == 0:
            continue
        for logic, part in zip(logics, route(batch, case.keys, parallelism), strict=True):
            if part is not None:
                out += [b for port, b in logic.on_batch(part) if port == MAIN]
    return out


def restored(build: Callable[[OperatorContext, Any], OperatorLogic], operator: str, snapshots: list[pa.Table],
             parallelism: int, *, concatenate: bool) -> list[OperatorLogic]:
    """New subtasks, each given every old subtask's snapshot (one concatenated table or the list)."""
    state: Any = pa.concat_tables(snapshots) if concatenate and snapshots else snapshots or None
    return [build(ctx_of(operator, s, parallelism), state) for s in range(parallelism)]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_process_state_restores_into_the_subtask_routing_sends_each_key_to(case: Case) -> None:
    groups = routed_key_groups(case)
    expected = Counter(key for batch in case.batches for key in python_keys(batch, case.keys))

    def build(ctx: OperatorContext, state: Any) -> OperatorLogic:
        return KeyedProcess(count, case.keys).build(ctx, resume_state=state)

    old = [build(ctx_of("process_1", s, case.old_parallelism), None) for s in range(case.old_parallelism)]
    run_round(old, case, case.old_parallelism)
    snapshots = [s for s in (logic.snapshot() for logic in old) if s is not None]
    new = restored(build, "process_1", snapshots, case.new_parallelism, concatenate=True)
    for rounds in (1, 2):
        found: dict[tuple[Any, ...], int] = {}
        for subtask, logic in enumerate(new):
            snapshot = logic.snapshot()
            if snapshot is None:
                continue
            for key in case.keys:
                assert snapshot.schema.field(key).type == case.batches[0].schema.field(key).type
            owned = key_group_range(subtask, case.new_parallelism, MAX_PARALLELISM)
            stored = dict(zip(python_keys(snapshot, case.keys), snapshot.column("key_group").to_pylist(),
                              strict=True))
            for key, n in keyed_counts(snapshot, case.keys).items():
                assert key not in found, f"{key} restored into two subtasks"
                assert stored[key] == groups[key] and stored[key] in owned
                found[key] = n
        assert found == {key: n * rounds for key, n in expected.items()}
        if rounds == 1:
            run_round(new, case, case.new_parallelism)  # later rows find the restored state


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_window_state_restores_into_the_subtask_routing_sends_each_key_to(case: Case) -> None:
    if any(pa.types.is_null(kind) for kind in case.batches[0].schema.types):
        with pytest.raises(DataError, match="which cannot be a key"):
            run_round([WindowAggregate(Tumbling(1_000), keys=case.keys, time_column="t",
                                       aggregates={"n": agg.count()}).build(ctx_of("window_1", 0, 1))], case, 1)
        return
    groups = routed_key_groups(case)
    expected = Counter(key for batch in case.batches for key in python_keys(batch, case.keys))
    op = WindowAggregate(Tumbling(1_000), keys=case.keys, time_column="t", aggregates={"n": agg.count()})

    def build(ctx: OperatorContext, state: Any) -> OperatorLogic:
        return op.build(ctx, resume_state=state)

    old = [build(ctx_of("window_1", s, case.old_parallelism), None) for s in range(case.old_parallelism)]
    run_round(old, case, case.old_parallelism)
    snapshots = [logic.snapshot() for logic in old]
    for snapshot in snapshots:
        stored = python_keys(snapshot, case.keys) if snapshot.num_rows else []
        assert [groups[key] for key in stored] == snapshot.column("key_group").to_pylist()
    new = restored(build, "window_1", snapshots, case.new_parallelism, concatenate=False)
    run_round(new, case, case.new_parallelism)
    found: Counter[tuple[Any, ...]] = Counter()
    for subtask, logic in enumerate(new):
        owned = key_group_range(subtask, case.new_parallelism, MAX_PARALLELISM)
        for _, out in logic.on_eof():
            for key, n in zip(python_keys(out, case.keys), out.column("n").to_pylist(), strict=True):
                assert groups[key] in owned
                found[key] += n
    assert found == Counter({key: 2 * n for key, n in expected.items()})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_exact_dedupe_state_restores_into_the_subtask_routing_sends_each_id_to(case: Case) -> None:
    def no_nulls(batch: pa.RecordBatch) -> pa.RecordBatch:
        valid = np.ones(batch.num_rows, dtype=bool)
        for key in case.keys:
            valid &= batch.column(key).is_valid().to_numpy(zero_copy_only=False)
        return take_rows(batch, np.flatnonzero(valid))

    op = Dedupe(case.keys, within_ms=10_000, time_column="t", mode="exact")

    def build(ctx: OperatorContext, state: Any) -> OperatorLogic:
        return op.build(ctx, resume_state=state)

    old = [build(ctx_of("dedupe_1", s, case.old_parallelism), None) for s in range(case.old_parallelism)]
    passed = run_round(old, case, case.old_parallelism, no_nulls)
    ids = {key for batch in case.batches for key in python_keys(no_nulls(batch), case.keys)}
    assert sorted(map(repr, (k for b in passed for k in python_keys(b, case.keys)))) == sorted(map(repr, ids))
    snapshots = [logic.snapshot() for logic in old]
    new = restored(build, "dedupe_1", snapshots, case.new_parallelism, concatenate=True)
    assert run_round(new, case, case.new_parallelism, no_nulls) == []  # every id is remembered where it goes


# --- through a real crash --------------------------------------------------------------------------------


class _CrashAfterACheckpoint(of.sources.Source):
    """A TestingSource that reaches its ``ABORT()`` only once a checkpoint holding every earlier row completed."""

    def __init__(self, inner: of.sources.TestingSource, abort_index: int, storage: str, job: str) -> None:
        self.inner, self.abort_index, self.storage, self.job = inner, abort_index, storage, job

    def build(self, ctx: Any, resume_offset: Any = None) -> of.sources.SourceReader:
        return _HeldReader(self.inner.build(ctx, resume_offset), self.abort_index,
                           CheckpointStorage(self.storage, self.job))

    def max_parallelism(self) -> int:
        return 1


class _HeldReader(of.sources.SourceReader):
    def __init__(self, inner: of.sources.SourceReader, abort_index: int, storage: CheckpointStorage) -> None:
        self._inner, self._abort_index, self._storage = inner, abort_index, storage
        self._wait_for: int | None = None

    def read(self) -> Any:
        offset = self._inner.offset()
        if offset["index"] == self._abort_index and self._abort_index not in offset["aborted"]:
            newest = max(self._storage.completed_ids(), default=0)
            if self._wait_for is None:
                self._wait_for = newest + 2  # at most one checkpoint in flight: this one started after the rows
            if newest < self._wait_for:
                return of.sources.Idle(0.02)
        return self._inner.read()

    def offset(self) -> Any:
        return self._inner.offset()

    def close(self) -> None:
        self._inner.close()


@pytest.mark.usefixtures("ray_session")
def test_process_keyed_by_timestamp_ms_keeps_every_count_through_a_crash(tmp_path: Path) -> None:
    start = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    rows = [{"t": start + dt.timedelta(milliseconds=i % 16), "v": i} for i in range(320)]
    schema = pa.schema([("t", pa.timestamp("ms", tz="UTC")), ("v", pa.int64())])
    items = [*rows[:160], of.sources.TestingSource.ABORT(), *rows[160:]]
    storage = str(tmp_path / "chk")
    flow = of.Dataflow("keys-ts-abort")
    source = _CrashAfterACheckpoint(of.sources.TestingSource(items, batch_size=40, schema=schema), 160, storage,
                                    "keys-ts-abort")
    sink = of.sinks.TestingSink()

    def running_count(n: int | None, row: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        n = (n or 0) + 1
        return n, {"t": row["t"], "v": row["v"], "n": n}

    flow.source(source).key_by("t").process(running_count).sink(sink)
    result = of.run(flow, parallelism=2, checkpoint=of.CheckpointConfig(interval_s=0.05, storage=storage),
                    restart=of.RestartStrategy.fixed_delay(attempts=2, delay_s=0.05))
    assert result.metrics["restarts"] == 1
    committed = sorted((r["v"], r["n"]) for r in sink.rows())
    assert committed == [(i, i // 16 + 1) for i in range(320)]
