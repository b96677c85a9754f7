"""Tests for onceflow.operators.bloom and keygroups.hash64_columns: sizing, no false negatives, fp rate, snapshots."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onceflow.errors import DataError
from onceflow.operators.bloom import BloomFilter, first_occurrences, optimal_num_bits, optimal_num_hashes, probe_hashes
from onceflow.operators.keygroups import hash64_columns, hash_columns


def random_keys(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2**63, n, dtype=np.int64).view(np.uint64)


# --- sizing --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "p", "bits", "hashes"), [
    (1_000_000, 0.01, 9_585_059, 7),
    (1_000_000, 0.001, 14_377_588, 10),
    (1, 0.5, 2, 1),
    (100, 0.9, 22, 1),  # m / n * ln 2 = 0.15 would round to 0 probes: clamped to 1
])
def test_standard_sizing_formulas(n: int, p: float, bits: int, hashes: int) -> None:
    assert optimal_num_bits(n, p) == bits == math.ceil(-n * math.log(p) / math.log(2) ** 2)
    bloom = BloomFilter.for_capacity(n, p)
    assert (bloom.num_bits, bloom.num_hashes, bloom.capacity) == (bits, hashes, n)
    assert bloom.nbytes == (bits + 63) // 64 * 8


@given(n=st.integers(1, 10**9), p=st.floats(1e-9, 0.999999))
def test_number_of_hashes_is_never_zero(n: int, p: float) -> None:
    bits = optimal_num_bits(n, p)
    assert bits >= 1
    assert optimal_num_hashes(bits, n) >= 1
    assert optimal_num_hashes(1, n) == 1


@pytest.mark.parametrize(("n", "p"), [(0, 0.01), (-5, 0.01), (10, 0.0), (10, 1.0), (10, 1.5), (True, 0.1)])
def test_bad_sizing_is_rejected(n: int, p: float) -> None:
    with pytest.raises(ValueError, match="bloom filter"):
        BloomFilter.for_capacity(n, p)


def test_bad_shapes_are_rejected() -> None:
    with pytest.raises(ValueError, match="num_bits"):
        BloomFilter(0, 3)
    with pytest.raises(ValueError, match="num_hashes"):
        BloomFilter(64, 0)
    with pytest.raises(ValueError, match="bytes"):
        BloomFilter(128, 3, np.zeros(24, dtype=np.uint8))
    with pytest.raises(ValueError, match="bytes"):
        BloomFilter(128, 3, np.zeros(2, dtype=np.uint64))


# --- membership ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 63, 64, 65, 1_000, 1 << 20])
def test_no_false_negatives_at_any_size(bits: int) -> None:
    bloom = BloomFilter(bits, 5)
    keys = random_keys(20_000, seed=bits)
    for chunk in np.array_split(keys, 7):
        bloom.add(*probe_hashes(chunk))
    assert bloom.contains(*probe_hashes(keys)).all()
    assert bloom.items == len(keys)
    assert 0 < bloom.set_bits() <= bits


def test_both_ways_of_setting_bits_give_the_same_filter() -> None:
    """A big batch unpacks the filter to a byte per bit; small batches or bits in place."""
    keys = random_keys(30_000, seed=8)
    big, small = BloomFilter.for_capacity(30_000, 0.01), BloomFilter.for_capacity(30_000, 0.01)
    big.add(*probe_hashes(keys))
    for chunk in np.array_split(keys, 300):
        small.add(*probe_hashes(chunk))
    assert big.num_bits <= 16 * 30_000 * big.num_hashes and big.num_bits > 16 * 100 * small.num_hashes
    assert big.to_bytes() == small.to_bytes() and big.items == small.items == 30_000


def test_contains_is_false_on_an_empty_filter_and_for_no_keys() -> None:
    bloom = BloomFilter.for_capacity(1_000, 0.01)
    assert not bloom.contains(*probe_hashes(random_keys(100, 1))).any()
    empty = np.empty(0, dtype=np.uint64)
    assert bloom.contains(empty, empty).shape == (0,)
    assert bloom.add_and_check(empty, empty).shape == (0,)
    bloom.add(empty, empty)
    assert bloom.items == 0 and bloom.fill_ratio() == 0.0 and bloom.estimated_fp_rate() == 0.0


def test_add_and_check_reports_repeats_within_one_batch() -> None:
    bloom = BloomFilter.for_capacity(10_000, 0.001)
    keys = np.array([7, 8, 7, 7, 9, 8, 10], dtype=np.uint64)
    assert bloom.add_and_check(*probe_hashes(keys)).tolist() == [False, False, True, True, False, True, False]
    assert bloom.items == 4
    again = np.array([10, 11, 11, 7], dtype=np.uint64)
    assert bloom.add_and_check(*probe_hashes(again)).tolist() == [True, False, True, True]
    assert bloom.items == 5


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 40), max_size=30), max_size=6))
def test_add_and_check_never_misses_a_repeat_and_matches_a_set_with_a_roomy_filter(batches: list[list[int]]) -> None:
    bloom = BloomFilter.for_capacity(10_000, 1e-6)  # 41 keys at most: no false positive in practice
    seen: set[int] = set()
    for batch in batches:
        expected = []
        for key in batch:
            expected.append(key in seen)
            seen.add(key)
        got = bloom.add_and_check(*probe_hashes(np.array(batch, dtype=np.uint64)))
        assert got.tolist() == expected


@pytest.mark.parametrize("p", [0.01, 0.001])
def test_false_positive_rate_at_the_designed_load_is_within_2x(p: float) -> None:
    n = 200_000
    bloom = BloomFilter.for_capacity(n, p)
    keys = random_keys(n + 400_000, seed=42)
    members, strangers = keys[:n], keys[n:]
    for chunk in np.array_split(members, 20):
        assert not bloom.add_and_check(*probe_hashes(chunk)).all()
    measured = float(bloom.contains(*probe_hashes(strangers)).mean())
    assert p / 2 <= measured <= 2 * p, measured
    assert 0.45 <= bloom.fill_ratio() <= 0.55  # an optimally loaded filter is half full
    assert p / 2 <= bloom.estimated_fp_rate() <= 2 * p


def test_false_positive_rate_grows_beyond_the_designed_load() -> None:
    bloom = BloomFilter.for_capacity(10_000, 0.01)
    bloom.add(*probe_hashes(random_keys(40_000, seed=3)))
    assert bloom.estimated_fp_rate() > 0.2
    assert bloom.contains(*probe_hashes(random_keys(20_000, seed=4))).mean() > 0.2


def test_snapshot_bytes_round_trip() -> None:
    bloom = BloomFilter.for_capacity(5_000, 0.01)
    keys = random_keys(5_000, seed=9)
    bloom.add(*probe_hashes(keys))
    data = bloom.to_bytes()
    assert len(data) == bloom.nbytes
    restored = BloomFilter.from_bytes(data, bloom.num_bits, bloom.num_hashes, items=bloom.items, capacity=5_000)
    assert restored.contains(*probe_hashes(keys)).all()
    assert restored.set_bits() == bloom.set_bits() and restored.items == 5_000
    restored.add(*probe_hashes(random_keys(10, seed=10)))  # writable, and independent of the original
    assert bloom.to_bytes() == data
    with pytest.raises(ValueError, match="bytes"):
        BloomFilter.from_bytes(data[:-8], bloom.num_bits, bloom.num_hashes)


def test_probe_start_and_step_stay_in_range_for_small_and_huge_filters() -> None:
    h1, h2 = probe_hashes(random_keys(50_000, seed=11))
    for bits in (1, 2, 7, 1_000, 2**32, 2**32 + 1, 2**40 + 3):
        bloom = BloomFilter(64, 1)
        bloom.num_bits = bits  # only the arithmetic: no 2**40-bit allocation
        first, step = bloom._start(h1, h2)
        assert first.min() >= 0 and first.max() < bits
        assert step.min() >= min(1, bits - 1) and step.max() < max(bits, 2)
        if bits >= 1_000:  # spread over the whole range
            assert first.max() > 0.9 * bits and step.max() > 0.9 * bits


# --- first occurrences ---------------------------------------------------------------------------------


@given(st.lists(st.integers(0, 2**64 - 1) | st.integers(0, 5)))
def test_first_occurrences_matches_a_sequential_loop(values: list[int]) -> None:
    seen: set[int] = set()
    expected = []
    for value in values:
        expected.append(value not in seen)
        seen.add(value)
    assert first_occurrences(np.array(values, dtype=np.uint64)).tolist() == expected


# --- stable 64-bit hashes ------------------------------------------------------------------------------


def test_hash64_high_half_is_the_key_group_hash_and_halves_are_independent() -> None:
    batch = pa.record_batch({"id": list(range(10_000)), "s": [f"user-{i % 777}" for i in range(10_000)]})
    for columns in (["id"], ["s"], ["s", "id"]):
        h = hash64_columns(batch, columns)
        assert h.dtype == np.uint64
        assert np.array_equal((h >> np.uint64(32)).astype(np.uint32), hash_columns(batch, columns))
        low = (h & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        assert not np.array_equal(low, hash_columns(batch, columns))
    ids = hash64_columns(batch, ["id"])
    assert len(np.unique(ids)) == 10_000
    assert len(np.unique(hash64_columns(batch, ["s"]))) == 777


def test_hash64_is_stable_across_processes() -> None:
    """Unlike Python's salted hash(): the same ids give the same hashes in a fresh process."""
    code = (
        "import pyarrow as pa; from onceflow.operators.keygroups import hash64_columns; "
        "print(hash64_columns(pa.record_batch({'s': ['a', 'bc'], 'i': [1, -2]}), ['s', 'i']).tolist())"
    )
    outputs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={"PYTHONHASHSEED": seed, "PATH": ""}).stdout
        for seed in ("1", "2")
    }
    here = hash64_columns(pa.record_batch({"s": ["a", "bc"], "i": [1, -2]}), ["s", "i"]).tolist()
    assert outputs == {f"{here}\n"}


def test_hash64_missing_column_names_the_operator_and_column() -> None:
    with pytest.raises(DataError, match=r"'dedupe_1'.*'nope'") as caught:
        hash64_columns(pa.record_batch({"id": [1]}), ["nope"], operator="dedupe_1")
    assert caught.value.column == "nope"
