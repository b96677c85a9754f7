"""Key groups: stable, vectorised hash partitioning (as Flink's key groups).

A key hashes to one of ``max_parallelism`` key groups; key groups map to
subtasks in contiguous ranges. Keyed state is stored per key group, so
restoring at another parallelism is a re-assignment of key groups.

The hash is MurmurHash3 (x86, 32-bit) computed with numpy over a whole column:
for an integer key it equals ``mmh3.hash(int64_le_bytes, seed, signed=False)``,
for strings and binaries ``mmh3.hash(value_bytes, seed, signed=False)``. It is
stable across processes and machines, unlike Python's salted ``hash()``.

Example:
    >>> import pyarrow as pa
    >>> batch = pa.record_batch({"user_id": [1, 2, 3, 1]})
    >>> groups = key_groups_of(batch, ["user_id"], max_parallelism=128)
    >>> bool(groups[0] == groups[3])
    True
    >>> subtask_of_key_group(127, parallelism=2, max_parallelism=128)
    1

"""

from __future__ import annotations

from collections.abc import Sequence

import mmh3
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from checkpoint.errors import DataError

__all__ = [
    "DEFAULT_MAX_PARALLELISM",
    "hash64_columns",
    "hash_columns",
    "key_group_range",
    "key_groups_of",
    "murmur3_int64",
    "require_key_columns",
    "split_by_subtask",
    "subtask_of_key_group",
]

DEFAULT_MAX_PARALLELISM = 128
SEED = 0x0F1C_E5EE
SEED_LOW = 0x5EED_64B1
"""The seed of the low 32 bits of :func:`hash64_columns` (independent of :data:`SEED`)."""

_C1 = np.uint32(0xCC9E2D51)
_C2 = np.uint32(0x1B873593)


def _rotl(x: np.ndarray, r: int) -> np.ndarray:
    return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def _fmix32(h: np.ndarray) -> np.ndarray:
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0xC2B2AE35)
    h ^= h >> np.uint32(16)
    return h


def murmur3_int64(values: np.ndarray, seed: int = SEED) -> np.ndarray:
    """Return MurmurHash3_x86_32 of each value's 8 little-endian bytes.

    Args:
        values: an array of 8-byte values (int64, uint64 or float64).
        seed: the hash seed.

    Returns:
        A uint32 array equal to ``mmh3.hash(v.tobytes(), seed, signed=False)``.

    """
    words = np.ascontiguousarray(values).astype("<u8", copy=False).view("<u4").reshape(-1, 2)
    h = np.full(len(words), seed, dtype=np.uint32)
    for block in (words[:, 0], words[:, 1]):
        k = block * _C1
        k = _rotl(k, 15)
        k *= _C2
        h ^= k
        h = _rotl(h, 13)
        h = h * np.uint32(5) + np.uint32(0xE6546B64)
    h ^= np.uint32(8)
    return _fmix32(h)


def _hash_array(array: pa.Array, seed: int) -> np.ndarray:
    kind = array.type
    if pa.types.is_dictionary(kind):
        unique_hashes = _hash_array(array.dictionary, seed)
        indices = array.indices.fill_null(0).to_numpy(zero_copy_only=False)
        return unique_hashes[indices]
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind) or (
        pa.types.is_large_binary(kind)
    ):
        encoded = pc.dictionary_encode(array)
        uniques = encoded.dictionary.to_pylist()
        table = np.fromiter(
            (mmh3.hash(u if isinstance(u, bytes) else u.encode(), seed, signed=False) for u in uniques),
            dtype=np.uint32,
            count=len(uniques),
        )
        indices = encoded.indices.fill_null(0).to_numpy(zero_copy_only=False)
        return table[indices] if len(table) else np.zeros(len(array), dtype=np.uint32)
    if pa.types.is_floating(kind):
        floats = pc.cast(array.fill_null(0), pa.float64()).to_numpy(zero_copy_only=False)
        return murmur3_int64(floats.view(np.uint64), seed)
    if pa.types.is_integer(kind) or pa.types.is_boolean(kind) or pa.types.is_temporal(kind):
        ints = pc.cast(array.fill_null(0), pa.int64(), safe=False).to_numpy(zero_copy_only=False)
        return murmur3_int64(ints, seed)
    msg = f"cannot hash a key of type {kind}; use an integer, float, string, binary or temporal column"
    raise TypeError(msg)


def require_key_columns(schema: pa.Schema, columns: Sequence[str], *, operator: str) -> None:
    """Check that every key column is in ``schema``.

    Raises:
        DataError: a key column is missing; the message names the operator and column.
    """
    for column in columns:
        if schema.get_field_index(column) < 0:
            msg = (
                f"operator {operator!r}: key column {column!r} is missing from the input "
                f"(columns: {', '.join(schema.names)}); key by a column the stream has"
            )
            raise DataError(msg, operator=operator, column=column)


def hash_columns(batch: pa.RecordBatch, columns: Sequence[str], *, operator: str = "") -> np.ndarray:
    """Return a stable uint32 hash per row over the key ``columns``.

    Raises:
        DataError: a key column is missing or has a type that cannot be a key.

    """
    require_key_columns(batch.schema, columns, operator=operator)
    combined: np.ndarray | None = None
    for column in columns:
        array = batch.column(column)
        if isinstance(array, pa.ChunkedArray):
            array = array.combine_chunks()
        try:
            h = _hash_array(array, SEED)
        except TypeError as error:
            msg = f"operator {operator!r}: key column {column!r}: {error}"
            raise DataError(msg, operator=operator, column=column) from error
        if combined is None:
            combined = h
        else:
            pair = combined.astype(np.uint64) | (h.astype(np.uint64) << np.uint64(32))
            combined = murmur3_int64(pair, SEED)
    if combined is None:
        msg = f"operator {operator!r}: key_by needs at least one column"
        raise DataError(msg, operator=operator)
    return combined


def key_groups_of(
    batch: pa.RecordBatch,
    columns: Sequence[str],
    max_parallelism: int = DEFAULT_MAX_PARALLELISM,
    *,
    operator: str = "",
) -> np.ndarray:
    """Return the key group (``0 <= g < max_parallelism``) of every row."""
    return (hash_columns(batch, columns, operator=operator) % np.uint32(max_parallelism)).astype(np.int32)


def subtask_of_key_group(key_group: int, parallelism: int, max_parallelism: int) -> int:
    """Return the subtask that owns ``key_group`` (Flink's contiguous ranges)."""
    return key_group * parallelism // max_parallelism


def key_group_range(subtask: int, parallelism: int, max_parallelism: int) -> range:
    """Return the key groups that ``subtask`` owns, a contiguous range."""
    start = (subtask * max_parallelism + parallelism - 1) // parallelism
    end = ((subtask + 1) * max_parallelism + parallelism - 1) // parallelism
    return range(start, end)


def split_by_subtask(batch: pa.RecordBatch, subtasks: np.ndarray, parallelism: int) -> list[pa.RecordBatch | None]:
    """Split ``batch`` by the target subtask of each row, keeping row order.

    Returns:
        One batch per subtask (``None`` where no row goes there).

    """
    if parallelism == 1:
        return [batch]
    counts = np.bincount(subtasks, minlength=parallelism)
    order = np.argsort(subtasks, kind="stable")
    shuffled = batch.take(pa.array(order))
    parts: list[pa.RecordBatch | None] = []
    start = 0
    for count in counts.tolist():
        parts.append(shuffled.slice(start, count) if count else None)
        start += count
    return parts


def hash64_columns(batch: pa.RecordBatch, columns: Sequence[str], *, operator: str = "") -> np.ndarray:
    """Return a stable 64-bit hash per row over the key ``columns``.

    The high 32 bits are :func:`hash_columns` (so ``(h >> 32) % max_parallelism``
    is the row's key group) and the low 32 bits are the same MurmurHash3
    construction under an independent seed, :data:`SEED_LOW`. Two distinct
    keys collide only if both halves do: about ``2**-64`` per pair (``2**-57``
    for two keys already known to share one of 128 key groups). Nulls hash as
    zero, as in :func:`hash_columns`.

    Raises:
        DataError: a key column is missing or has a type that cannot be a key.

    Example:
        >>> import pyarrow as pa
        >>> batch = pa.record_batch({"id": [7, 8, 7]})
        >>> h = hash64_columns(batch, ["id"])
        >>> bool(h[0] == h[2]), bool(h[0] == h[1])
        (True, False)
        >>> bool((h >> np.uint64(32)).astype(np.uint32)[0] == hash_columns(batch, ["id"])[0])
        True

    """
    high = hash_columns(batch, columns, operator=operator)
    low: np.ndarray | None = None
    for column in columns:
        array = batch.column(column)
        if isinstance(array, pa.ChunkedArray):
            array = array.combine_chunks()
        h = _hash_array(array, SEED_LOW)
        if low is None:
            low = h
        else:
            pair = low.astype(np.uint64) | (h.astype(np.uint64) << np.uint64(32))
            low = murmur3_int64(pair, SEED_LOW)
    assert low is not None  # hash_columns rejected an empty column list
    return (high.astype(np.uint64) << np.uint64(32)) | low.astype(np.uint64)
