"""Checkpointing and restart options: :class:`CheckpointConfig`, :class:`RestartStrategy`.

Both are small frozen values that a user passes to ``of.run`` (``checkpoint=``
and ``restart=``) and that travel, pickled, to the coordinator. They validate
themselves on construction, so a bad option fails when the job is planned, not
minutes later on a cluster. :class:`RestartTracker` is the sans-IO piece that
applies a strategy: the job manager calls :meth:`RestartTracker.on_failure`
after every failure and sleeps for the delay it returns, or gives up on ``None``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from onceflow.errors import PlanError

__all__ = ["CheckpointConfig", "RestartStrategy", "RestartTracker"]

RestartKind = Literal["fixed_delay", "exponential_backoff", "no_restart"]
"""How a :class:`RestartStrategy` spaces its restart attempts."""


def _require_int(name: str, value: object, minimum: int, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        msg = f"{name} must be an integer, got {value!r}; {hint}"
        raise PlanError(msg)
    if value < minimum:
        msg = f"{name} must be >= {minimum}, got {value}; {hint}"
        raise PlanError(msg)


def _require_number(name: str, value: object, *, positive: bool, hint: str) -> None:
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
        mode: barrier handling; only ``"aligned"`` is implemented.
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

    Raises:
        PlanError: an option is out of range or ``mode`` is not ``"aligned"``.

    Example:
        >>> config = CheckpointConfig(interval_s=0.5, storage="/tmp/chk", retain=2)
        >>> config.mode, config.retain
        ('aligned', 2)
        >>> CheckpointConfig(mode="unaligned")
        Traceback (most recent call last):
        ...
        onceflow.errors.PlanError: unaligned mode is not implemented yet; use mode='aligned'

    """

    interval_s: float = 1.0
    storage: str = "checkpoints"
    mode: str = "aligned"
    timeout_s: float = 60.0
    min_pause_s: float = 0.0
    max_concurrent: int = 1
    retain: int = 3
    tolerable_failures: int = 0
    lease_s: float = 10.0

    def __post_init__(self) -> None:
        _require_number("checkpoint interval_s", self.interval_s, positive=True,
                        hint="pass a positive interval such as interval_s=1.0")
        _require_number("checkpoint timeout_s", self.timeout_s, positive=True,
                        hint="pass a positive timeout such as timeout_s=60.0")
        _require_number("checkpoint min_pause_s", self.min_pause_s, positive=False,
                        hint="pass min_pause_s=0 for no pause between checkpoints")
        _require_int("checkpoint max_concurrent", self.max_concurrent, 1,
                     hint="pass max_concurrent=1 for one checkpoint in flight at a time")
        _require_int("checkpoint retain", self.retain, 1,
                     hint="keep at least the newest complete checkpoint (retain=1)")
        _require_int("checkpoint tolerable_failures", self.tolerable_failures, 0,
                     hint="pass tolerable_failures=0 to fail the job on the first failed checkpoint")
        _require_number("checkpoint lease_s", self.lease_s, positive=True,
                        hint="pass a lease of a few seconds such as lease_s=10.0")
        if not isinstance(self.storage, str) or not self.storage:
            msg = (f"checkpoint storage must be a non-empty directory path or pyarrow.fs uri, got {self.storage!r}; "
                   "pass storage='checkpoints' or storage='s3://bucket/prefix'")
            raise PlanError(msg)
        if self.mode != "aligned":
            msg = ("unaligned mode is not implemented yet; use mode='aligned'"
                   if self.mode == "unaligned"
                   else f"unknown checkpoint mode {self.mode!r} (unaligned mode is not implemented yet); "
                        "use mode='aligned'")
            raise PlanError(msg)


@dataclass(frozen=True, slots=True)
class RestartStrategy:
    """How often, and after what delay, a failed job is restarted from its newest checkpoint.

    Build one with :meth:`fixed_delay`, :meth:`exponential_backoff`,
    :meth:`no_restart` or :meth:`default` rather than the constructor.

    Attributes:
        kind: ``"fixed_delay"``, ``"exponential_backoff"`` or ``"no_restart"``.
        attempts: the most restarts allowed (0 for ``no_restart``).
        delay_s: the delay before the first restart (every restart for ``fixed_delay``).
        max_delay_s: the cap on an exponential delay (equal to ``delay_s`` otherwise).
        multiplier: the factor between two consecutive exponential delays.

    Raises:
        PlanError: an option is out of range.

    Example:
        >>> RestartStrategy.fixed_delay(attempts=2, delay_s=0.5).delay_for(2)
        0.5
        >>> backoff = RestartStrategy.exponential_backoff(initial_s=1.0, max_s=5.0, attempts=5)
        >>> [backoff.delay_for(n) for n in range(1, 7)]
        [1.0, 2.0, 4.0, 5.0, 5.0, None]
        >>> RestartStrategy.no_restart().delay_for(1) is None
        True

    """

    kind: RestartKind = "fixed_delay"
    attempts: int = 3
    delay_s: float = 0.5
    max_delay_s: float = 0.5
    multiplier: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ("fixed_delay", "exponential_backoff", "no_restart"):
            msg = (f"unknown restart strategy {self.kind!r}; use RestartStrategy.fixed_delay, "
                   "RestartStrategy.exponential_backoff or RestartStrategy.no_restart")
            raise PlanError(msg)
        _require_int("restart attempts", self.attempts, 0, hint="pass attempts=0 (or no_restart()) to never restart")
        _require_number("restart delay_s", self.delay_s, positive=False, hint="pass delay_s=0 to restart at once")
        _require_number("restart max_s", self.max_delay_s, positive=False, hint="pass max_s >= initial_s")
        if self.max_delay_s < self.delay_s:
            msg = (f"restart max_s ({self.max_delay_s}) is below initial_s ({self.delay_s}); "
                   "pass max_s >= initial_s")
            raise PlanError(msg)
        _require_number("restart multiplier", self.multiplier, positive=True, hint="pass multiplier=2.0")
        if self.multiplier < 1:
            msg = f"restart multiplier must be >= 1, got {self.multiplier}; pass multiplier=2.0"
            raise PlanError(msg)

    @classmethod
    def fixed_delay(cls, attempts: int, delay_s: float) -> RestartStrategy:
        """Restart up to ``attempts`` times, waiting ``delay_s`` seconds before each.

        Example:
            >>> RestartStrategy.fixed_delay(attempts=3, delay_s=1.0)
            RestartStrategy(kind='fixed_delay', attempts=3, delay_s=1.0, max_delay_s=1.0, multiplier=1.0)

        """
        return cls("fixed_delay", attempts, delay_s, delay_s, 1.0)

    @classmethod
    def exponential_backoff(cls, initial_s: float, max_s: float, attempts: int,
                            multiplier: float = 2.0) -> RestartStrategy:
        """Restart up to ``attempts`` times; delays grow by ``multiplier`` from ``initial_s``, capped at ``max_s``.

        Example:
            >>> RestartStrategy.exponential_backoff(initial_s=0.1, max_s=1.0, attempts=10).delay_for(3)
            0.4

        """
        return cls("exponential_backoff", attempts, initial_s, max_s, multiplier)

    @classmethod
    def no_restart(cls) -> RestartStrategy:
        """Never restart: the first failure fails the job.

        Example:
            >>> RestartStrategy.no_restart().attempts
            0

        """
        return cls("no_restart", 0, 0.0, 0.0, 1.0)

    @classmethod
    def default(cls) -> RestartStrategy:
        """The strategy for a checkpointed job that names none: three restarts, 0.5 s apart.

        Example:
            >>> RestartStrategy.default() == RestartStrategy.fixed_delay(attempts=3, delay_s=0.5)
            True

        """
        return cls.fixed_delay(attempts=3, delay_s=0.5)

    def delay_for(self, attempt: int) -> float | None:
        """The delay in seconds before restart number ``attempt`` (from 1), or ``None`` when attempts are exhausted.

        Raises:
            PlanError: ``attempt`` is below 1.

        """
        if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
            msg = f"restart attempt must be an integer >= 1, got {attempt!r}; count attempts from 1"
            raise PlanError(msg)
        if attempt > self.attempts:
            return None
        if self.kind != "exponential_backoff":
            return float(self.delay_s)
        try:
            delay = self.delay_s * self.multiplier ** (attempt - 1)
        except OverflowError:
            return float(self.max_delay_s)
        return float(min(delay, self.max_delay_s))


class RestartTracker:
    """Applies a :class:`RestartStrategy` to a job's failures (sans-IO: it never sleeps).

    Attributes:
        strategy: the strategy being applied.
        attempts: the restarts granted so far.

    Example:
        >>> tracker = RestartTracker(RestartStrategy.fixed_delay(attempts=2, delay_s=0.25))
        >>> tracker.on_failure(), tracker.on_failure(), tracker.on_failure()
        (0.25, 0.25, None)
        >>> tracker.attempts
        2

    """

    def __init__(self, strategy: RestartStrategy) -> None:
        self.strategy = strategy
        self.attempts = 0

    def on_failure(self) -> float | None:
        """Record a failure; return the delay before the next restart, or ``None`` to give up."""
        delay = self.strategy.delay_for(self.attempts + 1)
        if delay is not None:
            self.attempts += 1
        return delay

    def __repr__(self) -> str:
        return f"RestartTracker({self.strategy!r}, attempts={self.attempts})"
