"""Key groups: the vectorised hash equals mmh3, ranges cover every group once."""

from __future__ import annotations

import mmh3
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st

from onceflow.errors import DataError
from onceflow.operators.keygroups import (
    SEED,
    hash_columns,
    key_group_range,
    key_groups_of,
    murmur3_int64,
    split_by_subtask,
    subtask_of_key_group,
)


@given(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=50), st.integers(0, 2**32 - 1))
def test_vectorised_murmur3_equals_mmh3(values: list[int], seed: int) -> None:
    hashes = murmur3_int64(np.array(values, dtype=np.int64), seed)
    expected = [mmh3.hash(v.to_bytes(8, "little", signed=True), seed, signed=False) for v in values]
    assert hashes.tolist() == expected


def test_string_keys_hash_like_mmh3_and_are_stable() -> None:
    batch = pa.record_batch({"s": ["alice", "bob", "alice"]})
    assert hash_columns(batch, ["s"]).tolist() == [
        mmh3.hash(b"alice", SEED, signed=False),
        mmh3.hash(b"bob", SEED, signed=False),
        mmh3.hash(b"alice", SEED, signed=False),
    ]


def test_multi_column_keys_depend_on_every_column() -> None:
    batch = pa.record_batch({"a": [1, 1, 2], "b": ["x", "y", "x"]})
    h = hash_columns(batch, ["a", "b"])
    assert len(set(h.tolist())) == 3


@pytest.mark.parametrize(("parallelism", "max_parallelism"), [(1, 128), (2, 128), (3, 128), (7, 10), (10, 10)])
def test_ranges_partition_the_key_groups(parallelism: int, max_parallelism: int) -> None:
    seen = []
    for subtask in range(parallelism):
        groups = key_group_range(subtask, parallelism, max_parallelism)
        assert all(subtask_of_key_group(g, parallelism, max_parallelism) == subtask for g in groups)
        seen += list(groups)
    assert seen == list(range(max_parallelism))


def test_missing_key_column_names_operator_and_column() -> None:
    with pytest.raises(DataError, match=r"operator 'key_by_1': key column 'user' is missing") as info:
        key_groups_of(pa.record_batch({"id": [1]}), ["user"], operator="key_by_1")
    assert info.value.column == "user"


def test_unhashable_key_type_is_a_clear_error() -> None:
    batch = pa.record_batch({"l": pa.array([[1], [2]])})
    with pytest.raises(DataError, match="key column 'l'"):
        hash_columns(batch, ["l"], operator="k")


def test_split_by_subtask_keeps_row_order_within_each_part() -> None:
    batch = pa.record_batch({"x": list(range(10))})
    targets = np.array([1, 0, 1, 2, 0, 2, 1, 0, 0, 1])
    parts = split_by_subtask(batch, targets, 4)
    assert [p.column(0).to_pylist() if p is not None else None for p in parts] == [
        [1, 4, 7, 8], [0, 2, 6, 9], [3, 5], None]


@given(st.lists(st.one_of(st.none(), st.text(max_size=3)), min_size=1, max_size=8),
       st.sampled_from([pa.string(), pa.large_string(), pa.string_view(), pa.dictionary(pa.int32(), pa.string())]))
def test_a_key_hashes_alike_alone_and_among_any_other_rows(values: list[str | None], kind: pa.DataType) -> None:
    together = hash_columns(pa.record_batch({"k": pa.array(values, kind)}), ["k"])
    alone = [hash_columns(pa.record_batch({"k": pa.array([v], kind)}), ["k"])[0] for v in values]
    assert together.tolist() == alone


def test_split_by_subtask_takes_view_typed_columns() -> None:
    batch = pa.record_batch({"s": pa.array(["a", "b", None, "d"], pa.string_view()),
                             "b": pa.array([b"w", None, b"y", b"z"], pa.binary_view())})
    parts = split_by_subtask(batch, np.array([1, 0, 1, 0]), 2)
    assert [p.schema if p is not None else None for p in parts] == [batch.schema, batch.schema]
    assert [p.to_pydict() if p is not None else None for p in parts] == [
        {"s": ["b", "d"], "b": [None, b"z"]}, {"s": ["a", None], "b": [b"w", b"y"]}]
