"""Who may complete checkpoints in a job's storage: a renewable lease (sans-IO decisions).

Actors of one Ray cluster cannot run a job twice (named actors clash), but a
job's *storage* can be shared by two clusters: a driver dies, its cluster keeps
the old actors running for a while, and a new driver elsewhere resumes the job.
Without fencing, both would complete checkpoints and commit into the same
sinks. So the run that owns the storage holds a lease in it
(``<storage>/<job>/_lease.json``: the run's id, an epoch that every new owner
increments, and when it was last renewed):

- a new run takes the lease only when it is free, its own, or lapsed (not
  renewed for ``lease_s``); otherwise it waits for it to lapse;
- the owner renews it every ``lease_s / 3``;
- the owner writes a manifest, or deletes an old checkpoint, only while its
  lease is its own and was renewed within ``lease_s / 2``. A zombie that can no
  longer renew stops completing checkpoints at least ``lease_s / 2`` before
  anyone may take over, so it never commits beside its successor (as long as
  writing one manifest takes less than that margin, and the machines' clocks
  agree to within it).

Example:
    >>> lease = JobLease(run="a", epoch=3, renewed_at=100.0)
    >>> may_take(lease, "b", now=105.0, lease_s=10.0), may_take(lease, "b", now=111.0, lease_s=10.0)
    (False, True)
    >>> may_complete(lease, "a", now=104.0, lease_s=10.0), may_complete(lease, "a", now=106.0, lease_s=10.0)
    (True, False)
    >>> taken(lease, "b", now=111.0)
    JobLease(run='b', epoch=4, renewed_at=111.0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["JobLease", "may_complete", "may_take", "taken"]


@dataclass(frozen=True, slots=True)
class JobLease:
    """A run's hold on a job's checkpoint storage.

    Attributes:
        run: the owning run's id.
        epoch: incremented by every new owner.
        renewed_at: wall-clock seconds of the last renewal.
    """

    run: str
    epoch: int
    renewed_at: float

    def to_json(self) -> dict[str, Any]:
        """The lease as a JSON-able mapping."""
        return {"run": self.run, "epoch": self.epoch, "renewed_at": self.renewed_at}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobLease:
        """Read :meth:`to_json`'s mapping back."""
        return cls(str(data["run"]), int(data["epoch"]), float(data["renewed_at"]))


def may_take(lease: JobLease | None, run: str, *, now: float, lease_s: float) -> bool:
    """Whether ``run`` may take (or keep) the lease: it is free, its own, or lapsed."""
    return lease is None or lease.run == run or now - lease.renewed_at > lease_s


def taken(lease: JobLease | None, run: str, *, now: float) -> JobLease:
    """The lease once ``run`` took or renewed it (a new owner gets the next epoch)."""
    if lease is not None and lease.run == run:
        return JobLease(run, lease.epoch, now)
    return JobLease(run, (lease.epoch if lease is not None else 0) + 1, now)


def may_complete(lease: JobLease | None, run: str, *, now: float, lease_s: float) -> bool:
    """Whether ``run`` may complete a checkpoint now: the lease is its own and fresh by a safety margin."""
    return lease is not None and lease.run == run and now - lease.renewed_at <= lease_s / 2
