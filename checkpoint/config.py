"""Checkpointing options: :class:`CheckpointConfig`.

A small frozen value that a user passes to ``of.run`` (``checkpoint=``) and
that travels, pickled, to the coordinator. It validates itself on
construction, so a bad option fails when the job is planned, not minutes later
on a cluster. :func:`require_int` and :func:`require_number` are the checks it
uses, shared by the other option values (job options, restart strategies).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from onceflow.errors import PlanError
from onceflow.redaction import redact_uri

__all__ = ["CheckpointConfig", "require_int", "require_number"]


def require_int(name: str, value: object, minimum: int, hint: str) -> None:
    """Check that option ``name`` is an integer (not a bool) of at least ``minimum``.

    Args:
        name: the option, as the message names it (``"checkpoint retain"``).
        value: the value given.
        minimum: the least value allowed.
        hint: what to do instead, ending the message.

    Raises:
        PlanError: ``value`` is not an integer or is below ``minimum``.

    Example:
        >>> require_int("parallelism", 0, 1, hint="pass parallelism=1")
        Traceback (most recent call last):
        ...
        onceflow.errors.PlanError: parallelism must be >= 1, got 0; pass parallelism=1

    """
    if isinstance(value, bool) or not isinstance(value, int):
        msg = f"{name} must be an integer, got {value!r}; {hint}"
        raise PlanError(msg)
    if value < minimum:
        msg = f"{name} must be >= {minimum}, got {value}; {hint}"
        raise PlanError(msg)


def require_number(name: str, value: object, *, positive: bool, hint: str) -> None:
    """Check that option ``name`` is a number of seconds (not NaN), above 0 if ``positive`` else at least 0.

    Args:
        name: the option, as the message names it (``"checkpoint interval_s"``).
        value: the value given.
        positive: whether 0 is refused.
        hint: what to do instead, ending the message.

    Raises:
        PlanError: ``value`` is not a number or is out of range.

    """
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        msg = f"{name} must be a number of seconds, got {value!r}; {hint}"
        raise PlanError(msg)
    if positive and value <= 0:
        msg = f"{name} must be > 0, got {value}; {hint}"
        raise PlanError(msg)
    if not positive and value < 0:
        msg = f"{name} must be >= 0, got {value}; {hint}"
        raise PlanError(msg)


@dataclass(frozen=True, slots=True)
class CheckpointConfig:
    """How and where a job takes checkpoints (asynchronous barrier snapshots).

    Attributes:
        interval_s: seconds between the triggers of two checkpoints.
        storage: where snapshots and manifests go: a local directory (relative
            paths are taken from the driver's working directory) or any
            ``pyarrow.fs`` URI such as ``file:///data/chk`` or ``s3://bucket/prefix``.
        mode: ``"aligned"``: a subtask with several inputs holds back the
            inputs whose barrier arrived until every input's has, so a
            snapshot holds exactly the rows before the barriers; under
            backpressure a barrier waits behind every queued batch.
            ``"unaligned"``: a barrier overtakes the batches queued before it;
            the subtask snapshots at once and records the batches it overtook
            (input channel state, stored with the snapshot and replayed on
            restore), so checkpoints stay fast under backpressure.
        aligned_timeout_s: with ``mode="aligned"``, a subtask whose alignment
            runs longer than this switches that checkpoint to unaligned
            (``None``: never).
        timeout_s: a checkpoint not complete after this many seconds expires.
        min_pause_s: the least time between the end of one checkpoint and the
            trigger of the next, so slow checkpoints cannot starve processing.
        max_concurrent: how many checkpoints may be in flight at once.
        retain: how many complete checkpoints to keep in storage; older ones are deleted.
        tolerable_failures: consecutive failed or expired checkpoints tolerated
            before the job fails (0: the first failed checkpoint fails the job).
        lease_s: how long a run's hold on ``storage`` lasts without renewal.
            The running job renews it every ``lease_s / 3``; another run of the
            job (a resume from another driver or cluster) waits until it has
            lapsed before taking over, and a run that lost it completes no
            more checkpoints (see :mod:`onceflow.checkpoint.lease`).
        incremental: a checkpoint writes only the state pieces that changed
            since the newest completed checkpoint; its manifest names the
            unchanged ones, written by earlier checkpoints, in
            ``<storage>/<job>/shared/``. A shared piece is deleted when no
            checkpoint names it any more. Window aggregations keep their state
            as such pieces (their partial tables); other state is written in full.
            Needs ``max_concurrent=1``.

    Raises:
        PlanError: an option is out of range or ``mode`` is neither ``"aligned"`` nor ``"unaligned"``.

    Example:
        >>> config = CheckpointConfig(interval_s=0.5, storage="/tmp/chk", retain=2)
        >>> config.mode, config.retain
        ('aligned', 2)
        >>> CheckpointConfig(mode="unaligned").mode
        'unaligned'
        >>> CheckpointConfig(mode="async")
        Traceback (most recent call last):
        ...
        onceflow.errors.PlanError: unknown checkpoint mode 'async'; use mode='aligned' or mode='unaligned'

    """

    interval_s: float = 1.0
    storage: str = "checkpoints"
    mode: str = "aligned"
    aligned_timeout_s: float | None = None
    timeout_s: float = 60.0
    min_pause_s: float = 0.0
    max_concurrent: int = 1
    retain: int = 3
    tolerable_failures: int = 0
    lease_s: float = 10.0
    incremental: bool = False

    def __repr__(self) -> str:
        shown = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        shown["storage"] = redact_uri(self.storage) if isinstance(self.storage, str) else self.storage
        return f"CheckpointConfig({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    def __post_init__(self) -> None:
        require_number("checkpoint interval_s", self.interval_s, positive=True,
                        hint="pass a positive interval such as interval_s=1.0")
        require_number("checkpoint timeout_s", self.timeout_s, positive=True,
                        hint="pass a positive timeout such as timeout_s=60.0")
        require_number("checkpoint min_pause_s", self.min_pause_s, positive=False,
                        hint="pass min_pause_s=0 for no pause between checkpoints")
        require_int("checkpoint max_concurrent", self.max_concurrent, 1,
                     hint="pass max_concurrent=1 for one checkpoint in flight at a time")
        require_int("checkpoint retain", self.retain, 1,
                     hint="keep at least the newest complete checkpoint (retain=1)")
        require_int("checkpoint tolerable_failures", self.tolerable_failures, 0,
                     hint="pass tolerable_failures=0 to fail the job on the first failed checkpoint")
        require_number("checkpoint lease_s", self.lease_s, positive=True,
                        hint="pass a lease of a few seconds such as lease_s=10.0")
        if not isinstance(self.storage, str) or not self.storage:
            msg = (f"checkpoint storage must be a non-empty directory path or pyarrow.fs uri, got {self.storage!r}; "
                   "pass storage='checkpoints' or storage='s3://bucket/prefix'")
            raise PlanError(msg)
        if self.mode not in ("aligned", "unaligned"):
            msg = f"unknown checkpoint mode {self.mode!r}; use mode='aligned' or mode='unaligned'"
            raise PlanError(msg)
        if not isinstance(self.incremental, bool):
            msg = f"checkpoint incremental must be True or False, got {self.incremental!r}"
            raise PlanError(msg)
        if self.incremental and self.max_concurrent != 1:
            msg = (f"incremental checkpoints name pieces of the newest completed checkpoint, which must stay until the "
                   f"next one completes: pass max_concurrent=1, not {self.max_concurrent}")
            raise PlanError(msg)
        if self.aligned_timeout_s is not None:
            require_number("checkpoint aligned_timeout_s", self.aligned_timeout_s, positive=False,
                           hint="pass aligned_timeout_s=None to always align, or a few hundred milliseconds")
            if self.mode != "aligned":
                msg = "aligned_timeout_s applies to mode='aligned' only; unaligned checkpoints never align"
                raise PlanError(msg)
