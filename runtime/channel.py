"""Sequenced, credit-based channels between subtasks (sans-IO).

Every message on a channel carries ``(channel, seq)``. The receiver applies
messages in sequence order and drops a sequence it has already applied,
whatever order or how many times Ray delivers them. The sender keeps at most
``credits`` unacknowledged messages per channel; a message is acknowledged when
the receiver has *processed* it, so a slow consumer holds back its producers
and backpressure reaches the sources.

Nothing here imports Ray: the actor moves :class:`ChannelMessage` objects and
asks these classes what to do.

Example:
    >>> receiver = ChannelReceiver()
    >>> [m.seq for m in receiver.accept(ChannelMessage(0, 1))]
    []
    >>> [m.seq for m in receiver.accept(ChannelMessage(0, 0))]
    [0, 1]
    >>> receiver.accept(ChannelMessage(0, 1))  # a duplicate is dropped
    []

"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["ChannelMessage", "ChannelReceiver", "ChannelSender", "InputWatermarks"]

NO_WATERMARK = -(2**63)
END_OF_TIME = 2**63 - 1


@dataclass(frozen=True, slots=True)
class ChannelMessage:
    """One message on a channel.

    Attributes:
        channel: the channel's index among the receiver's inputs.
        seq: the message's sequence number on its channel, from 0.
        batch: the records, or ``None`` for a control-only message.
        watermarks: ``(rows, watermark)`` pairs in order: the sender's watermark
            advanced to ``watermark`` after the first ``rows`` rows of ``batch``.
            Keeping the position makes coalescing batches never move a
            watermark ahead of (or behind) the rows it followed.
        barrier: ``(checkpoint id, trigger time)`` after the rows and watermarks.
        eof: the end of the channel's data (barriers may still follow).
    """

    channel: int
    seq: int
    batch: pa.RecordBatch | None = None
    watermarks: tuple[tuple[int, int], ...] = ()
    barrier: tuple[int, float] | None = None
    eof: bool = False


class ChannelReceiver:
    """Puts one channel's messages back in sequence order, dropping repeats."""

    __slots__ = ("_early", "duplicates", "expected")

    def __init__(self) -> None:
        self.expected = 0
        self.duplicates = 0
        self._early: dict[int, ChannelMessage] = {}

    def accept(self, message: ChannelMessage) -> list[ChannelMessage]:
        """Take a delivered message; return the messages now ready, in order."""
        if message.seq < self.expected or message.seq in self._early:
            self.duplicates += 1
            return []
        if message.seq > self.expected:
            self._early[message.seq] = message
            return []
        ready = [message]
        self.expected += 1
        while self.expected in self._early:
            ready.append(self._early.pop(self.expected))
            self.expected += 1
        return ready

    @property
    def waiting(self) -> int:
        """Messages that arrived early and wait for a gap to fill."""
        return len(self._early)


class ChannelSender:
    """Numbers one channel's messages and accounts for its credits.

    Args:
        credits: the most unacknowledged messages the channel may carry.

    """

    __slots__ = ("credits", "next_seq", "unacked")

    def __init__(self, credits: int) -> None:
        if credits < 1:
            msg = f"a channel needs at least one credit, got {credits}"
            raise ValueError(msg)
        self.credits = credits
        self.next_seq = 0
        self.unacked = 0

    def has_credit(self) -> bool:
        """Whether another message may be sent now."""
        return self.unacked < self.credits

    def on_send(self) -> int:
        """Record a send; return the message's sequence number."""
        seq = self.next_seq
        self.next_seq += 1
        self.unacked += 1
        return seq

    def on_ack(self) -> None:
        """Record that the receiver processed the oldest unacknowledged message."""
        if self.unacked == 0:
            msg = "acknowledgement without an unacknowledged message"
            raise RuntimeError(msg)
        self.unacked -= 1


class InputWatermarks:
    """Tracks the watermark of every input channel; the operator's is their minimum.

    A channel that ended counts as the end of time, so a finished input never
    holds event time back.
    """

    __slots__ = ("_per_channel", "current")

    def __init__(self, channels: int) -> None:
        self._per_channel = [NO_WATERMARK] * channels
        self.current = NO_WATERMARK if channels else END_OF_TIME

    def update(self, channel: int, watermark: int) -> int | None:
        """Record ``channel``'s watermark; return the new minimum if it advanced."""
        if watermark <= self._per_channel[channel]:
            return None
        self._per_channel[channel] = watermark
        low = min(self._per_channel)
        if low > self.current:
            self.current = low
            return low
        return None
