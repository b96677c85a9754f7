"""The input gate of a subtask (sans-IO): from channel messages to an ordered stream of input events.

A subtask with inputs hands every delivered :class:`~onceflow.runtime.channel.ChannelMessage`
to its :class:`InputGate` (:meth:`InputGate.receive`) and then takes events from it
(:meth:`InputGate.poll`) until there are none. The gate

- puts each channel's messages back in sequence order and drops repeats
  (:class:`~onceflow.runtime.channel.ChannelReceiver`);
- holds back the messages of a channel whose checkpoint barrier arrived while
  other channels have not delivered theirs yet (aligned barriers:
  :class:`~onceflow.checkpoint.barrier_handler.AlignedBarrierHandler`), and
  reports :class:`BarrierAligned` once every channel delivered it;
- tracks each channel's watermark and reports :class:`WatermarkAdvanced`
  when their minimum moves (:class:`~onceflow.runtime.channel.InputWatermarks`);
- reports :class:`EndOfInput` once every channel ended.

Credits: a sender gets its credit back once the receiver *processed* a
message; :meth:`InputGate.applied` says up to which sequence number a
channel's messages were handed out as events, so a channel held back by
alignment keeps its senders' credits.

Events are produced lazily, one at a time, in the order the messages' parts
stand in: the rows before a watermark come out before it, a barrier after a
message's rows, the end of a channel last. State that a snapshot reads (the
per-channel watermarks) changes only when the event that changes it is
taken, so a snapshot taken on :class:`BarrierAligned` sees exactly the
events before it.

Nothing here imports Ray or asyncio.

Example:
    >>> import pyarrow as pa
    >>> gate = InputGate(2)
    >>> gate.receive(ChannelMessage(0, 0, pa.record_batch({"x": [1]}), barrier=(1, 0.0)))
    >>> gate.receive(ChannelMessage(0, 1, pa.record_batch({"x": [2]})))
    >>> [type(e).__name__ for e in gate.drain()]  # channel 0 waits for channel 1's barrier
    ['Rows']
    >>> gate.applied(0)
    0
    >>> gate.receive(ChannelMessage(1, 0, barrier=(1, 0.0)))
    >>> [type(e).__name__ for e in gate.drain()]
    ['BarrierAligned', 'Rows']

"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from onceflow.checkpoint.barrier_handler import AbortAlignment, AlignedBarrierHandler, Release, Snapshot
from onceflow.runtime.channel import END_OF_TIME, ChannelMessage, ChannelReceiver, InputWatermarks

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    import pyarrow as pa

__all__ = ["BarrierAligned", "EndOfInput", "InputEvent", "InputGate", "Rows", "WatermarkAdvanced"]

log = logging.getLogger("onceflow")


@dataclass(frozen=True, slots=True)
class Rows:
    """Records to process."""

    batch: pa.RecordBatch


@dataclass(frozen=True, slots=True)
class WatermarkAdvanced:
    """The minimum watermark over the input channels moved to ``watermark``."""

    watermark: int


@dataclass(frozen=True, slots=True)
class BarrierAligned:
    """Every input channel delivered barrier ``checkpoint_id``: snapshot now.

    Attributes:
        checkpoint_id: the checkpoint.
        triggered_at: when the coordinator triggered it (wall clock).
        alignment_s: how long the first channel's barrier waited for the last one's.
    """

    checkpoint_id: int
    triggered_at: float
    alignment_s: float


@dataclass(frozen=True, slots=True)
class EndOfInput:
    """Every input channel ended."""


InputEvent = Rows | WatermarkAdvanced | BarrierAligned | EndOfInput


class InputGate:
    """Turns the messages of a subtask's input channels into input events (see the module docstring).

    Args:
        channels: the number of input channels.
        names: each channel's sender, for the watermark snapshot (see
            :func:`~onceflow.runtime.channel.input_channel_names`).
        operator: the subtask, for error and log messages.
        clock: seconds, for the alignment time (monotonic).

    """

    __slots__ = ("_barriers", "_current", "_eof", "_held", "_receivers", "_seq", "operator", "watermarks")

    def __init__(self, channels: int, names: Sequence[str] | None = None, *, operator: str = "",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.operator = operator
        self.watermarks = InputWatermarks(channels, names, operator=operator)
        self._receivers = [ChannelReceiver() for _ in range(channels)]
        self._held: list[collections.deque[ChannelMessage]] = [collections.deque() for _ in range(channels)]
        self._seq = [-1] * channels
        self._eof = [False] * channels
        self._barriers = AlignedBarrierHandler(channels, clock)
        self._current: Iterator[InputEvent] | None = None  # the events of the message being handed out

    # -- messages in ----------------------------------------------------------------

    def receive(self, message: ChannelMessage) -> None:
        """Take a delivered message: it waits until the messages before it on its channel arrived."""
        self._held[message.channel].extend(self._receivers[message.channel].accept(message))

    def abort_checkpoint(self, checkpoint_id: int) -> bool:
        """The coordinator gave up on ``checkpoint_id``: stop aligning it; ``True`` if channels were released."""
        return any(isinstance(a, Release) for a in self._barriers.on_checkpoint_aborted(checkpoint_id))

    # -- events out -----------------------------------------------------------------

    def poll(self) -> InputEvent | None:
        """The next event, or ``None`` until more messages arrive (or a blocked channel is released)."""
        while True:
            if self._current is not None:
                event = next(self._current, None)
                if event is not None:
                    return event
                self._current = None
            message = self._next_message()
            if message is None:
                return None
            self._seq[message.channel] = message.seq
            self._current = self._events(message)

    def drain(self) -> Iterator[InputEvent]:
        """Every event available now, taken one at a time (the caller processes each before the next is made)."""
        while (event := self.poll()) is not None:
            yield event

    def _next_message(self) -> ChannelMessage | None:
        for channel, held in enumerate(self._held):
            if held and not self._barriers.is_blocked(channel):
                return held.popleft()
        return None

    def _events(self, message: ChannelMessage) -> Iterator[InputEvent]:
        channel, batch = message.channel, message.batch
        if batch is not None and batch.num_rows:
            self.watermarks.on_rows(channel)
        done = 0
        for rows, watermark in message.watermarks:
            if batch is not None and rows > done:
                yield Rows(batch.slice(done, rows - done))
                done = rows
            advanced = self.watermarks.update(channel, watermark)
            if advanced is not None:
                yield WatermarkAdvanced(advanced)
        if batch is not None and batch.num_rows > done:
            yield Rows(batch.slice(done) if done else batch)
        if message.barrier is not None:
            checkpoint_id, triggered_at = message.barrier
            for action in self._barriers.on_barrier(channel, checkpoint_id):
                if isinstance(action, Snapshot):
                    yield BarrierAligned(action.checkpoint_id, triggered_at, action.alignment_s)
                elif isinstance(action, AbortAlignment):
                    log.debug("%s: alignment of checkpoint %d abandoned", self.operator, action.checkpoint_id)
                # Block and Release take effect in _next_message, which asks is_blocked before every message.
        if message.eof:
            self._eof[channel] = True
            advanced = self.watermarks.update(channel, END_OF_TIME)
            if advanced is not None and advanced < END_OF_TIME:
                yield WatermarkAdvanced(advanced)
            if all(self._eof):
                yield EndOfInput()

    # -- observation ----------------------------------------------------------------

    def applied(self, channel: int) -> int:
        """The sequence number of ``channel``'s newest message handed out as events (-1: none yet).

        A message counts once its first event was taken; its sender's call
        should return once the caller also processed the rest, which it does
        before asking again (the caller drains the gate under one lock).
        """
        return self._seq[channel]

    @property
    def duplicates(self) -> int:
        """Messages delivered more than once and dropped."""
        return sum(r.duplicates for r in self._receivers)

    @property
    def watermark(self) -> int:
        """The minimum watermark over the input channels."""
        return self.watermarks.current
