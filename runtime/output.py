"""Output side of a subtask: partitioning, batch coalescing and credit waits.

An :class:`OutputGate` serves one outgoing edge. It partitions every batch
(forward, by key group, or round-robin), appends the parts to per-channel
buffers, and flushes a buffer as one Ray call when it holds
``batch_bytes`` or has waited ``linger_s``. Each channel's
:class:`~onceflow.runtime.channel.ChannelSender` bounds the unacknowledged calls; a
flush with no credit left waits for the oldest call to be acknowledged, which
is how backpressure reaches the source.

The actor serialises every use of a gate under its processing lock, so
flushes of one channel never interleave and sequence numbers follow data
order.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import ray

from onceflow.errors import DataError
from onceflow.operators.keygroups import hash_columns, key_group_range, require_key_columns, split_by_subtask
from onceflow.runtime.channel import NO_WATERMARK, ChannelMessage, ChannelSender
from onceflow.runtime.plan import OutputSpec, Routing

if TYPE_CHECKING:
    from ray.actor import ActorHandle

__all__ = ["DownstreamFailedError", "OutputChannel", "OutputGate"]


class DownstreamFailedError(Exception):
    """A receiver reported that it failed; the real cause is reported by that receiver."""


class OutputChannel:
    """One channel: a buffer, a sequence and credits, and the calls in flight."""

    def __init__(self, handle: ActorHandle, channel: int, credits: int, attempt: int = 0) -> None:
        self._handle = handle
        self._channel = channel
        self._attempt = attempt
        self._sender = ChannelSender(credits)
        self._in_flight: deque[Any] = deque()
        self._buffer: list[pa.RecordBatch] = []
        self.buffered_rows = 0
        self.buffered_bytes = 0
        self.buffered_since = 0.0
        self._marks: list[tuple[int, int]] = []
        self._watermark = NO_WATERMARK
        self.backpressure_s = 0.0
        self.messages = 0
        self.data_messages = 0
        """Messages with rows, watermarks or the end (not a barrier alone)."""

    def append(self, batch: pa.RecordBatch) -> None:
        if not self.pending:
            self.buffered_since = time.monotonic()
        self._buffer.append(batch)
        self.buffered_rows += batch.num_rows
        self.buffered_bytes += batch.nbytes

    def set_watermark(self, watermark: int) -> None:
        """Record that the watermark advanced after the rows buffered so far."""
        if watermark <= self._watermark:
            return
        if not self.pending:
            self.buffered_since = time.monotonic()
        self._watermark = watermark
        if self._marks and self._marks[-1][0] == self.buffered_rows:
            self._marks[-1] = (self.buffered_rows, watermark)
        else:
            self._marks.append((self.buffered_rows, watermark))

    @property
    def pending(self) -> bool:
        return bool(self._buffer) or bool(self._marks)

    async def _acknowledge_oldest(self) -> None:
        try:
            ok = await self._in_flight.popleft()
        except ray.exceptions.RayActorError as error:
            # The receiver died; the job reports that death as the cause.
            raise DownstreamFailedError from error
        self._sender.on_ack()
        if not ok:
            raise DownstreamFailedError

    async def flush(self, *, eof: bool = False, barrier: tuple[int, float] | None = None) -> None:
        """Send the buffered rows and watermarks, then ``barrier`` and ``eof``, as one message."""
        if not self.pending and not eof and barrier is None:
            return
        await self.wait_for_credit()
        self._send(eof=eof, barrier=barrier)

    def unaligned_barrier(self, checkpoint_id: int, timestamp: float) -> None:
        """Send barrier ``checkpoint_id`` ahead of the messages the receiver has not processed yet.

        The buffered rows go first as a message of their own, credit or not
        (one message over the credits, once per checkpoint): they were produced
        before the snapshot, so they belong before the barrier. The barrier
        itself is a call of its own that takes no credit and names the last
        message before it; the receiver records the messages up to that one as
        channel state instead of waiting for them.
        """
        if self.pending:
            self._send()
        self._handle.receive_barrier.remote(self._channel, checkpoint_id, timestamp, self._sender.next_seq - 1,
                                           self._attempt)

    def _send(self, *, eof: bool = False, barrier: tuple[int, float] | None = None) -> None:
        batch = None
        if self._buffer:
            batch = self._buffer[0] if len(self._buffer) == 1 else pa.concat_batches(self._buffer)
        message = ChannelMessage(self._channel, self._sender.on_send(), batch, tuple(self._marks), barrier, eof)
        self._buffer = []
        self.buffered_rows = 0
        self.buffered_bytes = 0
        self._marks = []
        self._in_flight.append(self._handle.push.remote(message, self._attempt))
        self.messages += 1
        self.data_messages += batch is not None or bool(message.watermarks) or eof

    async def wait_for_credit(self) -> None:
        """Return once another message may be sent (waiting for acknowledgements counts as backpressure)."""
        if self._sender.has_credit():
            return
        started = time.monotonic()
        while not self._sender.has_credit():
            await self._acknowledge_oldest()
        self.backpressure_s += time.monotonic() - started

    async def drain(self) -> None:
        """Wait until the receiver acknowledged every message sent."""
        while self._in_flight:
            await self._acknowledge_oldest()


class OutputGate:
    """One outgoing edge: routes batches to its channels.

    Args:
        spec: the edge.
        subtask: the sending subtask's index.
        handles: the downstream vertex's actors, by subtask.
        operator: the emitting operator's name, for errors.
        max_parallelism: the number of key groups.
        credits: unacknowledged messages per channel.
        batch_bytes: flush a channel once it buffers this many bytes.
        attempt: the sender's attempt: a receiver reset for a later one drops the message.

    """

    def __init__(self, spec: OutputSpec, subtask: int, handles: list[ActorHandle], *, operator: str,
                 max_parallelism: int, credits: int, batch_bytes: int, attempt: int = 0) -> None:
        self.spec = spec
        self._operator = operator
        self._batch_bytes = batch_bytes
        self._max_parallelism = max_parallelism
        self._parallelism = len(handles)
        offset = subtask if spec.routing is not Routing.FORWARD else 0
        if spec.routing is Routing.FORWARD:
            self.channels = [OutputChannel(handles[subtask], spec.channel_base, credits, attempt)]
        else:
            self.channels = [OutputChannel(h, spec.channel_base + offset, credits, attempt) for h in handles]
        self._next = subtask % len(self.channels)
        # Key group -> downstream subtask, for vectorised routing.
        self._subtask_of_group = np.zeros(max_parallelism, dtype=np.int64)
        for target in range(self._parallelism):
            self._subtask_of_group[list(key_group_range(target, self._parallelism, max_parallelism))] = target

    def _partition(self, batch: pa.RecordBatch) -> list[tuple[OutputChannel, pa.RecordBatch]]:
        if self.spec.routing is Routing.FORWARD:
            return [(self.channels[0], batch)]
        if self.spec.routing is Routing.REBALANCE:
            channel = self.channels[self._next]
            self._next = (self._next + 1) % len(self.channels)
            return [(channel, batch)]
        assert self.spec.keys is not None
        name = self.spec.key_by or self._operator
        if self._parallelism == 1:
            require_key_columns(batch.schema, self.spec.keys, operator=name)
            return [(self.channels[0], batch)]
        groups = hash_columns(batch, self.spec.keys, operator=name) % np.uint32(self._max_parallelism)
        targets = self._subtask_of_group[groups]
        parts = split_by_subtask(batch, targets, self._parallelism)
        return [(self.channels[i], part) for i, part in enumerate(parts) if part is not None]

    async def send(self, batch: pa.RecordBatch) -> None:
        """Route ``batch``; flush the channels whose buffers are full."""
        if batch.num_rows == 0:
            return
        for channel, part in self._partition(batch):
            if channel._buffer and not part.schema.equals(channel._buffer[0].schema):
                msg = (
                    f"operator {self._operator!r}: emitted batches with different schemas "
                    f"([{part.schema.to_string(show_schema_metadata=False)}] after "
                    f"[{channel._buffer[0].schema.to_string(show_schema_metadata=False)}]); "
                    "make every input of a union or sink carry the same columns"
                )
                raise DataError(msg, operator=self._operator)
            channel.append(part)
            if channel.buffered_bytes >= self._batch_bytes:
                await channel.flush()

    async def wait_for_credit(self) -> None:
        """Return once every channel may send another message."""
        for channel in self.channels:
            await channel.wait_for_credit()

    def set_watermark(self, watermark: int) -> None:
        """Attach ``watermark`` to the next message of every channel (never ahead of data)."""
        for channel in self.channels:
            channel.set_watermark(watermark)

    async def flush_lingering(self, linger_s: float) -> None:
        """Flush channels whose oldest buffered data waited at least ``linger_s``."""
        now = time.monotonic()
        for channel in self.channels:
            if channel.pending and now - channel.buffered_since >= linger_s:
                await channel.flush()

    async def barrier(self, checkpoint_id: int, timestamp: float, *, unaligned: bool = False) -> None:
        """Send the buffered rows followed by barrier ``checkpoint_id`` on every channel.

        With ``unaligned``, the barrier overtakes what the receivers have not
        processed yet (:meth:`OutputChannel.unaligned_barrier`) and nothing waits for credits.
        """
        for channel in self.channels:
            if unaligned:
                channel.unaligned_barrier(checkpoint_id, timestamp)
            else:
                await channel.flush(barrier=(checkpoint_id, timestamp))

    async def close(self) -> None:
        """Flush everything with end-of-input, then wait for every acknowledgement."""
        for channel in self.channels:
            await channel.flush(eof=True)
        await asyncio.gather(*(channel.drain() for channel in self.channels))

    @property
    def backpressure_s(self) -> float:
        """Seconds spent waiting for credits."""
        return sum(c.backpressure_s for c in self.channels)

    @property
    def messages(self) -> int:
        """Messages sent."""
        return sum(c.messages for c in self.channels)

    @property
    def data_messages(self) -> int:
        """Messages sent with rows, watermarks or the end (barriers alone do not count)."""
        return sum(c.data_messages for c in self.channels)

    @property
    def pending(self) -> bool:
        """Whether a channel buffers rows or a watermark not sent yet."""
        return any(c.pending for c in self.channels)
