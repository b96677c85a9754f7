"""The "feature-window" workload that every benchmark and the demo use.

``feature_events(offset, n)`` returns rows ``offset .. offset + n`` of an
endless deterministic event stream: ``user_id`` int64 uniform in
``[0, users)``, ``amount`` float64 uniform in ``[0, 100)``, ``event_time``
int64 ms equal to the row number (starting at 0, rising 1 ms per event). Rows
come from a counter-based generator (splitmix64 of the row number and the
seed, 42 by default), so any range can be regenerated on its own: the source
is replayable from any offset, whatever the batch size.

``feature_window_reference`` computes the expected output of the job (count
and sum of ``amount`` per user and tumbling window) with plain numpy.

The retry loop (``examples/retry_loop.py``) reads ``retry_events``: the same
users and event times, an ``id`` (the row number), ``retries`` (how many
attempts fail before one succeeds, 0 to 3) and ``attempts`` (0). In the loop,
:func:`attempt` counts each event's attempts in keyed state and sends a
failed one round again; ``retry_reference`` is the expected windowed output.

Example:
    >>> feature_events(0, 3).column("event_time").to_pylist()
    [0, 1, 2]
    >>> feature_events(5, 2).equals(feature_events(0, 7).slice(5))
    True

"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

__all__ = ["attempt", "feature_events", "feature_window_reference", "retry_events", "retry_reference"]

RETRY_COLUMNS = ("id", "user_id", "event_time", "retries", "attempts")
"""The columns of a retry event, in order (what goes round the loop keeps them)."""

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    z = x + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def feature_events(offset: int, n: int, *, users: int = 100_000, seed: int = 42) -> pa.RecordBatch:
    """Return rows ``offset .. offset + n`` of the feature-window event stream."""
    row = np.arange(offset, offset + n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        first = _splitmix64(row ^ (np.uint64(seed) * _GOLDEN))
        second = _splitmix64(first)
    user_id = (first % np.uint64(users)).astype(np.int64)
    amount = (second >> np.uint64(11)).astype(np.float64) * (100.0 / 2.0**53)
    return pa.record_batch({"user_id": user_id, "amount": amount, "event_time": row.astype(np.int64)})


def feature_window_reference(total: int, *, window_ms: int = 10_000, users: int = 100_000,
                             seed: int = 42, chunk: int = 1_000_000) -> pa.Table:
    """Return the expected job output for the first ``total`` events.

    Columns ``user_id``, ``window_start``, ``window_end``, ``count``, ``total``,
    sorted by ``(window_start, user_id)``.
    """
    keys: list[np.ndarray] = []
    amounts: list[np.ndarray] = []
    for start in range(0, total, chunk):
        batch = feature_events(start, min(chunk, total - start), users=users, seed=seed)
        window = batch.column("event_time").to_numpy() // window_ms
        keys.append(window * users + batch.column("user_id").to_numpy())
        amounts.append(batch.column("amount").to_numpy())
    key = np.concatenate(keys) if keys else np.zeros(0, np.int64)
    amount = np.concatenate(amounts) if amounts else np.zeros(0)
    unique, inverse = np.unique(key, return_inverse=True)
    counts = np.bincount(inverse, minlength=len(unique)).astype(np.int64)
    sums = np.bincount(inverse, weights=amount, minlength=len(unique))
    window_start = (unique // users) * window_ms
    return pa.table({
        "user_id": (unique % users).astype(np.int64),
        "window_start": window_start.astype(np.int64),
        "window_end": (window_start + window_ms).astype(np.int64),
        "count": counts,
        "total": sums,
    })


def retry_events(offset: int, n: int, *, users: int = 1_000, seed: int = 5) -> pa.RecordBatch:
    """Rows ``offset .. offset + n`` of the retry loop's events (see the module docstring).

    Example:
        >>> retry_events(0, 4).column("retries").to_pylist()
        [0, 3, 2, 2]
    """
    base = feature_events(offset, n, users=users, seed=seed)
    row = np.arange(offset, offset + n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        retries = (_splitmix64(row ^ np.uint64(seed + 1)) % np.uint64(4)).astype(np.int64)
    return pa.record_batch({"id": row.astype(np.int64), "user_id": base.column("user_id"),
                            "event_time": base.column("event_time"), "retries": retries,
                            "attempts": np.zeros(n, np.int64)})


def attempt(state: int | None, row: dict[str, int]) -> tuple[int | None, dict[str, int]]:
    """One attempt at an event (``key_by("id").process``): it fails while ``retries`` is above 0.

    The state counts the event's attempts so far and is forgotten once one
    succeeds. A failed attempt leaves with ``retries`` one lower (0 or more:
    it goes round again), a successful one with ``retries`` -1.

    Example:
        >>> attempt(None, {"id": 7, "user_id": 1, "event_time": 7, "retries": 1, "attempts": 0})
        (1, {'id': 7, 'user_id': 1, 'event_time': 7, 'retries': 0, 'attempts': 1})
        >>> attempt(1, {"id": 7, "user_id": 1, "event_time": 7, "retries": 0, "attempts": 1})
        (None, {'id': 7, 'user_id': 1, 'event_time': 7, 'retries': -1, 'attempts': 2})
    """
    attempts = (state or 0) + 1
    retries = row["retries"] - 1
    out = {"id": row["id"], "user_id": row["user_id"], "event_time": row["event_time"], "retries": retries,
           "attempts": attempts}
    return (attempts if retries >= 0 else None), out


def retry_reference(total: int, *, window_ms: int, users: int = 1_000, seed: int = 5) -> pa.Table:
    """The retry loop's expected output for the first ``total`` events.

    Per user and tumbling window: ``events`` (how many) and ``attempts`` (their
    attempts summed, ``retries + 1`` each), sorted by ``(window_start, user_id)``.
    """
    batch = retry_events(0, total, users=users, seed=seed)
    window = batch.column("event_time").to_numpy() // window_ms
    unique, inverse = np.unique(window * users + batch.column("user_id").to_numpy(), return_inverse=True)
    window_start = (unique // users) * window_ms
    return pa.table({
        "user_id": (unique % users).astype(np.int64),
        "window_start": window_start.astype(np.int64),
        "window_end": (window_start + window_ms).astype(np.int64),
        "events": np.bincount(inverse, minlength=len(unique)).astype(np.int64),
        "attempts": np.bincount(inverse, weights=batch.column("retries").to_numpy() + 1,
                                minlength=len(unique)).astype(np.int64),
    })
