"""The ids a dedupe subtask remembers, per generation: the two dedupe modes as strategies.

:class:`~onceflow.operators.dedupe.DedupeLogic` cuts event time into
generations, decides which generation a new id goes into and when a
generation expires, and counts; it holds one :class:`SeenIds` for what
depends on the mode:

- :class:`ExactSeenIds` (``mode="exact"``): per generation a set of 64-bit
  keys (the id's own 64 bits for one integer, boolean or temporal column,
  else its 64-bit hash), kept as sorted numpy runs.
- :class:`BloomSeenIds` (``mode="bloom"``): per generation a Bloom filter
  sized for the subtask's share of the expected ids, plus read-only filters
  inherited from snapshots of other key-group ranges.

Each one turns a batch's id columns into keys, answers which keys are unseen
(remembering those in the generations given), drops expired generations,
reports per-generation metrics, and writes and reads its snapshot table (the
layouts are in :mod:`onceflow.operators.dedupe`).

Example:
    >>> import numpy as np
    >>> import pyarrow as pa
    >>> from onceflow.operators.logic import OperatorContext
    >>> ids = ExactSeenIds(OperatorContext("dedupe_1"), span=100)
    >>> keys = ids.keys_of(pa.record_batch({"id": [7, 8]}), ["id"])
    >>> ids.add_unseen(keys, np.array([0, 1])).tolist()
    [True, True]
    >>> ids.add_unseen(keys, np.array([2, 2])).tolist()  # both remembered already
    [False, False]
    >>> ids.expire(oldest=1)
    >>> ids.generation_count, ids.add_unseen(keys, np.array([2, 2])).tolist()
    (1, [True, False])

"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import numpy as np
import pyarrow as pa

from onceflow.errors import DataError
from onceflow.operators.bloom import BloomFilter, optimal_num_bits, optimal_num_hashes, probe_hashes
from onceflow.operators.keygroups import SEED, hash64_columns, in_key_groups, int64_values, murmur3_int64
from onceflow.operators.logic import OperatorContext

__all__ = ["BloomGeneration", "BloomSeenIds", "ExactSeenIds", "SeenIds", "remap_generation"]

_VALUE = "value"
"""Key encoding: the stored key is the id's own 64 bits."""
_HASH64 = "hash64"
"""Key encoding: the stored key is the id's 64-bit hash."""
_MERGE_RATIO = 2

_G = TypeVar("_G")


def remap_generation(generation: int, span: int, to_span: int) -> int:
    """The generation of ``to_span`` ms that outlives generation ``generation`` of ``span`` ms.

    Example:
        >>> remap_generation(1, span=1_000, to_span=300)  # [1000, 2000) ends inside [1800, 2100)
        6
    """
    if span == to_span:
        return generation
    return -(-((generation + 1) * span) // to_span) - 1


def _by_generation(generations: np.ndarray) -> Iterator[tuple[int, np.ndarray | slice]]:
    """Split positions by their generation: ``(generation, positions)`` pairs."""
    first, last = int(generations.min()), int(generations.max())
    if first == last:
        yield first, slice(None)
        return
    order = np.argsort(generations, kind="stable")
    ordered = generations[order]
    bounds = np.flatnonzero(ordered[1:] != ordered[:-1]) + 1
    for part in np.split(order, bounds):
        yield int(generations[part[0]]), part


def _in_any(count: int, generations: Mapping[int, _G], contains: Callable[[_G, np.ndarray], np.ndarray]) -> np.ndarray:
    """Whether each of ``count`` keys is in any generation, probing the newest generations first.

    ``contains(generation, positions)`` answers for the keys at ``positions``.
    """
    found = np.zeros(count, dtype=bool)
    rest = np.arange(count)
    for generation in sorted(generations, reverse=True):
        if not len(rest):
            break
        hit = contains(generations[generation], rest)
        found[rest[hit]] = True
        rest = rest[np.flatnonzero(~hit)]
    return found


class SeenIds(ABC):
    """The remembered ids of one dedupe subtask, per generation (the dedupe-mode strategy).

    Args:
        ctx: where the logic runs (its key groups, subtask and operator name).
        span: the event-time span of one generation in ms.

    Attributes:
        mode: the dedupe mode, as written in snapshots.
        schema: the snapshot table's columns.
    """

    mode: ClassVar[str]
    schema: ClassVar[pa.Schema]

    def __init__(self, ctx: OperatorContext, span: int) -> None:
        self._ctx = ctx
        self._span = span

    @property
    def key_encoding(self) -> str:
        """How ids are stored (``"value"`` or ``"hash64"``; empty when not fixed yet or not applicable)."""
        return ""

    @abstractmethod
    def keys_of(self, batch: pa.RecordBatch, columns: Sequence[str]) -> np.ndarray:
        """The ``uint64`` key of every row's id (``columns`` hold no nulls).

        Raises:
            DataError: the ids cannot be keyed the way the remembered ones were.
        """

    @abstractmethod
    def add_unseen(self, keys: np.ndarray, generations: np.ndarray) -> np.ndarray:
        """Which of the distinct ``keys`` no live generation holds; remember those.

        Args:
            keys: distinct ``uint64`` keys.
            generations: for each key, the generation to remember it in if unseen.

        Returns:
            A boolean mask over ``keys``: ``True`` for an unseen key.
        """

    @abstractmethod
    def expire(self, oldest: int) -> None:
        """Forget every generation older than ``oldest``."""

    @property
    @abstractmethod
    def generation_count(self) -> int:
        """The number of live generations."""

    @property
    @abstractmethod
    def state_bytes(self) -> int:
        """The bytes of every live key set or filter."""

    @abstractmethod
    def generation_metrics(self) -> dict[str, Any]:
        """Per live generation (``g0`` the newest): ``items_g<i>`` and the mode's own figures."""

    @abstractmethod
    def state(self) -> pa.Table:
        """The remembered ids as a snapshot table (without schema metadata)."""

    @abstractmethod
    def restore(self, table: pa.Table, span: int) -> None:
        """Take back the ids of a snapshot table written with generations of ``span`` ms.

        Raises:
            DataError: the table cannot be restored into this state.
        """


class _KeySet:
    """Distinct ``uint64`` keys in sorted runs, merged like a log-structured tree."""

    __slots__ = ("_runs",)

    def __init__(self, runs: list[np.ndarray] | None = None) -> None:
        self._runs: list[np.ndarray] = runs or []

    def __len__(self) -> int:
        return sum(len(run) for run in self._runs)

    @property
    def nbytes(self) -> int:
        return sum(int(run.nbytes) for run in self._runs)

    def contains(self, keys: np.ndarray) -> np.ndarray:
        found = np.zeros(len(keys), dtype=bool)
        rest = np.arange(len(keys))
        for run in reversed(self._runs):  # newest (smallest) runs first
            if not len(rest):
                break
            probe = keys[rest]
            at = np.searchsorted(run, probe)
            at[at == len(run)] = 0
            hit = run[at] == probe
            found[rest[hit]] = True
            rest = rest[np.flatnonzero(~hit)]
        return found

    def add(self, keys: np.ndarray) -> None:
        """Add distinct keys that are not in the set yet."""
        if not len(keys):
            return
        self._runs.append(np.sort(keys))
        runs = self._runs
        while len(runs) > 1 and len(runs[-2]) <= _MERGE_RATIO * len(runs[-1]):
            last = runs.pop()
            runs[-1] = np.sort(np.concatenate((runs[-1], last)))

    def merge(self, other: _KeySet) -> None:
        self._runs = [np.union1d(self.values(), other.values())]

    def values(self) -> np.ndarray:
        if len(self._runs) != 1:
            self._runs = [np.sort(np.concatenate(self._runs)) if self._runs else np.empty(0, dtype=np.uint64)]
        return self._runs[0]


class ExactSeenIds(SeenIds):
    """Exact mode: per generation, a set of 64-bit keys.

    For a single integer, boolean or temporal id column the key *is* the
    value (as 64 bits); otherwise it is the id's 64-bit hash. The first batch
    fixes which (:attr:`key_encoding`); a later batch whose id type would
    change it is refused. Snapshots hold one row per key and restore at any
    parallelism (rows are kept by key group).

    Example:
        >>> import pyarrow as pa
        >>> from onceflow.operators.logic import OperatorContext
        >>> ids = ExactSeenIds(OperatorContext("dedupe_1"), span=100)
        >>> ids.keys_of(pa.record_batch({"id": [5, -1]}), ["id"]).tolist(), ids.key_encoding
        ([5, 18446744073709551615], 'value')

    """

    mode = "exact"
    schema = pa.schema(
        [("key_group", pa.int32()), ("subtask", pa.int32()), ("generation", pa.int64()), ("key", pa.uint64())]
    )

    def __init__(self, ctx: OperatorContext, span: int) -> None:
        super().__init__(ctx, span)
        self._encoding: str | None = None
        self._sets: dict[int, _KeySet] = {}

    @property
    def key_encoding(self) -> str:
        return self._encoding or ""

    def keys_of(self, batch: pa.RecordBatch, columns: Sequence[str]) -> np.ndarray:
        operator = self._ctx.operator
        encoding = _HASH64
        if len(columns) == 1:
            kind = batch.schema.field(columns[0]).type
            if pa.types.is_integer(kind) or pa.types.is_boolean(kind) or pa.types.is_temporal(kind):
                encoding = _VALUE
        if self._encoding is None:
            self._encoding = encoding
        elif encoding != self._encoding:
            column = columns[0]
            stored = "64-bit values" if self._encoding == _VALUE else "64-bit hashes"
            msg = (
                f"operator {operator!r}: dedup column {column!r} changed type to "
                f"{batch.schema.field(column).type}, but its remembered ids are {stored}; "
                "keep the id column's type stable (cast it before dedupe)"
            )
            raise DataError(msg, operator=operator, column=column)
        if encoding == _HASH64:
            return hash64_columns(batch, list(columns), operator=operator)
        ints = int64_values(batch.column(columns[0]))
        return np.asarray(ints, dtype=np.int64).view(np.uint64)

    def add_unseen(self, keys: np.ndarray, generations: np.ndarray) -> np.ndarray:
        unseen = ~_in_any(len(keys), self._sets, lambda key_set, at: key_set.contains(keys[at]))
        if unseen.any():
            new_keys, targets = keys[unseen], generations[unseen]
            for generation, part in _by_generation(targets):
                key_set = self._sets.get(generation)
                if key_set is None:
                    key_set = self._sets[generation] = _KeySet()
                key_set.add(new_keys[part])
        return unseen

    def expire(self, oldest: int) -> None:
        for generation in [g for g in self._sets if g < oldest]:
            del self._sets[generation]

    @property
    def generation_count(self) -> int:
        return len(self._sets)

    @property
    def state_bytes(self) -> int:
        return sum(key_set.nbytes for key_set in self._sets.values())

    def generation_metrics(self) -> dict[str, Any]:
        """``items_g<i>``: the keys of each live generation, newest first."""
        return {f"items_g{index}": len(self._sets[g]) for index, g in enumerate(sorted(self._sets, reverse=True))}

    def state(self) -> pa.Table:
        order = sorted(self._sets)
        parts = [self._sets[generation].values() for generation in order]
        keys = np.concatenate(parts) if parts else np.empty(0, dtype=np.uint64)
        generations = np.repeat(np.array(order, dtype=np.int64), [len(part) for part in parts])
        return pa.Table.from_arrays(
            [
                pa.array(self._key_groups_of(keys), pa.int32()),
                pa.array(np.full(len(keys), self._ctx.subtask, dtype=np.int32), pa.int32()),
                pa.array(generations, pa.int64()),
                pa.array(keys, pa.uint64()),
            ],
            schema=self.schema,
        )

    def _key_groups_of(self, keys: np.ndarray) -> np.ndarray:
        """The key group of stored keys: from the hash's high half, or by hashing the stored value."""
        parallelism = np.uint32(self._ctx.max_parallelism)
        high = murmur3_int64(keys, SEED) if self._encoding == _VALUE else (keys >> np.uint64(32)).astype(np.uint32)
        return (high % parallelism).astype(np.int32)

    def restore(self, table: pa.Table, span: int) -> None:
        """Keep the snapshot's keys of this subtask's key groups, in generations of this span."""
        metadata = table.schema.metadata or {}
        encoding = metadata.get(b"onceflow.key_encoding", b"").decode() or None
        if encoding is not None:
            if self._encoding is not None and encoding != self._encoding:
                operator = self._ctx.operator
                msg = (
                    f"operator {operator!r}: resume_state stores ids as {encoding}, another snapshot as "
                    f"{self._encoding}; restore snapshots of one operator config"
                )
                raise DataError(msg, operator=operator, column="key")
            self._encoding = encoding
        if table.num_rows == 0:
            return
        mine = in_key_groups(table.column("key_group").to_numpy(), self._ctx.key_groups)
        keys = np.asarray(table.column("key").to_numpy(), dtype=np.uint64)[mine]
        generations = np.asarray(table.column("generation").to_numpy(), dtype=np.int64)[mine]
        for generation in np.unique(generations).tolist():
            restored = _KeySet([np.unique(keys[generations == generation])])
            target = remap_generation(int(generation), span, self._span)
            if target in self._sets:
                self._sets[target].merge(restored)
            else:
                self._sets[target] = restored


class BloomGeneration:
    """One generation's filters: its own (new ids go there) and any inherited read-only ones.

    An inherited filter comes from a snapshot of another key-group range or
    sizing (restored at another parallelism or config); it keeps the
    key-group range ``(start, stop)`` it covers.
    """

    __slots__ = ("inherited", "own")

    def __init__(self) -> None:
        self.own: BloomFilter | None = None
        self.inherited: list[tuple[BloomFilter, int, int]] = []

    def filters(self) -> list[BloomFilter]:
        """Every filter of the generation, its own first."""
        return ([self.own] if self.own is not None else []) + [bloom for bloom, _, _ in self.inherited]

    def contains(self, h1: np.ndarray, h2: np.ndarray) -> np.ndarray:
        """Whether any filter of the generation may hold each key (by its probe hashes)."""
        found = np.zeros(len(h1), dtype=bool)
        rest = np.arange(len(h1))
        for bloom in self.filters():
            if not len(rest):
                break
            hit = bloom.contains(h1[rest], h2[rest])
            found[rest[hit]] = True
            rest = rest[np.flatnonzero(~hit)]
        return found


class BloomSeenIds(SeenIds):
    """Bloom mode: per generation, a Bloom filter of the ids' 64-bit hashes.

    Every subtask gets ``ceil(expected_items / parallelism)`` ids per
    horizon; a generation's filter holds ``capacity`` of them (a horizon
    spans ``generations - 1`` generations) at the per-generation rate
    ``1 - (1 - fp_rate) ** (1 / generations)``, so a lookup probing every
    live filter keeps ``fp_rate``. A filter cannot be split by key group:
    at the same parallelism a subtask gets its own filters back; otherwise
    it keeps, read-only, every old filter whose key-group range overlaps its
    own.

    Args:
        ctx: where the logic runs.
        span: the event-time span of one generation in ms.
        expected_items: distinct ids per horizon across all subtasks.
        generations: live generations at steady state.
        fp_rate: the designed false-positive rate of a lookup.

    Attributes:
        generations: the live generations' filters by generation.
        capacity: the ids one filter is sized for.
        num_bits: the bits of one filter.
        num_hashes: the probes per id.

    Example:
        >>> from onceflow.operators.logic import OperatorContext
        >>> ids = BloomSeenIds(OperatorContext("dedupe_1", 0, 4), 100, expected_items=12_000, generations=4,
        ...                    fp_rate=0.01)
        >>> ids.capacity, ids.num_hashes
        (1000, 9)

    """

    mode = "bloom"
    schema = pa.schema(
        [
            ("key_group", pa.int32()),
            ("subtask", pa.int32()),
            ("generation", pa.int64()),
            ("key_group_start", pa.int32()),
            ("key_group_end", pa.int32()),
            ("num_bits", pa.int64()),
            ("num_hashes", pa.int32()),
            ("items", pa.int64()),
            ("capacity", pa.int64()),
            ("bits", pa.large_binary()),
        ]
    )

    def __init__(
        self, ctx: OperatorContext, span: int, *, expected_items: int, generations: int, fp_rate: float
    ) -> None:
        super().__init__(ctx, span)
        per_subtask = -(-int(expected_items) // max(1, ctx.parallelism))
        self.capacity = max(1, -(-per_subtask // (int(generations) - 1)))
        generation_fp = 1.0 - (1.0 - float(fp_rate)) ** (1.0 / int(generations))
        self.num_bits = optimal_num_bits(self.capacity, generation_fp)
        self.num_hashes = optimal_num_hashes(self.num_bits, self.capacity)
        self.generations: dict[int, BloomGeneration] = {}

    def keys_of(self, batch: pa.RecordBatch, columns: Sequence[str]) -> np.ndarray:
        return hash64_columns(batch, list(columns), operator=self._ctx.operator)

    def add_unseen(self, keys: np.ndarray, generations: np.ndarray) -> np.ndarray:
        h1, h2 = probe_hashes(keys)
        unseen = ~_in_any(len(keys), self.generations, lambda entry, at: entry.contains(h1[at], h2[at]))
        if unseen.any():
            new_h1, new_h2, targets = h1[unseen], h2[unseen], generations[unseen]
            for generation, part in _by_generation(targets):
                self._own_filter(generation).add(new_h1[part], new_h2[part])
        return unseen

    def _entry(self, generation: int) -> BloomGeneration:
        entry = self.generations.get(generation)
        if entry is None:
            entry = self.generations[generation] = BloomGeneration()
        return entry

    def _own_filter(self, generation: int) -> BloomFilter:
        entry = self._entry(generation)
        if entry.own is None:
            entry.own = BloomFilter(self.num_bits, self.num_hashes, capacity=self.capacity)
        return entry.own

    def expire(self, oldest: int) -> None:
        for generation in [g for g in self.generations if g < oldest]:
            del self.generations[generation]

    @property
    def generation_count(self) -> int:
        return len(self.generations)

    @property
    def state_bytes(self) -> int:
        return sum(f.nbytes for entry in self.generations.values() for f in entry.filters())

    def generation_metrics(self) -> dict[str, Any]:
        """Per generation ``items_g<i>``, ``fill_ratio_g<i>``, ``fp_rate_g<i>``; then ``estimated_fp_rate``.

        ``estimated_fp_rate`` is the chance that a unique id is dropped now
        (a lookup probes every live filter).
        """
        metrics: dict[str, Any] = {}
        keep = 1.0
        for index, generation in enumerate(sorted(self.generations, reverse=True)):
            filters = self.generations[generation].filters()
            rates = [f.estimated_fp_rate() for f in filters]
            metrics[f"items_g{index}"] = sum(f.items for f in filters)
            metrics[f"fill_ratio_g{index}"] = max(f.fill_ratio() for f in filters)
            metrics[f"fp_rate_g{index}"] = 1.0 - math.prod(1.0 - r for r in rates)
            keep *= math.prod(1.0 - r for r in rates)
        metrics["estimated_fp_rate"] = 1.0 - keep
        return metrics

    def state(self) -> pa.Table:
        owned = self._ctx.key_groups
        rows: dict[str, list[Any]] = {name: [] for name in self.schema.names}
        for generation in sorted(self.generations):
            entry = self.generations[generation]
            parts = [(entry.own, owned.start, owned.stop)] if entry.own is not None else []
            for bloom, start, stop in parts + entry.inherited:
                rows["key_group"].append(-1)
                rows["subtask"].append(self._ctx.subtask)
                rows["generation"].append(generation)
                rows["key_group_start"].append(start)
                rows["key_group_end"].append(stop)
                rows["num_bits"].append(bloom.num_bits)
                rows["num_hashes"].append(bloom.num_hashes)
                rows["items"].append(bloom.items)
                rows["capacity"].append(bloom.capacity)
                rows["bits"].append(bloom.to_bytes())
        return pa.Table.from_pydict(rows, schema=self.schema)

    def restore(self, table: pa.Table, span: int) -> None:
        """Take back the filters whose key-group range overlaps this subtask's (own or inherited)."""
        owned = self._ctx.key_groups
        for row in table.to_pylist():
            start, stop = int(row["key_group_start"]), int(row["key_group_end"])
            if stop <= owned.start or start >= owned.stop:
                continue
            bloom = BloomFilter.from_bytes(
                row["bits"],
                int(row["num_bits"]),
                int(row["num_hashes"]),
                items=int(row["items"]),
                capacity=row["capacity"],
            )
            entry = self._entry(remap_generation(int(row["generation"]), span, self._span))
            mine = (
                (start, stop) == (owned.start, owned.stop)
                and span == self._span
                and (bloom.num_bits, bloom.num_hashes) == (self.num_bits, self.num_hashes)
            )
            if mine and entry.own is None:
                entry.own = bloom
            else:
                entry.inherited.append((bloom, start, stop))
