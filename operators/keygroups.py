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
from typing import Any, TypeVar

import mmh3
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from onceflow.errors import DataError

_Rows = TypeVar("_Rows", pa.RecordBatch, pa.Table)
"""A record batch or a table (what :func:`take_rows` takes and returns)."""

__all__ = [
    "DEFAULT_MAX_PARALLELISM",
    "KEY_TYPES_ACCEPTED",
    "NAN_KEY",
    "canonical_float_keys",
    "canonical_key",
    "hash64_columns",
    "hash_columns",
    "in_key_groups",
    "int64_values",
    "is_key_type",
    "key_group_range",
    "key_groups_of",
    "murmur3_int64",
    "require_key_columns",
    "split_by_subtask",
    "subtask_of_key_group",
    "take_rows",
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


KEY_TYPES_ACCEPTED = (
    "integer, float, decimal, boolean, string, binary, date, time, timestamp or duration columns "
    "(plain or dictionary-encoded, nulls allowed)"
)
"""The key column types :func:`hash_columns` accepts, as error messages name them."""


def _is_bytes(kind: pa.DataType) -> bool:
    return (
        pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or pa.types.is_string_view(kind)
        or pa.types.is_binary(kind)
        or pa.types.is_large_binary(kind)
        or pa.types.is_binary_view(kind)
        or pa.types.is_fixed_size_binary(kind)
    )


def _is_temporal(kind: pa.DataType) -> bool:
    return (
        pa.types.is_timestamp(kind) or pa.types.is_date(kind) or pa.types.is_time(kind)
        or pa.types.is_duration(kind)
    )


def is_key_type(kind: pa.DataType) -> bool:
    """Whether a column of type ``kind`` can be a key (see :data:`KEY_TYPES_ACCEPTED`).

    Example:
        >>> is_key_type(pa.timestamp("ms")), is_key_type(pa.list_(pa.int64()))
        (True, False)

    """
    if isinstance(kind, pa.BaseExtensionType):
        return is_key_type(kind.storage_type)
    if pa.types.is_dictionary(kind):
        return is_key_type(kind.value_type)
    return (
        pa.types.is_null(kind)
        or pa.types.is_boolean(kind)
        or pa.types.is_integer(kind)
        or pa.types.is_floating(kind)
        or pa.types.is_decimal(kind)
        or _is_bytes(kind)
        or _is_temporal(kind)
    )


def _null_hash(seed: int) -> np.uint32:
    """The hash of a null key: that of the integer 0, in every column type."""
    return murmur3_int64(np.zeros(1, dtype=np.int64), seed)[0]


def _chain(words: np.ndarray, seed: int) -> np.ndarray:
    """Hash rows of several 8-byte words: each word's hash folded into the running one."""
    h = murmur3_int64(words[:, 0], seed)
    for j in range(1, words.shape[1]):
        pair = h.astype(np.uint64) | (murmur3_int64(words[:, j], seed).astype(np.uint64) << np.uint64(32))
        h = murmur3_int64(pair, seed)
    return h


def _hash_decimal(array: pa.Array, seed: int) -> np.ndarray:
    """Hash the unscaled value: 128-bit two's complement (256-bit for decimal256)."""
    kind = array.type
    if kind.bit_width < 128:
        array = array.cast(pa.decimal128(38, kind.scale))
    width = array.type.bit_width // 64
    buffer = array.buffers()[1]
    if buffer is None:
        return np.zeros(len(array), dtype=np.uint32)
    words = np.frombuffer(buffer, dtype="<u8")[array.offset * width : (array.offset + len(array)) * width]
    return _chain(words.reshape(-1, width), seed)


def int64_values(array: pa.Array) -> np.ndarray:
    """Return an integer, boolean or temporal array's values as int64 (nulls as 0).

    A temporal value is its count of its own unit (days for ``date32``);
    unsigned values above ``2**63 - 1`` wrap around.

    Example:
        >>> int64_values(pa.array([1, None], pa.date32())).tolist()
        [1, 0]

    """
    kind = array.type
    if _is_temporal(kind):
        array = array.view(pa.int32() if kind.bit_width == 32 else pa.int64())
    return pc.cast(array, pa.int64(), safe=False).fill_null(0).to_numpy(zero_copy_only=False)


def _hash_array(array: pa.Array, seed: int) -> np.ndarray:
    """Hash every value of ``array``; a value's hash depends on its type and value only.

    Integers, booleans and temporal values hash as their int64 value (a
    timestamp in its own unit), floats as their float64 bits (``-0.0`` as
    ``0.0``, every NaN alike), decimals as their unscaled value, strings and
    binaries as their bytes, dictionary values as their value; a null as the
    integer 0, whatever the column's type.
    """
    kind = array.type
    if isinstance(kind, pa.BaseExtensionType):
        return _hash_array(array.storage, seed)
    if pa.types.is_null(kind):
        return np.full(len(array), _null_hash(seed), dtype=np.uint32)
    if pa.types.is_dictionary(kind):
        unique_hashes = _hash_array(array.dictionary, seed)
        indices = array.indices.fill_null(0).to_numpy(zero_copy_only=False)
        h = unique_hashes[indices] if len(unique_hashes) else np.zeros(len(array), dtype=np.uint32)
    elif _is_bytes(kind):
        encoded = pc.dictionary_encode(array)
        uniques = encoded.dictionary.to_pylist()
        table = np.fromiter(
            (mmh3.hash(u if isinstance(u, bytes) else u.encode(), seed, signed=False) for u in uniques),
            dtype=np.uint32,
            count=len(uniques),
        )
        indices = encoded.indices.fill_null(0).to_numpy(zero_copy_only=False)
        h = table[indices] if len(table) else np.zeros(len(array), dtype=np.uint32)
    elif pa.types.is_floating(kind):
        floats = pc.cast(array.fill_null(0), pa.float64()).to_numpy(zero_copy_only=False) + 0.0  # -0.0 -> 0.0
        floats[np.isnan(floats)] = np.nan
        h = murmur3_int64(floats.view(np.uint64), seed)
    elif pa.types.is_decimal(kind):
        h = _hash_decimal(array, seed)
    elif pa.types.is_integer(kind) or pa.types.is_boolean(kind) or _is_temporal(kind):
        h = murmur3_int64(int64_values(array), seed)
    else:
        msg = f"cannot hash a key of type {kind}; key by {KEY_TYPES_ACCEPTED}"
        raise TypeError(msg)
    if array.null_count:
        h = np.where(array.is_valid().to_numpy(zero_copy_only=False), h, _null_hash(seed))
    return h


NAN_KEY = float("nan")
"""The one NaN every NaN key becomes in Python: a dict finds it by identity, where ``nan != nan``."""


def canonical_key(value: Any) -> Any:
    """A key value as keyed state holds it: every NaN is :data:`NAN_KEY` (``-0.0`` already equals ``0.0``).

    Routing hashes every NaN alike and ``-0.0`` as ``0.0``; state must group them the same way.

    Example:
        >>> canonical_key(float("nan")) is canonical_key(float("-nan")), canonical_key(2)
        (True, 2)
    """
    return NAN_KEY if isinstance(value, float) and value != value else value


def canonical_float_keys(column: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """A floating key column with ``-0.0`` as ``0.0`` (Arrow groups NaNs together, but not the two zeros)."""
    if not pa.types.is_floating(column.type):
        return column
    return pc.add(column, pa.scalar(0.0, column.type))


def require_key_columns(schema: pa.Schema, columns: Sequence[str], *, operator: str) -> None:
    """Check that every key column is in ``schema`` and has a type that can be a key.

    The keyed exchange calls this on every batch it does not hash (at
    parallelism 1), so a key the hash could not take is refused at the first
    batch at any parallelism.

    Raises:
        DataError: a key column is missing or has a type that cannot be a
            key; the message names the operator and column.

    """
    for column in columns:
        index = schema.get_field_index(column)
        if index < 0:
            msg = (
                f"operator {operator!r}: key column {column!r} is missing from the input "
                f"(columns: {', '.join(schema.names)}); key by a column the stream has"
            )
            raise DataError(msg, operator=operator, column=column)
        kind = schema.field(index).type
        if not is_key_type(kind):
            msg = (
                f"operator {operator!r}: key column {column!r} has type {kind}, which cannot be a key; "
                f"key by {KEY_TYPES_ACCEPTED}, or cast the column to one of them first"
            )
            raise DataError(msg, operator=operator, column=column)


def hash_columns(batch: pa.RecordBatch, columns: Sequence[str], *, operator: str = "") -> np.ndarray:
    """Return a stable uint32 hash per row over the key ``columns``.

    A value's hash depends on its type and value only, never on the other
    rows of the batch; a null hashes alike in every column type.

    Raises:
        DataError: a key column is missing or has a type that cannot be a key.

    """
    require_key_columns(batch.schema, columns, operator=operator)
    combined: np.ndarray | None = None
    for column in columns:
        array = batch.column(column)
        if isinstance(array, pa.ChunkedArray):
            array = array.combine_chunks()
        h = _hash_array(array, SEED)
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


def in_key_groups(groups: np.ndarray, owned: range) -> np.ndarray:
    """Return, per stored key group, whether it lies in ``owned`` (a subtask's range).

    Example:
        >>> in_key_groups(np.array([0, 63, 64, 127]), key_group_range(1, 2, 128)).tolist()
        [False, False, True, True]

    """
    if owned.step == 1:
        return (groups >= owned.start) & (groups < owned.stop)
    return np.isin(groups, np.asarray(owned))


def take_rows(batch: _Rows, indices: pa.Array | np.ndarray) -> _Rows:
    """Return the rows at ``indices`` of a batch or table, view-typed columns included.

    Arrow has no take or filter kernel for ``string_view`` and ``binary_view``
    columns; those go through their large type and back, so every column type
    a key may have can be split and filtered.

    Example:
        >>> batch = pa.record_batch({"s": pa.array(["a", "b", "c"], pa.string_view())})
        >>> take_rows(batch, np.array([2, 0])).column("s").to_pylist()
        ['c', 'a']

    """
    indices = pa.array(indices) if isinstance(indices, np.ndarray) else indices
    views = {
        i: field.type for i, field in enumerate(batch.schema)
        if pa.types.is_string_view(field.type) or pa.types.is_binary_view(field.type)
    }
    if not views:
        return batch.take(indices)
    arrays = []
    for i, column in enumerate(batch.columns):
        if i in views:
            wide = pa.large_string() if pa.types.is_string_view(views[i]) else pa.large_binary()
            arrays.append(column.cast(wide).take(indices).cast(views[i]))
        else:
            arrays.append(column.take(indices))
    if isinstance(batch, pa.Table):
        return pa.Table.from_arrays(arrays, schema=batch.schema)
    return pa.RecordBatch.from_arrays(arrays, schema=batch.schema)


def split_by_subtask(batch: pa.RecordBatch, subtasks: np.ndarray, parallelism: int) -> list[pa.RecordBatch | None]:
    """Split ``batch`` by the target subtask of each row, keeping row order.

    Returns:
        One batch per subtask (``None`` where no row goes there).

    """
    if parallelism == 1:
        return [batch]
    counts = np.bincount(subtasks, minlength=parallelism)
    order = np.argsort(subtasks, kind="stable")
    shuffled = take_rows(batch, order)
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
    the integer 0 does, as in :func:`hash_columns`.

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
