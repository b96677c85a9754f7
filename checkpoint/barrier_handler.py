"""Barrier alignment for operators with several input channels (sans-IO).

As Flink's aligned checkpoints: when barrier *n* arrives on a channel, that
channel is *blocked* (its later messages wait) until barrier *n* arrived on
every channel; then the operator snapshots, forwards the barrier and releases
the blocked channels. The state machine has two states,
:class:`WaitingForFirstBarrier` and :class:`CollectingBarriers`; every event
returns the actions the caller must carry out, in order.

A barrier of a newer checkpoint that arrives while an older one is still
aligning *subsumes* it: the older alignment is abandoned (the coordinator
will never complete it) and the newer one starts.

Example:
    >>> handler = AlignedBarrierHandler(channels=2, clock=lambda: 0.0)
    >>> handler.on_barrier(0, checkpoint_id=1)
    [Block(channel=0)]
    >>> handler.is_blocked(0), handler.is_blocked(1)
    (True, False)
    >>> handler.on_barrier(1, checkpoint_id=1)
    [Snapshot(checkpoint_id=1, alignment_s=0.0), Release()]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = [
    "AbortAlignment",
    "AlignedBarrierHandler",
    "BarrierAction",
    "Block",
    "CollectingBarriers",
    "Release",
    "Snapshot",
    "WaitingForFirstBarrier",
]


@dataclass(frozen=True, slots=True)
class Block:
    """Hold back the later messages of ``channel`` until :class:`Release`."""

    channel: int


@dataclass(frozen=True, slots=True)
class Release:
    """Unblock every channel; apply their held messages in order."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every channel delivered the barrier: snapshot now, then forward the barrier.

    Attributes:
        checkpoint_id: the checkpoint.
        alignment_s: seconds from the first to the last barrier.
    """

    checkpoint_id: int
    alignment_s: float


@dataclass(frozen=True, slots=True)
class AbortAlignment:
    """The alignment of ``checkpoint_id`` was abandoned (subsumed or aborted)."""

    checkpoint_id: int


BarrierAction = Block | Release | Snapshot | AbortAlignment


@dataclass(frozen=True, slots=True)
class WaitingForFirstBarrier:
    """No alignment in progress. ``last`` is the newest checkpoint handled."""

    last: int = 0


@dataclass(frozen=True, slots=True)
class CollectingBarriers:
    """Aligning ``checkpoint_id``: ``received`` channels delivered its barrier."""

    checkpoint_id: int
    received: frozenset[int] = field(default_factory=frozenset)
    started_at: float = 0.0


class AlignedBarrierHandler:
    """Aligns barriers over ``channels`` input channels.

    Args:
        channels: the number of input channels (0 for a source).
        clock: returns seconds; used to measure alignment time.
    """

    def __init__(self, channels: int, clock: Callable[[], float]) -> None:
        self.channels = channels
        self._clock = clock
        self.state: WaitingForFirstBarrier | CollectingBarriers = WaitingForFirstBarrier()
        self._aborted: set[int] = set()

    @property
    def last(self) -> int:
        """The newest checkpoint whose alignment finished or was abandoned."""
        state = self.state
        return state.last if isinstance(state, WaitingForFirstBarrier) else state.checkpoint_id - 1

    def is_blocked(self, channel: int) -> bool:
        """Whether ``channel``'s messages must wait."""
        state = self.state
        return isinstance(state, CollectingBarriers) and channel in state.received

    def on_barrier(self, channel: int, checkpoint_id: int) -> list[BarrierAction]:
        """Barrier ``checkpoint_id`` arrived on ``channel``; return what to do."""
        if not 0 <= channel < self.channels:
            msg = f"barrier on channel {channel}, but there are {self.channels} channels"
            raise ValueError(msg)
        state = self.state
        if checkpoint_id in self._aborted:
            return []  # the coordinator gave up on it
        if isinstance(state, WaitingForFirstBarrier):
            if checkpoint_id <= state.last:
                return []  # a barrier of a checkpoint already handled or abandoned
            return self._start(channel, checkpoint_id, [])
        if checkpoint_id < state.checkpoint_id or (
            checkpoint_id == state.checkpoint_id and channel in state.received
        ):
            return []  # stale or repeated
        if checkpoint_id > state.checkpoint_id:
            # A newer checkpoint subsumes the one still aligning.
            actions: list[BarrierAction] = [AbortAlignment(state.checkpoint_id), Release()]
            self.state = WaitingForFirstBarrier(state.checkpoint_id)
            return self._start(channel, checkpoint_id, actions)
        received = state.received | {channel}
        if len(received) == self.channels:
            self.state = WaitingForFirstBarrier(checkpoint_id)
            return [Snapshot(checkpoint_id, self._clock() - state.started_at), Release()]
        self.state = CollectingBarriers(checkpoint_id, received, state.started_at)
        return [Block(channel)]

    def _start(self, channel: int, checkpoint_id: int, actions: list[BarrierAction]) -> list[BarrierAction]:
        if self.channels == 1:
            self.state = WaitingForFirstBarrier(checkpoint_id)
            return [*actions, Snapshot(checkpoint_id, 0.0)]
        self.state = CollectingBarriers(checkpoint_id, frozenset({channel}), self._clock())
        return [*actions, Block(channel)]

    def on_checkpoint_aborted(self, checkpoint_id: int) -> list[BarrierAction]:
        """The coordinator aborted ``checkpoint_id``: stop aligning it, ignore its late barriers.

        Older checkpoints are unaffected: with several checkpoints in flight the
        coordinator may abort a newer one and still expect an older one.
        """
        state = self.state
        self._aborted = {i for i in self._aborted if i > self.last} | {checkpoint_id}
        if isinstance(state, CollectingBarriers) and state.checkpoint_id == checkpoint_id:
            self.state = WaitingForFirstBarrier(checkpoint_id)
            return [AbortAlignment(checkpoint_id), Release()]
        return []
