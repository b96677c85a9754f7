"""Deduplication: drop events whose id was already seen within a time horizon.

Upstream producers are often at-least-once: they retry and resend, and a
replay from a non-transactional upstream repeats whole ranges. :class:`Dedupe`
(built by ``stream.dedupe(on=..., within_ms=...)``) lets the first event of
every id through and drops the repeats, so a feature pipeline counts each
event once. The stream is keyed by the id columns, so each subtask owns its
share of the ids.

Two modes, each a strategy of :mod:`onceflow.operators.seen_ids` that the
logic holds (:class:`~onceflow.operators.seen_ids.BloomSeenIds`,
:class:`~onceflow.operators.seen_ids.ExactSeenIds`):

- ``"bloom"`` (default): vectorised Bloom filters (:mod:`onceflow.operators.bloom`).
  Memory is about ``1.44 * log2(generations / fp_rate)`` bits per remembered
  id; there are no false negatives (a repeat inside the horizon is always
  dropped), but a *unique* event is wrongly dropped with probability up to
  about ``fp_rate`` at the designed load (``expected_items`` distinct ids per
  ``within_ms`` across the operator). Use it where losing a tiny fraction of
  events is acceptable.
- ``"exact"``: per-generation sets of keys (sorted numpy ``uint64`` runs,
  8 bytes per remembered id). For a single integer, boolean or temporal id
  column the stored key *is* the value (as 64 bits), so the mode is exact.
  For string, float or several columns the stored key is the 64-bit
  :func:`~onceflow.operators.keygroups.hash64_columns`: two distinct ids collide with
  probability about ``2**-57`` per pair, so with ``n`` ids remembered per
  subtask a unique event is wrongly dropped with probability below
  ``n**2 / 2**58`` over the whole horizon (3.5e-6 for a million ids).

**Generations.** Event time is cut into generations of
``G = ceil(within_ms / (generations - 1))`` ms; generation ``g`` holds the
ids first seen with event times in ``[g * G, (g + 1) * G)`` (one Bloom filter
or one key set each). An event is a repeat if any live generation holds its
id (within one batch, a later row repeating an earlier row's id is a repeat
too). A new id goes into the generation of its event time, or into the
oldest live one if that has already expired. Generation ``g`` is dropped when
the watermark ``w`` reaches ``(g + 1) * G - 1 + within_ms``.

*Why nothing is forgotten too early:* an id first passed at event time ``t``
lives in generation ``g >= floor(t / G)``, which is dropped only once
``w >= (g + 1) * G - 1 + within_ms >= t + within_ms``. So a repeat that
arrives while ``w < t + within_ms`` (whatever its own event time, in or out
of order) finds the id; a repeat may be caught up to ``G`` ms longer than
that. Memory is bounded by the live generations: about ``generations`` (plus
``max_delay_ms / G`` for events running ahead of the watermark). Without
watermarks nothing expires. An event whose own generation already expired
when it arrives (``t + within_ms <= w``, roughly) cannot be checked against an
original that old; it is counted in ``beyond_horizon`` and, if new, remembered in
the oldest live generation.

**Sizing.** Every subtask gets ``ceil(expected_items / parallelism)`` ids per
``within_ms``, so a generation's filter is built for
``ceil(that / (generations - 1))`` ids at ``p_g = 1 - (1 - fp_rate) **
(1 / generations)``: a lookup probes up to ``generations`` full filters, so
the combined false-positive rate stays at ``fp_rate`` at the designed load.
Beyond it the filters overfill; watch ``fp_rate_g0`` and ``estimated_fp_rate``
in the metrics.

**Snapshots** are one Arrow table (schema metadata: mode, generation span,
watermark, counters, subtask, parallelism, format version):

- exact: one row per remembered key, ``key_group`` (int32), ``subtask``,
  ``generation`` (int64), ``key`` (uint64). Restore keeps the rows of
  ``ctx.key_groups``, so exact state restores at any parallelism.
- bloom: one row per filter, ``key_group = -1`` (a filter cannot be split by
  key group), ``subtask``, ``generation``, the key-group range the filter
  covers (``key_group_start``, ``key_group_end``), ``num_bits``,
  ``num_hashes``, ``items``, ``capacity`` and ``bits`` (large_binary,
  little-endian uint64 words). At the same parallelism a subtask gets its own
  filters back. At another parallelism a subtask keeps, read-only, every old
  filter whose key-group range overlaps its own (no false negatives; more
  false positives and memory until those generations expire) and adds new ids
  to fresh filters.

Example:
    >>> import pyarrow as pa
    >>> from onceflow.operators.logic import OperatorContext
    >>> op = Dedupe("id", within_ms=1_000, time_column="t", mode="exact")
    >>> logic = op.build(OperatorContext("dedupe_1"))
    >>> [out.to_pydict() for _, out in logic.on_batch(pa.record_batch({"id": [1, 2, 1], "t": [0, 5, 7]}))]
    [{'id': [1, 2], 't': [0, 5]}]
    >>> logic.on_batch(pa.record_batch({"id": [2], "t": [900]}))  # a resend inside the horizon
    []
    >>> logic.on_watermark(2_000)  # generations of 334 ms: [0, 334) expired, ids 1 and 2 are forgotten
    []
    >>> [out.to_pydict() for _, out in logic.on_batch(pa.record_batch({"id": [2], "t": [2_100]}))]
    [{'id': [2], 't': [2100]}]

"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from onceflow.errors import DataError, PlanError
from onceflow.operators.bloom import distinct_first_rows
from onceflow.operators.keygroups import take_rows
from onceflow.operators.logic import MAIN, Emitted, OperatorContext, OperatorLogic
from onceflow.operators.seen_ids import BloomSeenIds, ExactSeenIds, SeenIds
from onceflow.operators.watermark import event_time_ms

__all__ = ["STATE_FORMAT_VERSION", "Dedupe", "DedupeLogic"]

STATE_FORMAT_VERSION = 1
"""The version of the snapshot table layout (schema metadata ``onceflow.version``)."""

_I64_MIN = -(1 << 63)
_I64_MAX = (1 << 63) - 1

DedupeMode = Literal["bloom", "exact"]
"""``"bloom"`` (bounded memory, rare false positives) or ``"exact"`` (keyed sets)."""


def _clamp(value: int) -> int:
    return _I64_MAX if value > _I64_MAX else _I64_MIN if value < _I64_MIN else value


@dataclass(frozen=True, slots=True)
class Dedupe:
    """Drop events whose id (``on``) was already seen within ``within_ms`` of event time (the config).

    Args:
        on: the id column or columns.
        within_ms: how long after its event time an id is remembered, at
            least (by watermark); see the module docs.
        time_column: the event-time column (integer ms or a timestamp).
        mode: ``"bloom"`` (bounded memory, rare false positives) or
            ``"exact"`` (keyed sets, no false positives for integer ids).
        fp_rate: bloom mode's designed false-positive rate (a unique event
            wrongly dropped), at ``expected_items``.
        expected_items: distinct ids per ``within_ms`` across all subtasks
            (sizes the Bloom filters; unused in exact mode).
        generations: live generations at steady state (at least 2). More
            generations waste less memory on expired ids but cost more probes.

    Raises:
        PlanError: an argument is out of range.

    Example:
        >>> op = Dedupe(["user", "event_id"], within_ms=60_000, time_column="t")
        >>> op.on, op.generation_ms
        (('user', 'event_id'), 20000)

    """

    on: str | Sequence[str]
    within_ms: int
    _: KW_ONLY
    time_column: str
    mode: DedupeMode = "bloom"
    fp_rate: float = 0.01
    expected_items: int = 1_000_000
    generations: int = 4

    def __post_init__(self) -> None:
        """Normalise ``on`` to a tuple and validate every argument."""
        on = (self.on,) if isinstance(self.on, str) else tuple(self.on)
        object.__setattr__(self, "on", on)
        if not on or not all(isinstance(column, str) and column for column in on):
            msg = f"dedupe: on must name one or more id columns, got {self.on!r}; pass a column name or a list"
            raise PlanError(msg)
        if len(set(on)) != len(on):
            msg = f"dedupe: on={list(on)!r} repeats a column; name each id column once"
            raise PlanError(msg)
        for name, value, minimum in (
            ("within_ms", self.within_ms, 1),
            ("expected_items", self.expected_items, 1),
            ("generations", self.generations, 2),
        ):
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
                msg = f"dedupe: {name} must be an integer >= {minimum}, got {value!r}; pass an int"
                raise PlanError(msg)
        if not isinstance(self.time_column, str) or not self.time_column:
            msg = f"dedupe: time_column must be a column name, got {self.time_column!r}; pass a string"
            raise PlanError(msg)
        if self.mode not in ("bloom", "exact"):
            msg = f"dedupe: mode must be 'bloom' or 'exact', got {self.mode!r}; pick one"
            raise PlanError(msg)
        rate = self.fp_rate
        if isinstance(rate, bool) or not isinstance(rate, float | int) or not 0.0 < rate < 1.0:
            msg = f"dedupe: fp_rate must be a probability strictly between 0 and 1, got {rate!r}; pass e.g. 0.01"
            raise PlanError(msg)

    @property
    def columns(self) -> tuple[str, ...]:
        """The id columns, as a tuple."""
        return tuple(self.on)

    @property
    def generation_ms(self) -> int:
        """The event-time span of one generation, ``ceil(within_ms / (generations - 1))``."""
        return -(-int(self.within_ms) // (int(self.generations) - 1))

    def build(self, ctx: OperatorContext, resume_state: pa.Table | Sequence[pa.Table] | None = None) -> DedupeLogic:
        """Return the live logic, restored from ``resume_state`` when given.

        Args:
            ctx: where the logic runs.
            resume_state: a table from :meth:`DedupeLogic.snapshot`, or
                several (when rescaling).

        Returns:
            The live logic.

        """
        return DedupeLogic(self, ctx, resume_state)


def _seen_ids(config: Dedupe, ctx: OperatorContext) -> SeenIds:
    """The dedupe-mode strategy for a config."""
    if config.mode == "exact":
        return ExactSeenIds(ctx, config.generation_ms)
    return BloomSeenIds(
        ctx,
        config.generation_ms,
        expected_items=int(config.expected_items),
        generations=int(config.generations),
        fp_rate=float(config.fp_rate),
    )


class DedupeLogic(OperatorLogic):
    """The live deduplication of one subtask (built by :class:`Dedupe`).

    The logic decides which generation an id goes into, when generations
    expire, and keeps the counters; the remembered ids themselves, and all
    that depends on the mode, belong to a
    :class:`~onceflow.operators.seen_ids.SeenIds`
    (:class:`~onceflow.operators.seen_ids.ExactSeenIds` or
    :class:`~onceflow.operators.seen_ids.BloomSeenIds`).

    Example:
        >>> import pyarrow as pa
        >>> from onceflow.operators.logic import OperatorContext
        >>> op = Dedupe("id", within_ms=10_000, time_column="t", expected_items=1_000)
        >>> ctx = OperatorContext("dedupe_1")
        >>> logic = op.build(ctx)
        >>> len(logic.on_batch(pa.record_batch({"id": ["a", "b", "a"], "t": [1, 2, 3]}))[0][1])
        2
        >>> state = logic.snapshot()
        >>> state.column("key_group").to_pylist(), state.column("items").to_pylist()
        ([-1], [2])
        >>> restored = op.build(ctx, resume_state=state)
        >>> restored.on_batch(pa.record_batch({"id": ["b"], "t": [4]}))  # still recognised
        []
        >>> {k: v for k, v in restored.metrics().items() if not k.startswith(("fill", "fp", "est", "state"))}
        {'items_seen': 4, 'duplicates_dropped': 2, 'beyond_horizon': 0, 'generations': 1, 'items_g0': 2}

    """

    def __init__(
        self, config: Dedupe, ctx: OperatorContext, resume_state: pa.Table | Sequence[pa.Table] | None
    ) -> None:
        self._config = config
        self._ctx = ctx
        self._operator = ctx.operator
        self._columns = list(config.columns)
        self._time_column = config.time_column
        self._within = int(config.within_ms)
        self._span = config.generation_ms
        self._ids = _seen_ids(config, ctx)
        self._watermark: int | None = None
        self._items_seen = 0
        self._duplicates = 0
        self._beyond_horizon = 0
        if resume_state is not None:
            tables = [resume_state] if isinstance(resume_state, pa.Table) else list(resume_state)
            self._restore(tables)

    # --- processing ---------------------------------------------------------------------------------

    def _check_columns(self, batch: pa.RecordBatch) -> None:
        schema = batch.schema
        for column in self._columns:
            if schema.get_field_index(column) < 0:
                msg = (
                    f"operator {self._operator!r}: dedup column {column!r} is missing from the input "
                    f"(columns: {', '.join(schema.names)}); dedupe on a column the stream has"
                )
                raise DataError(msg, operator=self._operator, column=column)

    def _check_nulls(self, batch: pa.RecordBatch) -> None:
        for column in self._columns:
            nulls = batch.column(column).null_count
            if nulls:
                msg = (
                    f"operator {self._operator!r}: dedup column {column!r} has {nulls} null values; "
                    "an event without an id cannot be deduplicated, so fill or filter them first"
                )
                raise DataError(msg, operator=self._operator, column=column)

    def _oldest_live(self) -> int | None:
        """The oldest generation the watermark has not expired (``None`` before any watermark)."""
        if self._watermark is None:
            return None
        return _clamp((self._watermark + 1 - self._within) // self._span)

    def on_batch(self, batch: pa.RecordBatch) -> Emitted:
        """Emit the rows whose id is new; drop the repeats."""
        self._check_columns(batch)
        n = batch.num_rows
        if n == 0:
            return []
        times = event_time_ms(batch, self._time_column, operator=self._operator)
        self._check_nulls(batch)
        keys = self._ids.keys_of(batch, self._columns)
        candidates, distinct = distinct_first_rows(keys)  # sorted keys: fast binary searches in exact mode
        generation = times // np.int64(self._span)
        oldest = self._oldest_live()
        if oldest is not None:
            self._beyond_horizon += int(np.count_nonzero(generation < oldest))
        target = generation[candidates]  # a new id goes into its event time's generation, or the oldest live one
        if oldest is not None:
            np.maximum(target, oldest, out=target)
        rows = candidates[self._ids.add_unseen(distinct, target)]
        self._items_seen += n
        self._duplicates += n - len(rows)
        if len(rows) == n:
            return [(MAIN, batch)]
        if not len(rows):
            return []
        return [(MAIN, take_rows(batch, np.sort(rows)))]

    def on_watermark(self, watermark: int) -> Emitted:
        """Drop the generations the watermark has moved past the horizon of."""
        if self._watermark is None or watermark > self._watermark:
            self._watermark = int(watermark)
        oldest = self._oldest_live()
        assert oldest is not None
        self._ids.expire(oldest)
        return []

    # --- observation ----------------------------------------------------------------------------------

    @property
    def state_bytes(self) -> int:
        """The bytes of every live filter or key set."""
        return self._ids.state_bytes

    def metrics(self) -> dict[str, Any]:
        """Counters and, per live generation (``g0`` the newest), its items, fill ratio and estimated fp rate.

        Keys: ``items_seen``, ``duplicates_dropped``, ``beyond_horizon``
        (events whose own generation had expired when they arrived; not
        dropped for that), ``generations``, ``state_bytes``; per generation
        ``items_g<i>`` and,
        in bloom mode, ``fill_ratio_g<i>``, ``fp_rate_g<i>`` (``fill ** k``),
        plus ``estimated_fp_rate``, the chance that a unique id is dropped
        now (a lookup probes every live filter).
        """
        return {
            "items_seen": self._items_seen,
            "duplicates_dropped": self._duplicates,
            "beyond_horizon": self._beyond_horizon,
            "generations": self._ids.generation_count,
            **self._ids.generation_metrics(),
            "state_bytes": self._ids.state_bytes,
        }

    # --- snapshot and restore -------------------------------------------------------------------------

    def _metadata(self) -> dict[bytes, bytes]:
        return {
            b"onceflow.state": b"dedupe",
            b"onceflow.version": str(STATE_FORMAT_VERSION).encode(),
            b"onceflow.mode": self._config.mode.encode(),
            b"onceflow.key_encoding": self._ids.key_encoding.encode(),
            b"onceflow.generation_ms": str(self._span).encode(),
            b"onceflow.watermark": b"" if self._watermark is None else str(self._watermark).encode(),
            b"onceflow.items_seen": str(self._items_seen).encode(),
            b"onceflow.duplicates_dropped": str(self._duplicates).encode(),
            b"onceflow.beyond_horizon": str(self._beyond_horizon).encode(),
            b"onceflow.subtask": str(self._ctx.subtask).encode(),
            b"onceflow.parallelism": str(self._ctx.parallelism).encode(),
        }

    def snapshot(self) -> pa.Table:
        """Return the remembered ids as one Arrow table (layout in the module docs).

        Pass it to ``Dedupe.build(ctx, resume_state=...)`` to restore.
        """
        return self._ids.state().replace_schema_metadata(self._metadata())

    def _restore(self, tables: list[pa.Table]) -> None:
        operator = self._operator
        watermarks: list[int] = []
        for table in tables:
            metadata = table.schema.metadata or {}
            if metadata.get(b"onceflow.state") != b"dedupe":
                msg = f"operator {operator!r}: resume_state is not dedupe state; restore from this operator's snapshot"
                raise DataError(msg, operator=operator)
            mode = metadata.get(b"onceflow.mode", b"").decode()
            if mode != self._config.mode:
                msg = (
                    f"operator {operator!r}: resume_state was written in mode {mode!r}, not "
                    f"{self._config.mode!r}; restore with the mode the snapshot was taken with"
                )
                raise DataError(msg, operator=operator)
            watermark = metadata.get(b"onceflow.watermark", b"")
            if watermark:
                watermarks.append(int(watermark))
            if int(metadata.get(b"onceflow.subtask", b"0")) % self._ctx.parallelism == self._ctx.subtask:
                self._items_seen += int(metadata.get(b"onceflow.items_seen", b"0"))
                self._duplicates += int(metadata.get(b"onceflow.duplicates_dropped", b"0"))
                self._beyond_horizon += int(metadata.get(b"onceflow.beyond_horizon", b"0"))
            span = int(metadata.get(b"onceflow.generation_ms", str(self._span).encode()))
            for name in self._ids.schema.names:
                if name not in table.column_names:
                    msg = (
                        f"operator {operator!r}: resume_state lacks column {name!r}, so it was not written by "
                        "this dedupe operator; restore from a snapshot of the same operator config"
                    )
                    raise DataError(msg, operator=operator, column=name)
            self._ids.restore(table, span)
        if watermarks:
            self._watermark = max(watermarks)
            self.on_watermark(self._watermark)
