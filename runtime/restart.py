"""Restart strategies: how often, and how soon, a failed job restarts from its newest checkpoint.

A :class:`RestartStrategy` is a job option (``of.run(..., restart=...)``, or
:attr:`~onceflow.runtime.options.JobOptions.restart`): a small frozen value
that validates itself on construction. :class:`RestartTracker` is the sans-IO
piece that applies one: the job supervisor calls
:meth:`RestartTracker.on_failure` after every failure and waits for the delay
it returns, or gives up on ``None``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from onceflow.checkpoint.config import require_int, require_number
from onceflow.errors import PlanError

__all__ = ["RestartKind", "RestartStrategy", "RestartTracker"]

RestartKind = Literal["fixed_delay", "exponential_backoff", "no_restart"]
"""How a :class:`RestartStrategy` spaces its restart attempts."""


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
            msg = (
                f"unknown restart strategy {self.kind!r}; use RestartStrategy.fixed_delay, "
                "RestartStrategy.exponential_backoff or RestartStrategy.no_restart"
            )
            raise PlanError(msg)
        require_int("restart attempts", self.attempts, 0, hint="pass attempts=0 (or no_restart()) to never restart")
        require_number("restart delay_s", self.delay_s, positive=False, hint="pass delay_s=0 to restart at once")
        require_number("restart max_s", self.max_delay_s, positive=False, hint="pass max_s >= initial_s")
        if self.max_delay_s < self.delay_s:
            msg = f"restart max_s ({self.max_delay_s}) is below initial_s ({self.delay_s}); pass max_s >= initial_s"
            raise PlanError(msg)
        require_number("restart multiplier", self.multiplier, positive=True, hint="pass multiplier=2.0")
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
    def exponential_backoff(
        cls, initial_s: float, max_s: float, attempts: int, multiplier: float = 2.0
    ) -> RestartStrategy:
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

    def tracker(self) -> RestartTracker:
        """A new :class:`RestartTracker` applying this strategy, with no restart granted yet.

        Example:
            >>> RestartStrategy.no_restart().tracker().on_failure() is None
            True

        """
        return RestartTracker(self)


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
