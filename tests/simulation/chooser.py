"""Where a schedule's every decision comes from: a seeded or recorded list of choices.

A :class:`Chooser` answers ``choose(n)`` with a number in ``[0, n)`` and
records it, so that any schedule is the list of its choices. Replaying that
list gives the same schedule again; when the list runs out, every further
choice is ``0``, which the scheduler reads as the calmest option (deliver the
oldest message, no crash). That makes a choice list shrinkable: :func:`shrink`
deletes and zeroes parts of a failing list while it keeps failing.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

__all__ = ["Chooser", "shrink"]


class Chooser:
    """Makes, and records, every choice of one schedule.

    Args:
        seed: draw choices from ``random.Random(seed)``.
        choices: replay these choices instead (each taken modulo the options
            offered; ``0`` once they run out).
    """

    def __init__(self, seed: int | None = None, choices: Sequence[int] | None = None) -> None:
        self._random = random.Random(seed).random if choices is None else None
        self._replay = list(choices) if choices is not None else None
        self.made: list[int] = []

    def choose(self, n: int) -> int:
        """A number in ``[0, n)``."""
        if n <= 1:
            return 0
        if self._random is not None:
            value = int(self._random() * n)
        else:
            assert self._replay is not None
            position = len(self.made)
            value = self._replay[position] % n if position < len(self._replay) else 0
        self.made.append(value)
        return value

    def chance(self, one_in: int) -> bool:
        """``True`` once in ``one_in`` times (``choose`` giving ``one_in - 1``: never when replaying zeros)."""
        return self.choose(one_in) == one_in - 1


def shrink(choices: list[int], fails: Callable[[list[int]], bool], budget: int = 400) -> list[int]:
    """Delta-debug ``choices``: delete chunks and zero values while ``fails`` stays true.

    Args:
        choices: a choice list for which ``fails(choices)`` holds.
        fails: runs a schedule from a choice list; ``True`` when it violates an invariant.
        budget: the most schedules to run.

    Returns:
        A choice list, no longer than ``choices``, that still fails.
    """
    best = list(choices)
    runs = 0
    chunk = max(len(best) // 2, 1)
    while chunk >= 1 and runs < budget:
        progress = False
        start = 0
        while start < len(best) and runs < budget:
            candidate = best[:start] + best[start + chunk:]
            runs += 1
            if fails(candidate):
                best = candidate
                progress = True
            else:
                start += chunk
        if not progress:
            chunk //= 2
    for position in range(len(best)):
        if runs >= budget:
            break
        if best[position] != 0:
            candidate = [*best[:position], 0, *best[position + 1:]]
            runs += 1
            if fails(candidate):
                best = candidate
    # Trailing zeros are implied once a list runs out.
    while best and best[-1] == 0:
        best.pop()
    return best
