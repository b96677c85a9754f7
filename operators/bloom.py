"""A vectorised Bloom filter over a numpy bit array.

:class:`BloomFilter` keeps ``num_bits`` bits in a numpy byte array (bit ``p``
is bit ``p % 8`` of byte ``p // 8``, padded to whole 64-bit words: the layout
of little-endian ``uint64`` words) and answers for a whole batch of keys at
once. Sizing follows the standard formulas for ``n`` expected items and a
false-positive rate ``p``::

    m = ceil(-n ln p / (ln 2)^2)        bits
    k = max(1, round(m / n * ln 2))     probes per key

The ``k`` probe positions of a key come from two 64-bit hashes by double
hashing (Kirsch and Mitzenmacher): ``g_i = (a + i * b) mod m`` with ``a`` in
``[0, m)`` drawn from ``h1`` and the step ``b`` in ``[1, m)`` from ``h2``
(by multiply-shift range reduction of their high 32 bits up to ``m = 2**32``,
by ``mod`` beyond). :func:`probe_hashes` derives ``h1`` and ``h2`` from one
stable 64-bit key hash (:func:`onceflow.operators.keygroups.hash64_columns`) with
MurmurHash3's 64-bit finaliser, so the filter never depends on Python's
per-process salted ``hash()``: a filter restored in another process
recognises the same keys. The probe layout is part of the snapshot format:
changing it would make restored filters forget their keys.

A Bloom filter has no false negatives: a key that was added is always
reported as present. A key never added is reported present with probability
about ``fill_ratio ** k`` (:meth:`BloomFilter.estimated_fp_rate`); callers
must treat a hit as *possibly* seen, never as certain.

Example:
    >>> import numpy as np
    >>> bloom = BloomFilter.for_capacity(1_000, fp_rate=0.01)
    >>> bloom.num_bits, bloom.num_hashes
    (9586, 7)
    >>> h1, h2 = probe_hashes(np.array([1, 2, 1, 3], dtype=np.uint64))
    >>> bloom.add_and_check(h1, h2).tolist()  # the second 1 is a repeat within the batch
    [False, False, True, False]
    >>> bloom.contains(*probe_hashes(np.array([2, 4], dtype=np.uint64))).tolist()
    [True, False]
    >>> restored = BloomFilter.from_bytes(bloom.to_bytes(), bloom.num_bits, bloom.num_hashes, items=bloom.items)
    >>> restored.contains(h1, h2).tolist(), restored.items
    ([True, True, True, True], 3)

"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "BloomFilter",
    "distinct_first_rows",
    "first_occurrences",
    "optimal_num_bits",
    "optimal_num_hashes",
    "probe_hashes",
]

_LN2 = math.log(2.0)
_SHIFT_33 = np.uint64(33)
_FMIX_1 = np.uint64(0xFF51AFD7ED558CCD)
_FMIX_2 = np.uint64(0xC4CEB9FE1A85EC53)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_BYTE_ONE = np.uint8(1)
_WORD_ONE = np.uint64(1)
_THIRTY_TWO = np.uint64(32)
_FAST_RANGE_LIMIT = 1 << 32
_UNPACK_FACTOR = 16
"""``add`` unpacks the filter to a byte per bit when it sets at least ``m / 16`` bits (measured cheaper)."""
_THREE = np.int64(3)
_LOW_3 = np.int64(7)
_SIGN = np.int64(63)
_MAX_BITS = 1 << 62


def _check_sizing(expected_items: object, fp_rate: object) -> tuple[int, float]:
    if isinstance(expected_items, bool) or not isinstance(expected_items, int | np.integer) or expected_items < 1:
        msg = f"bloom filter: expected_items must be a positive integer, got {expected_items!r}; pass e.g. 1_000_000"
        raise ValueError(msg)
    if isinstance(fp_rate, bool) or not isinstance(fp_rate, float | int) or not 0.0 < fp_rate < 1.0:
        msg = f"bloom filter: fp_rate must be a probability strictly between 0 and 1, got {fp_rate!r}; pass e.g. 0.01"
        raise ValueError(msg)
    return int(expected_items), float(fp_rate)


def optimal_num_bits(expected_items: int, fp_rate: float) -> int:
    """Return ``m = ceil(-n ln p / (ln 2)^2)``, the bits for ``n`` items at false-positive rate ``p``.

    Raises:
        ValueError: ``expected_items`` is not positive or ``fp_rate`` is not in (0, 1).

    Example:
        >>> optimal_num_bits(1_000_000, 0.01)
        9585059

    """
    n, p = _check_sizing(expected_items, fp_rate)
    return max(1, math.ceil(-n * math.log(p) / (_LN2 * _LN2)))


def optimal_num_hashes(num_bits: int, expected_items: int) -> int:
    """Return ``k = max(1, round(m / n * ln 2))``, the probes per key; never 0.

    Example:
        >>> optimal_num_hashes(9_585_059, 1_000_000), optimal_num_hashes(10, 1_000_000)
        (7, 1)

    """
    return max(1, round(num_bits / max(1, expected_items) * _LN2))


def _fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser (a bijection with full avalanche), on a copy."""
    h = h ^ (h >> _SHIFT_33)
    h *= _FMIX_1
    h ^= h >> _SHIFT_33
    h *= _FMIX_2
    h ^= h >> _SHIFT_33
    return h


def probe_hashes(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the two 64-bit hashes ``(h1, h2)`` that double hashing draws the probes from.

    ``h1`` is a bijection of the key (equal keys, equal probes; distinct keys
    never share ``h1``), ``h2`` an independent-looking second mix.

    Args:
        keys: stable 64-bit key hashes (``uint64``), e.g. from
            :func:`onceflow.operators.keygroups.hash64_columns`.

    Example:
        >>> import numpy as np
        >>> h1, h2 = probe_hashes(np.array([0, 1], dtype=np.uint64))
        >>> h1.dtype, bool(h1[0] != h1[1]), bool(h1[0] != h2[0])
        (dtype('uint64'), True, True)

    """
    keys = np.asarray(keys, dtype=np.uint64)
    h1 = _fmix64(keys)
    h2 = _fmix64(h1 + _GOLDEN)
    return h1, h2


def distinct_first_rows(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the row of the first occurrence of every distinct key, and the keys, in ascending key order.

    Example:
        >>> import numpy as np
        >>> rows, distinct = distinct_first_rows(np.array([5, 3, 5, 5, 3, 9]))
        >>> rows.tolist(), distinct.tolist()
        ([1, 0, 5], [3, 5, 9])

    """
    if len(keys) == 0:
        return np.empty(0, dtype=np.intp), keys[:0]
    order = np.argsort(keys)
    ordered = keys[order]
    starts = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))
    return np.minimum.reduceat(order, starts), ordered[starts]


def first_occurrences(keys: np.ndarray) -> np.ndarray:
    """Return a mask that is true at the first row of every distinct key.

    Rows where it is false repeat a key seen earlier in the same array.

    Example:
        >>> import numpy as np
        >>> first_occurrences(np.array([5, 3, 5, 5, 3, 9])).tolist()
        [True, True, False, False, False, True]

    """
    mask = np.zeros(len(keys), dtype=bool)
    mask[distinct_first_rows(keys)[0]] = True
    return mask


class BloomFilter:
    """A Bloom filter of ``num_bits`` bits and ``num_hashes`` probes, vectorised over batches.

    Args:
        num_bits: the number of bits ``m`` (at least 1).
        num_hashes: the probes per key ``k`` (at least 1).
        bits: the bit array, ``8 * ceil(m / 64)`` ``uint8`` bytes (taken,
            not copied); all zero when omitted.
        items: how many distinct keys were added so far (bookkeeping only).
        capacity: the designed number of items, where known.

    Raises:
        ValueError: a size is out of range or ``bits`` has the wrong length.

    Example:
        >>> import numpy as np
        >>> bloom = BloomFilter(num_bits=1024, num_hashes=3)
        >>> keys = np.arange(10, dtype=np.uint64)
        >>> bloom.add(*probe_hashes(keys))
        >>> bool(bloom.contains(*probe_hashes(keys)).all()), bloom.items
        (True, 10)
        >>> 0 < bloom.fill_ratio() <= 30 / 1024
        True

    """

    __slots__ = ("_bytes", "capacity", "items", "num_bits", "num_hashes")

    def __init__(
        self,
        num_bits: int,
        num_hashes: int,
        bits: np.ndarray | None = None,
        *,
        items: int = 0,
        capacity: int | None = None,
    ) -> None:
        if not 1 <= num_bits <= _MAX_BITS:
            msg = f"bloom filter: num_bits must be in [1, 2**62], got {num_bits}; size it with for_capacity()"
            raise ValueError(msg)
        if num_hashes < 1:
            msg = f"bloom filter: num_hashes must be at least 1, got {num_hashes}; size it with for_capacity()"
            raise ValueError(msg)
        length = (num_bits + 63) // 64 * 8
        if bits is None:
            bits = np.zeros(length, dtype=np.uint8)
        elif bits.dtype != np.uint8 or bits.shape != (length,):
            msg = (
                f"bloom filter: expected {length} bytes for {num_bits} bits, "
                f"got {bits.dtype} of shape {bits.shape}; pass the bytes to_bytes() wrote"
            )
            raise ValueError(msg)
        self.num_bits = int(num_bits)
        self.num_hashes = int(num_hashes)
        self.items = int(items)
        self.capacity = capacity
        self._bytes = bits

    @classmethod
    def for_capacity(cls, expected_items: int, fp_rate: float) -> BloomFilter:
        """Return an empty filter sized for ``expected_items`` keys at ``fp_rate``.

        Raises:
            ValueError: ``expected_items`` is not positive or ``fp_rate`` is not in (0, 1).

        Example:
            >>> bloom = BloomFilter.for_capacity(1_000_000, 0.001)
            >>> bloom.num_bits, bloom.num_hashes, bloom.nbytes
            (14377588, 10, 1797200)

        """
        num_bits = optimal_num_bits(expected_items, fp_rate)
        return cls(num_bits, optimal_num_hashes(num_bits, expected_items), capacity=int(expected_items))

    @property
    def nbytes(self) -> int:
        """The bytes of the bit array."""
        return int(self._bytes.nbytes)

    def _start(self, h1: np.ndarray, h2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The first probe position (in ``[0, m)``) and the step (in ``[1, m)``) of every key, as int64.

        Up to ``m = 2**32`` bits they come from the high 32 bits of ``h1`` and
        ``h2`` by multiply-shift (Lemire's fast range reduction, no division);
        larger filters take ``h mod m``.
        """
        m = self.num_bits
        h1 = np.asarray(h1, dtype=np.uint64)
        h2 = np.asarray(h2, dtype=np.uint64)
        if m <= _FAST_RANGE_LIMIT:
            first = ((h1 >> _THIRTY_TWO) * np.uint64(m)) >> _THIRTY_TWO
            if m == 1:
                step = np.ones(len(h2), dtype=np.uint64)
            else:
                step = (((h2 >> _THIRTY_TWO) * np.uint64(m - 1)) >> _THIRTY_TWO) + _WORD_ONE
            return first.astype(np.int64), step.astype(np.int64)
        first = h1 % np.uint64(m)
        step = h2 % np.uint64(m - 1) + _WORD_ONE
        return first.astype(np.int64), step.astype(np.int64)

    @staticmethod
    def _next(position: np.ndarray, step: np.ndarray, m: np.int64) -> np.ndarray:
        """``(position + step) mod m`` for ``0 <= position, step < m``, branch-free."""
        position = position + step
        position -= m
        position += (position >> _SIGN) & m
        return position

    def _test(self, positions: np.ndarray) -> np.ndarray:
        masks = _BYTE_ONE << (positions & _LOW_3).astype(np.uint8)
        return (self._bytes[positions >> _THREE] & masks) != 0

    def contains(self, h1: np.ndarray, h2: np.ndarray) -> np.ndarray:
        """Return, per key, whether all ``k`` of its bits are set (possibly seen).

        Absent keys usually stop at their first clear bit, so the work is
        about two probes per absent key rather than ``k``.
        """
        n = len(h1)
        found = np.zeros(n, dtype=bool)
        if n == 0:
            return found
        m = np.int64(self.num_bits)
        position, step = self._start(h1, h2)
        alive: np.ndarray | None = None  # None: every row is still a candidate
        for probe in range(self.num_hashes):
            if probe:
                position = self._next(position, step, m)
            hit = self._test(position)
            if not hit.all():
                keep = np.flatnonzero(hit)
                if not len(keep):
                    return found
                alive = keep if alive is None else alive[keep]
                position, step = position[keep], step[keep]
        if alive is None:
            found[:] = True
        else:
            found[alive] = True
        return found

    def add(self, h1: np.ndarray, h2: np.ndarray) -> None:
        """Set the ``k`` bits of every key; count each row as a new item."""
        n = len(h1)
        if n == 0:
            return
        m = np.int64(self.num_bits)
        position, step = self._start(h1, h2)
        positions = np.empty((self.num_hashes, n), dtype=np.int64)
        positions[0] = position
        for probe in range(1, self.num_hashes):
            position = self._next(position, step, m)
            positions[probe] = position
        flat = positions.ravel()
        if self.num_bits <= _UNPACK_FACTOR * len(flat):
            # Many bits for the filter's size: one byte per bit, a plain scatter, packed back (O(m)).
            bits = np.unpackbits(self._bytes, bitorder="little")
            bits[flat] = 1
            self._bytes[:] = np.packbits(bits, bitorder="little")
        else:  # few bits: or them into their bytes in place (O(n k), slower per bit)
            np.bitwise_or.at(self._bytes, flat >> _THREE, _BYTE_ONE << (flat & _LOW_3).astype(np.uint8))
        self.items += n

    def add_and_check(self, h1: np.ndarray, h2: np.ndarray) -> np.ndarray:
        """Add every key; return, per row, whether it was (possibly) seen before.

        A row repeating a key that an earlier row of the same batch carries is
        reported as seen, exactly as if the rows had been added one by one. A
        first occurrence is checked against the filter as it was before the
        batch, so two distinct keys of one batch never make each other false
        positives.
        """
        h1 = np.asarray(h1, dtype=np.uint64)
        h2 = np.asarray(h2, dtype=np.uint64)
        seen = ~first_occurrences(h1)
        first = np.flatnonzero(~seen)
        known = self.contains(h1[first], h2[first])
        seen[first[known]] = True
        new = first[~known]
        self.add(h1[new], h2[new])
        return seen

    def set_bits(self) -> int:
        """Return the number of bits set."""
        return int(np.bitwise_count(self._bytes).sum())

    def fill_ratio(self) -> float:
        """Return the fraction of bits set."""
        return self.set_bits() / self.num_bits

    def estimated_fp_rate(self) -> float:
        """Return ``fill_ratio ** k``: the chance that a key never added is reported present now."""
        return float(self.fill_ratio() ** self.num_hashes)

    def to_bytes(self) -> bytes:
        """Return the bit array (``8 * ceil(m / 64)`` bytes), a copy for snapshots."""
        return self._bytes.tobytes()

    @classmethod
    def from_bytes(
        cls,
        data: bytes | memoryview,
        num_bits: int,
        num_hashes: int,
        *,
        items: int = 0,
        capacity: int | None = None,
    ) -> BloomFilter:
        """Rebuild a filter from :meth:`to_bytes` (a writable copy of ``data``).

        Raises:
            ValueError: ``data`` does not hold ``8 * ceil(num_bits / 64)`` bytes.

        """
        bits = np.frombuffer(data, dtype=np.uint8).copy()
        return cls(num_bits, num_hashes, bits, items=items, capacity=capacity)

    def __repr__(self) -> str:
        return f"BloomFilter(num_bits={self.num_bits}, num_hashes={self.num_hashes}, items={self.items})"
