"""Tests for onceflow.operators.agg: the aggregation configs and the grouped reduction."""

from __future__ import annotations

import pickle

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onceflow.errors import DataError, PlanError
from onceflow.operators import agg
from onceflow.operators.agg import _reduce_arrow, _reduce_numpy, reduce_groups
from onceflow.operators.logic import OperatorContext
from onceflow.operators.windows import Tumbling, WindowAggregate

ALL_REDUCTIONS = [
    ("rows", None, "count_all"),
    ("valid", "v", "count"),
    ("total", "v", "sum"),
    ("low", "v", "min"),
    ("high", "v", "max"),
]


# --- the configs ------------------------------------------------------------------------------


def test_factories_describe_input_partials_and_combine() -> None:
    assert agg.count().column is None
    assert [(p.suffix, p.accumulate, p.combine) for p in agg.count().partials] == [("count", "count_all", "sum")]
    assert [(p.suffix, p.accumulate, p.combine) for p in agg.sum("x").partials] == [("sum", "sum", "sum")]
    assert [(p.suffix, p.accumulate, p.combine) for p in agg.min("x").partials] == [("min", "min", "min")]
    assert [(p.suffix, p.accumulate, p.combine) for p in agg.max("x").partials] == [("max", "max", "max")]
    assert [(p.suffix, p.accumulate, p.combine) for p in agg.mean("x").partials] == [
        ("sum", "sum", "sum"),
        ("count", "count", "sum"),
    ]
    assert [agg.sum("x").column, agg.min("x").column, agg.max("x").column, agg.mean("x").column] == ["x"] * 4


def test_configs_are_frozen_comparable_and_picklable() -> None:
    for aggregation in (agg.count(), agg.sum("a"), agg.min("a"), agg.max("a"), agg.mean("a")):
        assert pickle.loads(pickle.dumps(aggregation)) == aggregation
    assert agg.sum("a") == agg.sum("a")
    assert agg.sum("a") != agg.sum("b")
    assert agg.sum("a") != agg.mean("a")
    assert repr(agg.mean("amount")) == "mean('amount')"
    with pytest.raises(AttributeError):
        agg.sum("a").column = "b"  # type: ignore[misc]


@pytest.mark.parametrize("bad", [3, "", None])
def test_factories_reject_a_bad_column_name(bad: object) -> None:
    with pytest.raises(PlanError, match="needs the name of an input column"):
        agg.sum(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("aggregation", "input_type", "accumulated"),
    [
        (agg.sum("v"), pa.int8(), pa.int64()),
        (agg.sum("v"), pa.uint32(), pa.int64()),
        (agg.sum("v"), pa.float32(), pa.float64()),
        (agg.mean("v"), pa.int32(), pa.float64()),
        (agg.min("v"), pa.int16(), pa.int16()),
        (agg.max("v"), pa.float32(), pa.float32()),
        (agg.min("v"), pa.string(), pa.string()),
        (agg.max("v"), pa.timestamp("us"), pa.timestamp("us")),
        (agg.count(), pa.string(), None),
    ],
)
def test_input_type(aggregation: agg.Aggregation, input_type: pa.DataType, accumulated: pa.DataType | None) -> None:
    assert aggregation.input_type(pa.schema({"v": input_type}), operator="window_1") == accumulated


@pytest.mark.parametrize("aggregation", [agg.sum("v"), agg.mean("v")])
def test_a_numeric_aggregation_rejects_strings(aggregation: agg.Aggregation) -> None:
    with pytest.raises(DataError) as caught:
        aggregation.input_type(pa.schema({"v": pa.string()}), operator="window_1")
    message = str(caught.value)
    assert caught.value.operator == "window_1"
    assert caught.value.column == "v"
    assert "'window_1'" in message and "'v'" in message and "type string" in message
    assert "integer or floating-point" in message and message.endswith("before aggregating")
    assert message == message.lower()


def test_min_rejects_a_nested_column() -> None:
    with pytest.raises(DataError, match="needs a numeric, temporal"):
        agg.min("v").input_type(pa.schema({"v": pa.list_(pa.int64())}), operator="w")


def test_a_missing_or_duplicated_input_column_is_a_data_error() -> None:
    with pytest.raises(DataError) as caught:
        agg.sum("amount").input_type(pa.schema({"x": pa.int64()}), operator="window_1")
    assert caught.value.column == "amount"
    assert str(caught.value) == (
        "operator 'window_1': sum('amount') reads column 'amount', which is missing from the input "
        "(columns: x); aggregate a column the stream has exactly once"
    )
    duplicated = pa.schema([("v", pa.int64()), ("v", pa.int64())])
    with pytest.raises(DataError, match="appears more than once"):
        agg.max("v").input_type(duplicated, operator="w")


def test_finalize() -> None:
    assert agg.sum("v").finalize([pa.array([1, None])]).to_pylist() == [1, None]
    mean = agg.mean("v").finalize([pa.array([3.0, None, 1.0]), pa.array([2, 0, 4])])
    assert mean.type == pa.float64()
    assert mean.to_pylist() == [1.5, None, 0.25]


# --- reduce_groups ----------------------------------------------------------------------------


def test_reduce_groups_numeric_path_exact() -> None:
    table = pa.table({"k": pa.array([3, 1, 3, 1, 2], pa.int32()), "v": pa.array([5, None, -2, 7, None], pa.int16())})
    reduced = _reduce_numpy(table, ["k"], ALL_REDUCTIONS)
    assert reduced is not None
    assert reduced.schema == pa.schema(
        [
            ("k", pa.int32()),
            ("rows", pa.int64()),
            ("valid", pa.int64()),
            ("total", pa.int64()),
            ("low", pa.int16()),
            ("high", pa.int16()),
        ]
    )
    assert reduced.to_pylist() == [
        {"k": 1, "rows": 2, "valid": 1, "total": 7, "low": 7, "high": 7},
        {"k": 2, "rows": 1, "valid": 0, "total": None, "low": None, "high": None},
        {"k": 3, "rows": 2, "valid": 2, "total": 3, "low": -2, "high": 5},
    ]
    assert reduce_groups(table, ["k"], ALL_REDUCTIONS).equals(_reduce_arrow(table, ["k"], ALL_REDUCTIONS))


def test_reduce_groups_sorts_by_every_group_column_nulls_last() -> None:
    table = pa.table({"a": ["y", "x", None, "x", "y"], "b": [2, 9, 1, 1, 2], "v": [1.5, 2.0, 4.0, 8.0, 0.25]})
    reduced = reduce_groups(table, ["a", "b"], [("n", None, "count_all"), ("s", "v", "sum")])
    assert reduced.to_pylist() == [
        {"a": "x", "b": 1, "n": 1, "s": 8.0},
        {"a": "x", "b": 9, "n": 1, "s": 2.0},
        {"a": "y", "b": 2, "n": 2, "s": 1.75},
        {"a": None, "b": 1, "n": 1, "s": 4.0},
    ]


def test_reduce_groups_string_min_max_and_empty_input() -> None:
    table = pa.table({"k": [1, 1, 2], "s": ["pear", "apple", None]})
    reduced = reduce_groups(table, ["k"], [("lo", "s", "min"), ("hi", "s", "max")])
    assert reduced.to_pylist() == [{"k": 1, "lo": "apple", "hi": "pear"}, {"k": 2, "lo": None, "hi": None}]
    empty = reduce_groups(table.slice(0, 0), ["k"], [("n", None, "count_all"), ("lo", "s", "min")])
    assert empty.num_rows == 0
    assert empty.schema == pa.schema([("k", pa.int64()), ("n", pa.int64()), ("lo", pa.string())])


def test_reduce_groups_keys_too_wide_to_pack() -> None:
    wide = pa.table({"a": [2**62, -(2**62), 2**62, -(2**62)], "b": [2, 1, 2, 3], "v": [1.0, 2.0, 3.0, 4.0]})
    expected = [
        {"a": -(2**62), "b": 1, "s": 2.0},
        {"a": -(2**62), "b": 3, "s": 4.0},
        {"a": 2**62, "b": 2, "s": 4.0},
    ]
    assert reduce_groups(wide, ["a", "b"], [("s", "v", "sum")]).to_pylist() == expected
    assert _reduce_arrow(wide, ["a", "b"], [("s", "v", "sum")]).to_pylist() == expected


def test_reduce_groups_falls_back_for_float_keys_and_string_values() -> None:
    table = pa.table({"f": [0.5, -1.0, 0.5], "s": ["b", "a", "c"]})
    assert _reduce_numpy(table, ["f"], [("n", None, "count_all")]) is None
    assert (
        _reduce_numpy(
            table.rename_columns(["k", "s"]).set_column(0, "k", pa.array([1, 1, 2])), ["k"], [("lo", "s", "min")]
        )
        is None
    )
    assert reduce_groups(table, ["f"], [("lo", "s", "min")]).to_pylist() == [
        {"f": -1.0, "lo": "a"},
        {"f": 0.5, "lo": "b"},
    ]


def test_reduce_groups_rejects_bad_arguments() -> None:
    table = pa.table({"k": [1]})
    with pytest.raises(ValueError, match="at least one group column"):
        reduce_groups(table, [], [("n", None, "count_all")])
    with pytest.raises(ValueError, match="unknown reduction 'median'"):
        reduce_groups(table, ["k"], [("n", "k", "median")])


KEY_COLUMNS = {
    "small": (st.integers(-3, 3), pa.int8()),
    "wide": (st.sampled_from([-(2**63), -1, 0, 2**62, 2**63 - 1]), pa.int64()),
    "unsigned": (st.sampled_from([0, 1, 2**64 - 1]), pa.uint64()),
    "nullable": (st.none() | st.integers(0, 2), pa.int32()),
    "text": (st.none() | st.sampled_from(["", "a", "ab", "b", "\u00e9"]), pa.string()),
    "flag": (st.none() | st.booleans(), pa.bool_()),
    "stamp": (st.none() | st.integers(-5, 5), pa.timestamp("ms")),
}


@settings(max_examples=80, deadline=None)
@given(
    key_names=st.lists(st.sampled_from(sorted(KEY_COLUMNS)), min_size=1, max_size=3, unique=True),
    data=st.data(),
)
def test_numpy_and_arrow_paths_agree(key_names: list[str], data: st.DataObject) -> None:
    size = data.draw(st.integers(1, 40), label="rows")
    columns = {
        name: pa.array(
            data.draw(st.lists(KEY_COLUMNS[name][0], min_size=size, max_size=size), label=name), KEY_COLUMNS[name][1]
        )
        for name in key_names
    }
    ints = st.none() | st.integers(-(2**31), 2**31)
    floats = st.none() | st.floats(-1e6, 1e6, allow_nan=False)
    columns["i"] = pa.array(data.draw(st.lists(ints, min_size=size, max_size=size), label="i"), pa.int64())
    columns["f"] = pa.array(data.draw(st.lists(floats, min_size=size, max_size=size), label="f"), pa.float64())
    table = pa.table(columns)
    reductions = [("n", None, "count_all")] + [
        (f"{column}_{function}", column, function)
        for column in ("i", "f")
        for function in ("count", "sum", "min", "max")
    ]
    fast = _reduce_numpy(table, key_names, reductions)
    assert fast is not None
    slow = _reduce_arrow(table, key_names, reductions)
    assert fast.schema == slow.schema
    for name in fast.column_names:
        if name == "f_sum":
            np.testing.assert_allclose(
                np.asarray(fast.column(name).to_pylist(), dtype=float),
                np.asarray(slow.column(name).to_pylist(), dtype=float),
                rtol=1e-9,
                atol=1e-6,
            )
        else:
            assert fast.column(name).to_pylist() == slow.column(name).to_pylist(), name


# --- every aggregation through a window, exact values and output types ------------------------


def _window_output(values: pa.Array, aggregates: dict[str, agg.Aggregation]) -> pa.RecordBatch:
    op = WindowAggregate(Tumbling(10), keys=["k"], time_column="t", aggregates=aggregates)
    logic = op.build(OperatorContext("window_1"))
    batch = pa.record_batch({"k": [1, 1, 2, 1], "t": [0, 1, 2, 3], "v": values})
    assert logic.on_batch(batch) == []
    ((port, out),) = logic.on_eof()
    assert port == 0
    return out


def test_every_aggregation_on_integers() -> None:
    out = _window_output(
        pa.array([4, None, 7, -1], pa.int32()),
        {"n": agg.count(), "s": agg.sum("v"), "lo": agg.min("v"), "hi": agg.max("v"), "m": agg.mean("v")},
    )
    assert out.schema.types == [
        pa.int64(),
        pa.int64(),
        pa.int64(),
        pa.int64(),
        pa.int64(),
        pa.int32(),
        pa.int32(),
        pa.float64(),
    ]
    assert out.to_pylist() == [
        {"k": 1, "window_start": 0, "window_end": 10, "n": 3, "s": 3, "lo": -1, "hi": 4, "m": 1.5},
        {"k": 2, "window_start": 0, "window_end": 10, "n": 1, "s": 7, "lo": 7, "hi": 7, "m": 7.0},
    ]


def test_every_aggregation_on_floats() -> None:
    out = _window_output(
        pa.array([0.5, 2.0, None, 0.25], pa.float32()),
        {"s": agg.sum("v"), "lo": agg.min("v"), "hi": agg.max("v"), "m": agg.mean("v"), "n": agg.count()},
    )
    assert [f.type for f in out.schema][3:] == [pa.float64(), pa.float32(), pa.float32(), pa.float64(), pa.int64()]
    assert out.to_pylist() == [
        {"k": 1, "window_start": 0, "window_end": 10, "s": 2.75, "lo": 0.25, "hi": 2.0, "m": 2.75 / 3, "n": 3},
        {"k": 2, "window_start": 0, "window_end": 10, "s": None, "lo": None, "hi": None, "m": None, "n": 1},
    ]


def test_min_max_of_strings_and_timestamps() -> None:
    out = _window_output(pa.array(["kiwi", "fig", "date", None]), {"lo": agg.min("v"), "hi": agg.max("v")})
    assert out.column("lo").to_pylist() == ["fig", "date"]
    assert out.column("hi").to_pylist() == ["kiwi", "date"]
    stamps = pa.array([5, 1, 9, 3], pa.timestamp("ms"))
    out = _window_output(stamps, {"first": agg.min("v"), "last": agg.max("v")})
    assert out.schema.field("first").type == pa.timestamp("ms")
    assert out.column("first").cast(pa.int64()).to_pylist() == [1, 9]
    assert out.column("last").cast(pa.int64()).to_pylist() == [5, 9]
