"""Tests for onceflow.operators.seen_ids: the exact and bloom dedupe modes on their own."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from onceflow.errors import DataError
from onceflow.operators.keygroups import key_group_range
from onceflow.operators.logic import OperatorContext
from onceflow.operators.seen_ids import BloomSeenIds, ExactSeenIds, SeenIds, remap_generation

CTX = OperatorContext("dedupe_1")


def ctx(subtask: int, parallelism: int) -> OperatorContext:
    return OperatorContext("dedupe_1", subtask, parallelism, 128, key_group_range(subtask, parallelism, 128))


def bloom(context: OperatorContext = CTX, span: int = 100) -> BloomSeenIds:
    return BloomSeenIds(context, span, expected_items=3_000, generations=4, fp_rate=0.01)


def keys(values: list[int]) -> np.ndarray:
    return np.array(values, dtype=np.uint64)


def gens(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def test_seen_ids_is_abstract() -> None:
    with pytest.raises(TypeError):
        SeenIds(CTX, 100)  # type: ignore[abstract]


@pytest.mark.parametrize(("generation", "span", "to_span", "expected"), [(3, 100, 100, 3), (1, 1_000, 300, 6)])
def test_remap_generation_outlives_the_old_one(generation: int, span: int, to_span: int, expected: int) -> None:
    target = remap_generation(generation, span, to_span)
    assert target == expected
    assert (target + 1) * to_span >= (generation + 1) * span  # it ends no earlier


# --- exact ---------------------------------------------------------------------------------------------


def test_exact_keys_are_the_ids_own_bits_for_one_integer_column_and_hashes_otherwise() -> None:
    ints = ExactSeenIds(CTX, 100)
    assert ints.keys_of(pa.record_batch({"id": [3, -1]}), ["id"]).tolist() == [3, 2**64 - 1]
    assert ints.key_encoding == "value"
    strings = ExactSeenIds(CTX, 100)
    hashed = strings.keys_of(pa.record_batch({"id": ["a", "b"]}), ["id"])
    assert hashed.dtype == np.uint64 and hashed[0] != hashed[1] and strings.key_encoding == "hash64"
    assert ExactSeenIds(CTX, 100).key_encoding == ""


def test_exact_refuses_an_id_type_that_changes_the_encoding() -> None:
    ids = ExactSeenIds(CTX, 100)
    ids.keys_of(pa.record_batch({"id": [1]}), ["id"])
    with pytest.raises(DataError, match=r"dedup column 'id' changed type to string.*cast it before dedupe") as info:
        ids.keys_of(pa.record_batch({"id": ["1"]}), ["id"])
    assert info.value.column == "id"


def test_exact_remembers_unseen_keys_in_their_generations_and_forgets_expired_ones() -> None:
    ids = ExactSeenIds(CTX, 100)
    assert ids.add_unseen(keys([1, 2, 3]), gens(0, 1, 1)).tolist() == [True, True, True]
    assert ids.add_unseen(keys([2, 4]), gens(5, 5)).tolist() == [False, True]
    assert ids.generation_count == 3
    assert ids.generation_metrics() == {"items_g0": 1, "items_g1": 2, "items_g2": 1}
    assert ids.state_bytes == 4 * 8
    ids.expire(oldest=1)
    assert ids.add_unseen(keys([1, 2]), gens(6, 6)).tolist() == [True, False]


def test_exact_state_restores_by_key_group_at_another_parallelism() -> None:
    ids = ExactSeenIds(CTX, 100)
    values = list(range(200))
    ids.keys_of(pa.record_batch({"id": values}), ["id"])
    ids.add_unseen(keys(values), np.zeros(200, dtype=np.int64))
    state = ids.state()
    assert state.schema.names == ["key_group", "subtask", "generation", "key"] and state.num_rows == 200
    # the snapshot's metadata carries the encoding (the logic writes it); restore reads it from there
    state = state.replace_schema_metadata({b"onceflow.key_encoding": b"value"})
    halves = [ExactSeenIds(ctx(subtask, 2), 100) for subtask in range(2)]
    for half in halves:
        half.restore(state, span=100)
        assert half.key_encoding == "value"
    found = [half.add_unseen(keys(values), np.zeros(200, dtype=np.int64)) for half in halves]
    assert np.logical_xor(found[0], found[1]).all()  # every id remembered by exactly one subtask
    assert 0 < np.count_nonzero(~found[0]) < 200


def test_exact_restore_refuses_snapshots_of_two_encodings() -> None:
    ids = ExactSeenIds(CTX, 100)
    empty = ExactSeenIds.schema.empty_table()
    ids.restore(empty.replace_schema_metadata({b"onceflow.key_encoding": b"value"}), span=100)
    with pytest.raises(DataError, match="stores ids as hash64, another snapshot as value"):
        ids.restore(empty.replace_schema_metadata({b"onceflow.key_encoding": b"hash64"}), span=100)


def test_exact_restore_moves_keys_into_generations_of_the_new_span() -> None:
    old = ExactSeenIds(CTX, 1_000)
    old.add_unseen(keys([7]), gens(1))
    new = ExactSeenIds(CTX, 300)
    new.restore(old.state(), span=1_000)
    new.expire(oldest=6)
    assert new.add_unseen(keys([7]), gens(9)).tolist() == [False]
    new.expire(oldest=7)
    assert new.add_unseen(keys([7]), gens(9)).tolist() == [True]


# --- bloom ---------------------------------------------------------------------------------------------


def test_bloom_sizes_a_filter_for_the_subtasks_share_of_a_generation() -> None:
    ids = BloomSeenIds(ctx(0, 4), 100, expected_items=120_000, generations=4, fp_rate=0.01)
    assert ids.capacity == 10_000
    assert ids.num_bits > 10_000 and ids.num_hashes >= 1


def test_bloom_keys_are_hashes_of_every_id_column() -> None:
    ids = bloom()
    batch = pa.record_batch({"a": [1, 1], "b": ["x", "y"]})
    hashed = ids.keys_of(batch, ["a", "b"])
    assert hashed.dtype == np.uint64 and hashed[0] != hashed[1]
    assert ids.key_encoding == ""


def test_bloom_has_no_false_negatives_and_forgets_expired_generations() -> None:
    ids = bloom()
    values = keys(list(range(1_000)))
    assert ids.add_unseen(values, np.repeat(gens(0, 1), 500)).all()
    assert not ids.add_unseen(values, np.zeros(1_000, dtype=np.int64)).any()
    assert ids.generation_count == 2
    metrics = ids.generation_metrics()
    assert metrics["items_g0"] == 500 and metrics["items_g1"] == 500
    assert {"fill_ratio_g0", "fp_rate_g1", "estimated_fp_rate"} <= set(metrics)
    assert ids.state_bytes == 2 * ((ids.num_bits + 63) // 64 * 8)
    ids.expire(oldest=1)
    assert ids.generation_count == 1
    assert ids.add_unseen(values[:500], np.ones(500, dtype=np.int64)).sum() > 490  # bar the odd false positive


def test_bloom_state_comes_back_as_its_own_filters_at_the_same_key_groups() -> None:
    ids = bloom()
    ids.add_unseen(keys([1, 2]), gens(0, 3))
    state = ids.state()
    assert state.schema.names == BloomSeenIds.schema.names and state.num_rows == 2
    assert state.column("key_group").to_pylist() == [-1, -1]
    assert state.column("items").to_pylist() == [1, 1]
    restored = bloom()
    restored.restore(state, span=100)
    assert all(entry.own is not None and not entry.inherited for entry in restored.generations.values())
    assert not restored.add_unseen(keys([1, 2]), gens(3, 3)).any()


def test_bloom_state_is_inherited_read_only_at_other_key_groups() -> None:
    ids = bloom(ctx(0, 2))
    ids.add_unseen(keys([1, 2]), gens(0, 0))
    state = ids.state()
    wider, other = bloom(ctx(0, 1)), bloom(ctx(1, 2))
    wider.restore(state, span=100)
    other.restore(state, span=100)  # does not overlap subtask 0's key groups: nothing to keep
    [entry] = wider.generations.values()
    assert entry.own is None and len(entry.inherited) == 1
    assert not wider.add_unseen(keys([1, 2]), gens(0, 0)).any()
    assert wider.add_unseen(keys([3]), gens(0)).all()
    assert entry.own is not None  # new ids go into a fresh filter of its own
    assert other.generation_count == 0
