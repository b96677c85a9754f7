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

A loop head's gate (``feedback``: its last channels come round the loop)
aligns barriers over its other channels only, since its own barrier can come
round only after the head forwarded it, and takes the snapshot as
Chandy-Lamport does: once the barrier arrived on every other channel, it
records what comes round on the feedback channels until the barrier does (the
snapshot's channel state, :class:`ChannelStateRecorded`). With several
subtasks, another subtask's barrier may come round first: that is
Chandy-Lamport's first marker, and the head snapshots at once, recording its
other channels as an unaligned snapshot does. Feedback channels are never held
back, and go first, so the loop drains before new input enters it. A loop head
holds event time back: no watermark crosses it (:class:`WatermarkAdvanced` is
never reported), so a row that comes round again is never late behind one.

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
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from onceflow.checkpoint.barrier_handler import (
    AbortAlignment,
    AlignedBarrierHandler,
    CollectingBarriers,
    Release,
    Snapshot,
)
from onceflow.runtime.channel import END_OF_TIME, ChannelMessage, ChannelReceiver, InputWatermarks

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Sequence

    import pyarrow as pa

__all__ = ["BarrierAligned", "ChannelStateRecorded", "EndOfInput", "InputEvent", "InputGate", "PieceSize", "Rows",
           "UnalignedSnapshot", "WatermarkAdvanced"]

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
        channel_state: a loop head's snapshot: what comes round the loop until the
            barrier does is recorded, and handed over as :class:`ChannelStateRecorded`.
    """

    checkpoint_id: int
    triggered_at: float
    alignment_s: float
    channel_state: bool = False


@dataclass(frozen=True, slots=True)
class EndOfInput:
    """Every input channel ended."""


@dataclass(frozen=True, slots=True)
class UnalignedSnapshot:
    """Snapshot checkpoint ``checkpoint_id`` now, without waiting for the other channels' barriers.

    The messages that were in flight at this instant (sent before their
    channel's barrier, not yet processed) are still processed as usual, and
    recorded: :class:`ChannelStateRecorded` hands them over once every channel
    passed its barrier.

    Attributes:
        checkpoint_id: the checkpoint.
        triggered_at: when the coordinator triggered it (wall clock).
        waited_s: how long the barrier waited here before the snapshot (or, after an
            aligned checkpoint timed out, how long the alignment ran).
        timed_out: the checkpoint started aligned and switched after ``aligned_timeout_s``.
    """

    checkpoint_id: int
    triggered_at: float
    waited_s: float
    timed_out: bool = False


@dataclass(frozen=True, slots=True)
class ChannelStateRecorded:
    """Every channel passed barrier ``checkpoint_id``: the in-flight messages of its unaligned snapshot.

    Attributes:
        checkpoint_id: the checkpoint.
        messages: the messages (rows and watermarks, no barriers, no end of
            input) in the order they were processed; replayed in that order on
            restore (:meth:`InputGate.replay`).
    """

    checkpoint_id: int
    messages: tuple[ChannelMessage, ...]


InputEvent = Rows | WatermarkAdvanced | BarrierAligned | EndOfInput | UnalignedSnapshot | ChannelStateRecorded


@dataclass(slots=True)
class _Recording:
    """An unaligned checkpoint whose in-flight messages are being recorded."""

    checkpoint_id: int
    triggered_at: float
    started_at: float
    pending: set[int]
    """Channels that have not passed the checkpoint's barrier yet."""
    last_seq: dict[int, int] = field(default_factory=dict)
    """Per channel, the last message before its barrier (a barrier that overtook them); else until an in-band one."""
    messages: list[ChannelMessage] = field(default_factory=list)
    snapshot_taken: bool = False
    timed_out: bool = False


class PieceSize:
    """The size of the pieces a gate hands large messages out in, so that one takes about ``target_s`` to process.

    An unaligned snapshot is taken between pieces, so the time a piece takes
    is what an unaligned barrier waits at a subtask. No fixed size suits every
    operator: 64 KiB of rows keeps a sink throttled to 2,000 rows/s busy for
    a second, and a vectorised map for a fraction of a millisecond, where
    small pieces only cost overhead. The size follows the measured rate
    (bytes over seconds, both decayed sums, so a long piece weighs by its
    time) times ``target_s``, between ``low`` and ``high``.

    Example:
        >>> size = PieceSize(target_s=0.01)
        >>> size.observe(64 << 10, 1.0)  # 64 KiB took a second: pieces of the floor, 4 KiB
        4096
        >>> size = PieceSize(target_s=0.01)
        >>> size.observe(1 << 20, 0.001)  # 1 MiB per millisecond: as large as allowed
        8388608

    Args:
        target_s: how long one piece should take.
        initial: the size before anything was measured.
        low: the smallest size (per-piece overhead bounds the rate below it).
        high: the largest size.
    """

    __slots__ = ("_bytes", "_seconds", "bytes", "high", "low", "target_s")

    _DECAY = 0.8

    def __init__(self, target_s: float = 0.01, *, initial: int = 64 << 10, low: int = 4 << 10,
                 high: int = 8 << 20) -> None:
        self.target_s = target_s
        self.low = low
        self.high = high
        self.bytes = initial
        self._bytes = 0.0
        self._seconds = 0.0

    def observe(self, nbytes: int, seconds: float) -> int:
        """Record that ``nbytes`` took ``seconds`` to process; return the new size."""
        self._bytes = self._DECAY * self._bytes + nbytes
        self._seconds = self._DECAY * self._seconds + max(seconds, 0.0)
        if self._seconds > 0:
            self.bytes = int(min(max(self._bytes / self._seconds * self.target_s, self.low), self.high))
        return self.bytes


class InputGate:
    """Turns the messages of a subtask's input channels into input events (see the module docstring).

    Args:
        channels: the number of input channels.
        names: each channel's sender, for the watermark snapshot (see
            :func:`~onceflow.runtime.channel.input_channel_names`).
        operator: the subtask, for error and log messages.
        clock: seconds, for the alignment time (monotonic).
        aligned_timeout_s: with aligned barriers, a checkpoint whose alignment
            runs longer than this switches to unaligned (``None``: never).
        chunk_bytes: hand large messages out in pieces of about this size, so an
            unaligned snapshot is taken between pieces (``None``: whole messages).
        feedback: how many of the channels, the last ones, come round a loop
            (a loop head; see the module docstring).

    """

    __slots__ = (
        "_aligned_timeout_s",
        "_barriers",
        "_clock",
        "_current",
        "_data",
        "_eof",
        "_held",
        "_last_unaligned",
        "_order",
        "_receivers",
        "_recording",
        "_replay",
        "_seq",
        "_triggered",
        "chunk_bytes",
        "forward",
        "operator",
        "watermarks",
    )

    def __init__(self, channels: int, names: Sequence[str] | None = None, *, operator: str = "",
                 clock: Callable[[], float] = time.monotonic, aligned_timeout_s: float | None = None,
                 chunk_bytes: int | None = None, feedback: int = 0) -> None:
        if feedback and not 0 < feedback < channels:
            msg = f"{operator or 'input gate'}: {feedback} feedback channels of {channels}; a loop needs an input"
            raise ValueError(msg)
        self.operator = operator
        self.forward = channels - feedback
        """The channels that do not come round a loop (the first ones)."""
        self.chunk_bytes = chunk_bytes
        """The size of the pieces large messages are handed out in (``None``: whole); it may change."""
        self._clock = clock
        self._aligned_timeout_s = aligned_timeout_s
        self._recording: _Recording | None = None  # None: no unaligned checkpoint in progress
        self._last_unaligned = 0
        self._triggered: dict[int, float] = {}  # checkpoint id -> trigger time, of in-band barriers seen aligning
        self._replay: collections.deque[ChannelMessage] = collections.deque()
        self.watermarks = InputWatermarks(self.forward, list(names)[: self.forward] if names is not None else None,
                                          operator=operator)
        self._receivers = [ChannelReceiver() for _ in range(channels)]
        self._held: list[collections.deque[ChannelMessage]] = [collections.deque() for _ in range(channels)]
        self._order = [*range(self.forward, channels), *range(self.forward)]  # feedback first: drain the loop
        self._seq = [-1] * channels
        self._data = [0] * channels  # per channel: messages handed out with rows, watermarks or the end
        self._eof = [False] * channels
        self._barriers = AlignedBarrierHandler(self.forward, clock)
        self._current: Iterator[InputEvent] | None = None  # the events of the message being handed out

    @property
    def aligned_timeout_s(self) -> float | None:
        """The alignment time after which an aligned checkpoint switches to unaligned (``None``: never)."""
        return self._aligned_timeout_s

    # -- messages in ----------------------------------------------------------------

    def receive(self, message: ChannelMessage) -> None:
        """Take a delivered message: it waits until the messages before it on its channel arrived.

        While an unaligned snapshot is recording, a message that travelled
        before its channel's barrier is recorded as it arrives (it is still
        processed in its turn): the channel state is complete as soon as the
        last such message is here, however long processing takes.
        """
        ready = [chunk for m in self._receivers[message.channel].accept(message) for chunk in self._split(m)]
        recording = self._recording
        if recording is not None and recording.snapshot_taken:
            for arrived in ready:
                self._record(recording, arrived)
            self._settle(recording, message.channel)
        self._held[message.channel].extend(ready)

    def _split(self, message: ChannelMessage) -> list[ChannelMessage]:
        """With ``chunk_bytes``, cut a large message into pieces (its barrier and end on the last).

        A snapshot is taken between pieces, so an unaligned barrier waits for
        at most one piece's processing, not a whole message's (up to
        ``batch_bytes``); each piece keeps the watermark marks that fall in its rows.
        """
        batch = message.batch
        if self.chunk_bytes is None or batch is None or batch.nbytes <= self.chunk_bytes or batch.num_rows < 2:
            return [message]
        rows = max(1, batch.num_rows * self.chunk_bytes // batch.nbytes)
        starts = list(range(0, batch.num_rows, rows))
        pieces = []
        for number, start in enumerate(starts):
            end = min(start + rows, batch.num_rows)
            last = number == len(starts) - 1
            marks = tuple((r - start, w) for r, w in message.watermarks if start < r <= end or r == start == 0)
            pieces.append(ChannelMessage(message.channel, message.seq, batch.slice(start, end - start), marks,
                                         message.barrier if last else None, message.eof and last))
        return pieces

    def receive_barrier(self, channel: int, checkpoint_id: int, triggered_at: float, last_seq: int) -> None:
        """An unaligned barrier: it overtook ``channel``'s messages after ``last_seq`` (-1: none were sent).

        The first one of a checkpoint makes the snapshot due at the next
        message boundary; the messages of every channel up to its barrier that
        are not processed by then are recorded (see :meth:`receive`).
        """
        recording = self._recording
        if checkpoint_id <= self._last_unaligned and (recording is None or recording.checkpoint_id != checkpoint_id):
            return  # stale, repeated, or a checkpoint already given up
        if recording is None or checkpoint_id > recording.checkpoint_id:
            if checkpoint_id <= self._barriers.last:
                return  # aligned already, or given up
            # Mixed barriers (an upstream subtask whose alignment timed out sends unaligned ones).
            recording = self._unalign(checkpoint_id, triggered_at)
        recording.last_seq[channel] = last_seq
        if recording.snapshot_taken:
            self._settle(recording, channel)

    def _unalign(self, checkpoint_id: int, triggered_at: float, passed: frozenset[int] = frozenset()) -> _Recording:
        """Never align ``checkpoint_id``: snapshot at the next message boundary and record the channels.

        What its in-band barriers hold back is released: those channels (and
        ``passed``) delivered the barrier already, so nothing of theirs is recorded.
        """
        state = self._barriers.state
        aligned = state.received if isinstance(state, CollectingBarriers) and state.checkpoint_id == checkpoint_id \
            else frozenset()
        self._barriers.on_checkpoint_aborted(checkpoint_id)
        return self._start_recording(checkpoint_id, triggered_at, timed_out=False,
                                     pending=set(range(len(self._held))) - aligned - passed)

    def _barrier_came_round(self, channel: int, checkpoint_id: int, triggered_at: float) -> None:
        """An in-band barrier on a feedback channel.

        Usually this head's own, back round the loop: it ends the recording
        (:meth:`_record` saw it arrive). One that comes round before this head
        snapshotted the checkpoint (another subtask of the head sent it round)
        is Chandy-Lamport's first marker: snapshot at once, before anything
        that followed it on this channel, and record the other channels until
        they deliver the barrier.
        """
        recording = self._recording
        if recording is not None and recording.checkpoint_id >= checkpoint_id:
            return
        if checkpoint_id <= max(self._barriers.last, self._last_unaligned):
            return  # snapshotted already, or given up
        self._unalign(checkpoint_id, triggered_at, passed=frozenset({channel}))

    def _start_recording(self, checkpoint_id: int, triggered_at: float, *, timed_out: bool,
                         pending: set[int]) -> _Recording:
        if self._recording is not None:
            log.debug("%s: unaligned checkpoint %d subsumed by %d", self.operator, self._recording.checkpoint_id,
                      checkpoint_id)
        self._recording = _Recording(checkpoint_id, triggered_at, self._clock(), pending, timed_out=timed_out)
        self._last_unaligned = checkpoint_id
        return self._recording

    def abort_checkpoint(self, checkpoint_id: int) -> bool:
        """The coordinator gave up on ``checkpoint_id``: stop aligning or recording it.

        Returns:
            ``True`` if channels held back by alignment were released.
        """
        if self._recording is not None and self._recording.checkpoint_id == checkpoint_id:
            self._recording = None
        return any(isinstance(a, Release) for a in self._barriers.on_checkpoint_aborted(checkpoint_id))

    def replay(self, messages: Sequence[ChannelMessage]) -> None:
        """Restore the in-flight messages of an unaligned snapshot: they come out before any new input, in order."""
        self._replay.extend(messages)

    # -- events out -----------------------------------------------------------------

    def poll(self) -> InputEvent | None:
        """The next event, or ``None`` until more messages arrive (or a blocked channel is released)."""
        while True:
            if self._current is not None:
                event = next(self._current, None)
                if event is not None:
                    return event
                self._current = None
            if self._replay:
                self._current = self._events(self._replay.popleft())
                continue
            checkpoint = self._checkpoint_event()
            if checkpoint is not None:
                return checkpoint
            message = self._next_message()
            if message is None:
                return None
            if message.seq != self._seq[message.channel]:  # not a later piece of a split message
                self._data[message.channel] += message.batch is not None or bool(message.watermarks) or message.eof
            self._seq[message.channel] = message.seq
            self._current = self._events(message)

    def _checkpoint_event(self) -> InputEvent | None:
        """At a message boundary: an unaligned snapshot that is due, or a recording that is complete."""
        self._time_out_alignment()
        recording = self._recording
        if recording is None:
            return None
        if not recording.snapshot_taken:
            recording.snapshot_taken = True
            for channel in sorted(recording.pending):  # what arrived before the snapshot and waits here
                for held in list(self._held[channel]):
                    self._record(recording, held)
                self._settle(recording, channel)
            return UnalignedSnapshot(recording.checkpoint_id, recording.triggered_at,
                                     self._clock() - recording.started_at, recording.timed_out)
        if not recording.pending:
            self._recording = None
            return ChannelStateRecorded(recording.checkpoint_id, tuple(recording.messages))
        return None

    def _time_out_alignment(self) -> None:
        """Switch an aligned checkpoint whose alignment ran past ``aligned_timeout_s`` to unaligned."""
        state = self._barriers.state
        if self._aligned_timeout_s is None or not isinstance(state, CollectingBarriers):
            return
        waited = self._clock() - state.started_at
        if waited < self._aligned_timeout_s:
            return
        checkpoint_id = state.checkpoint_id
        self._barriers.on_checkpoint_aborted(checkpoint_id)  # releases the blocked channels
        pending = set(range(len(self._held))) - set(state.received)
        recording = self._start_recording(checkpoint_id, self._triggered.pop(checkpoint_id, 0.0), timed_out=True,
                                          pending=pending)
        recording.started_at = state.started_at

    def _record(self, recording: _Recording, message: ChannelMessage) -> None:
        """Keep a message that travelled before its channel's barrier of the checkpoint being recorded."""
        channel = message.channel
        if channel not in recording.pending:
            return
        last = recording.last_seq.get(channel)
        if last is not None and message.seq > last:
            return
        if message.batch is not None or message.watermarks:
            recording.messages.append(replace(message, barrier=None, eof=False))
        if message.barrier is not None and message.barrier[0] >= recording.checkpoint_id:
            recording.pending.discard(channel)  # its in-band barrier (an aligned checkpoint that timed out)

    def _settle(self, recording: _Recording, channel: int) -> None:
        """A channel whose every message before the barrier arrived (and was recorded) has passed it."""
        last = recording.last_seq.get(channel)
        if last is not None and self._receivers[channel].expected - 1 >= last:
            recording.pending.discard(channel)

    def drain(self) -> Iterator[InputEvent]:
        """Every event available now, taken one at a time (the caller processes each before the next is made)."""
        while (event := self.poll()) is not None:
            yield event

    def _next_message(self) -> ChannelMessage | None:
        for channel in self._order:
            held = self._held[channel]
            if held and not self._barriers.is_blocked(channel):
                return held.popleft()
        return None

    def _events(self, message: ChannelMessage) -> Iterator[InputEvent]:
        channel, batch = message.channel, message.batch
        if channel >= self.forward:  # round a loop: no watermarks; a barrier ends a recording or starts one
            if batch is not None and batch.num_rows:
                yield Rows(batch)
            if message.barrier is not None:
                self._barrier_came_round(channel, *message.barrier)
            if message.eof:
                yield from self._channel_ended(channel)
            return
        if batch is not None and batch.num_rows:
            self.watermarks.on_rows(channel)
        done = 0
        for rows, watermark in message.watermarks:
            if batch is not None and rows > done:
                yield Rows(batch.slice(done, rows - done))
                done = rows
            advanced = self.watermarks.update(channel, watermark)
            if advanced is not None and not self.loop_head:
                yield WatermarkAdvanced(advanced)
        if batch is not None and batch.num_rows > done:
            yield Rows(batch.slice(done) if done else batch)
        if message.barrier is not None:
            checkpoint_id, triggered_at = message.barrier
            if self._aligned_timeout_s is not None:
                self._triggered = {c: t for c, t in self._triggered.items() if c >= checkpoint_id}
                self._triggered.setdefault(checkpoint_id, triggered_at)
            for action in self._barriers.on_barrier(channel, checkpoint_id):
                if isinstance(action, Snapshot):
                    yield self._aligned(action, triggered_at)
                elif isinstance(action, AbortAlignment):
                    log.debug("%s: alignment of checkpoint %d abandoned", self.operator, action.checkpoint_id)
                # Block and Release take effect in _next_message, which asks is_blocked before every message.
        if message.eof:
            advanced = self.watermarks.update(channel, END_OF_TIME)
            if advanced is not None and advanced < END_OF_TIME and not self.loop_head:
                yield WatermarkAdvanced(advanced)
            yield from self._channel_ended(channel)

    def _aligned(self, snapshot: Snapshot, triggered_at: float) -> BarrierAligned:
        """Barrier aligned: a loop head starts recording what comes round until the barrier does (Chandy-Lamport)."""
        if not self.loop_head:
            return BarrierAligned(snapshot.checkpoint_id, triggered_at, snapshot.alignment_s)
        feedback = range(self.forward, len(self._held))
        recording = self._start_recording(snapshot.checkpoint_id, triggered_at, timed_out=False, pending=set(feedback))
        recording.snapshot_taken = True  # the caller snapshots on this event, before the next one is made
        for channel in feedback:  # arrived before the snapshot, not processed: channel state
            for held in self._held[channel]:
                self._record(recording, held)
        return BarrierAligned(snapshot.checkpoint_id, triggered_at, snapshot.alignment_s, channel_state=True)

    def _channel_ended(self, channel: int) -> Iterator[InputEvent]:
        self._eof[channel] = True
        if all(self._eof):
            yield EndOfInput()

    # -- observation ----------------------------------------------------------------

    @property
    def loop_head(self) -> bool:
        """Whether some channels come round a loop (the gate of a loop head)."""
        return self.forward < len(self._held)

    def data_applied(self, channels: Iterable[int]) -> int:
        """How many messages with rows, watermarks or the end ``channels`` handed out (barriers alone not counted)."""
        return sum(self._data[channel] for channel in channels)

    def ended(self, channels: Iterable[int]) -> bool:
        """Whether every one of ``channels`` delivered its end (and it was handed out)."""
        return all(self._eof[channel] for channel in channels)

    @property
    def idle(self) -> bool:
        """Nothing waits here to be handed out: no message held, early or being replayed."""
        return (self._current is None and not self._replay and not any(self._held)
                and not any(r.waiting for r in self._receivers))

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
