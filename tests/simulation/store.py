"""The simulated world's external systems: a transactional store and checkpoint storage, in memory.

:class:`TransactionalStore` is what a two-phase-commit sink writes to (a
PostgreSQL with prepared transactions, a directory of hidden Parquet files):
transactions are opened, written, prepared, then committed or aborted by name.
Committing is idempotent; everything else that a correct protocol never does
(committing an aborted transaction, writing to a prepared one, aborting a
committed one) is recorded as a violation instead of being allowed.

:class:`ManifestStorage` holds completed checkpoints' manifests. Writing one
is slow: it stays in flight until the scheduler completes or fails it, and
only a written manifest makes a checkpoint complete.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

__all__ = ["ManifestStorage", "ManifestWrite", "TransactionalStore", "Txn", "TxnState"]


class TxnState(Enum):
    """Where a transaction is in its life."""

    OPEN = "open"
    PREPARED = "prepared"
    COMMITTED = "committed"
    ABORTED = "aborted"


@dataclass(slots=True)
class Txn:
    """One transaction: its state and the rows written into it."""

    state: TxnState = TxnState.OPEN
    rows: list[tuple[int, int]] = field(default_factory=list)


class TransactionalStore:
    """An in-memory store with named transactions (prepare, commit, abort, abort everything not kept).

    Attributes:
        txns: every transaction ever opened, by name.
        committed: the rows of committed transactions, in commit order.
        violations: misuses of the protocol seen (each a readable line).
    """

    def __init__(self) -> None:
        self.txns: dict[str, Txn] = {}
        self.committed: list[tuple[int, int]] = []
        self.violations: list[str] = []

    def write(self, name: str, rows: list[tuple[int, int]]) -> None:
        txn = self.txns.setdefault(name, Txn())
        if txn.state is not TxnState.OPEN:
            self.violations.append(f"write to {txn.state.value} transaction {name}")
            return
        txn.rows.extend(rows)

    def prepare(self, name: str) -> None:
        txn = self.txns.get(name)
        if txn is None or txn.state is not TxnState.OPEN:
            self.violations.append(f"prepare of {txn.state.value if txn else 'unknown'} transaction {name}")
            return
        txn.state = TxnState.PREPARED

    def commit(self, name: str) -> None:
        txn = self.txns.get(name)
        if txn is None or txn.state in (TxnState.OPEN, TxnState.ABORTED):
            self.violations.append(f"commit of {txn.state.value if txn else 'unknown'} transaction {name}")
            return
        if txn.state is TxnState.PREPARED:
            txn.state = TxnState.COMMITTED
            self.committed.extend(txn.rows)

    def abort(self, name: str) -> None:
        txn = self.txns.get(name)
        if txn is None:
            return
        if txn.state is TxnState.COMMITTED:
            self.violations.append(f"abort of committed transaction {name}")
            return
        txn.state = TxnState.ABORTED

    def abort_lingering(self, keep: list[str]) -> None:
        """Abort every open or prepared transaction that ``keep`` does not name."""
        kept = set(keep)
        for name, txn in self.txns.items():
            if name not in kept and txn.state in (TxnState.OPEN, TxnState.PREPARED):
                txn.state = TxnState.ABORTED

    def in_state(self, state: TxnState) -> list[str]:
        return sorted(name for name, txn in self.txns.items() if txn.state is state)

    def committed_rows(self) -> collections.Counter[tuple[int, int]]:
        return collections.Counter(self.committed)


@dataclass(slots=True)
class ManifestWrite:
    """A manifest on its way to storage; ``owner`` is told how it ended."""

    checkpoint_id: int
    manifest: dict[str, Any]
    owner: Any


class ManifestStorage:
    """Completed checkpoints' manifests, and the manifest writes in flight."""

    def __init__(self) -> None:
        self.manifests: dict[int, dict[str, Any]] = {}
        self.in_flight: list[ManifestWrite] = []

    def begin(self, write: ManifestWrite) -> None:
        self.in_flight.append(write)

    def settle(self, write: ManifestWrite, *, landed: bool) -> None:
        """End ``write``: the manifest is durable when ``landed``."""
        self.in_flight.remove(write)
        if landed:
            self.manifests[write.checkpoint_id] = write.manifest

    def completed_ids(self) -> list[int]:
        return sorted(self.manifests)

    def manifest(self, checkpoint_id: int) -> dict[str, Any] | None:
        return self.manifests.get(checkpoint_id)

    def latest(self, run: str | None = None) -> dict[str, Any] | None:
        """The newest manifest (of ``run``, when given)."""
        for checkpoint_id in sorted(self.manifests, reverse=True):
            manifest = self.manifests[checkpoint_id]
            if run is None or manifest["run"] == run:
                return manifest
        return None

    def discard(self, checkpoint_id: int) -> None:
        self.manifests.pop(checkpoint_id, None)
