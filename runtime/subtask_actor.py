"""The actor that runs a subtask, and that a restart resets in place instead of replacing.

A :class:`SubtaskActor` holds one :class:`~onceflow.runtime.subtask.Subtask`
of the job's current attempt and hands it every call. When the job restarts,
the driver fences the attempt in every actor that still answers
(:meth:`SubtaskActor.fence`) and resets the actor for the next attempt
(:meth:`SubtaskActor.reset`): a new subtask object, restored from the
checkpoint, in the same process. Only actors that died, hang, or could not
stop their work cleanly are killed and started anew: starting a process is
most of a restart's time (``benchmarks/README.md``, recovery), as it is
what Flink avoids by redeploying tasks into the TaskManagers that are left.

Fencing in place must be as strong as killing. What could reach the next
attempt from the fenced one, and what stops it:

- a call already running (a push, a source's read loop, a snapshot, a
  commit): :meth:`fence` cancels it and the old subtask waits for the work
  that runs in threads (a snapshot being written, a commit, a sink write)
  to end, or reports that it could not (the actor is then killed);
- a call that arrives later from a fenced sender (a push or barrier still in
  flight from an upstream actor, a coordinator's notification): every such
  call names its sender's attempt, and a call of another attempt is dropped;
- the sink's writer: aborted by the fence, so recovery resolves the sink's
  transactions with no writer of the job alive, as after a kill.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from onceflow.runtime.subtask import AttemptFencedError, OperatorSubtask, SourceSubtask, Subtask, subtask_class
from onceflow.testing.failpoints import crash_point

if TYPE_CHECKING:
    from collections.abc import Coroutine

    from ray.actor import ActorHandle

    from onceflow.runtime.channel import ChannelMessage
    from onceflow.runtime.deployment import AttemptId, CheckpointSetup, RuntimeOptions, SubtaskRestore
    from onceflow.runtime.loops import LoopStatus
    from onceflow.runtime.metrics import SubtaskCounters
    from onceflow.runtime.plan import PhysicalPlan

__all__ = ["FENCE_WAIT_S", "SubtaskActor"]

log = logging.getLogger("onceflow")

FENCE_WAIT_S = 5.0
"""How long a fence waits for the fenced subtask's work in threads to end before it reports failure."""


class SubtaskActor:
    """One subtask of a job, as a Ray actor (``<job>/<vertex>/<subtask>``) that survives the job's restarts.

    Takes the arguments of :class:`~onceflow.runtime.subtask.Subtask` and
    builds the first attempt's subtask from them (a source's or an
    operator's, as the vertex needs); :meth:`reset` builds the next ones.
    """

    def __init__(self, plan: PhysicalPlan, vertex_id: int, subtask: int, options: RuntimeOptions,
                 checkpointing: CheckpointSetup | None = None, restore: SubtaskRestore | None = None,
                 attempt: AttemptId | None = None) -> None:
        self._args = (plan, vertex_id, subtask, options)
        self._calls: set[asyncio.Task[Any]] = set()
        """The calls running in the current subtask (a fence cancels them)."""
        self._current: Subtask = self._build(checkpointing, restore, attempt)
        self._attempt: int | None = attempt.number if attempt is not None else 0
        """The attempt calls must name (``None`` while fenced: every such call is dropped)."""
        self._fencing: tuple[int, asyncio.Future[bool]] | None = None
        """While fenced: the attempt, and whether its subtask stopped cleanly."""

    # -- restarts ---------------------------------------------------------------------

    async def fence(self, attempt: int) -> bool:
        """Fence ``attempt`` here: cancel its calls and retire its subtask (:meth:`Subtask.fence`).

        Returns whether the subtask stopped cleanly; ``False`` means the
        caller must kill this actor. A repeated fence of the same attempt
        answers as the first did; a fence of another attempt than the one
        running answers ``False``.
        """
        if self._fencing is not None:
            fenced, result = self._fencing
            return fenced == attempt and await asyncio.shield(result)
        if self._attempt != attempt:
            return False
        self._attempt = None
        result = asyncio.ensure_future(self._retire())
        self._fencing = (attempt, result)
        return await asyncio.shield(result)

    async def _retire(self) -> bool:
        self._current.mark_fenced()  # first: a cancelled call then finds its subtask fenced, not failed
        calls = list(self._calls)
        for call in calls:
            call.cancel()
        if calls:
            _, running = await asyncio.wait(calls, timeout=FENCE_WAIT_S)
            if running:
                return False
        plan, _, subtask, _ = self._args
        crash_point(plan.job, "subtask.fence", subtask)
        return await self._current.fence(FENCE_WAIT_S)

    async def reset(self, checkpointing: CheckpointSetup | None, restore: SubtaskRestore | None,
                    attempt: AttemptId) -> str:
        """Start ``attempt`` in this actor after a fence: a new subtask, restored from ``restore``.

        Raises:
            RuntimeError: the actor was not fenced first.
        """
        if self._fencing is None or not self._fencing[1].done() or not self._fencing[1].result():
            msg = f"{self._current.task}: reset for attempt {attempt.number} without a clean fence of the last one"
            raise RuntimeError(msg)
        plan, _, subtask, _ = self._args
        crash_point(plan.job, "subtask.reset", subtask)
        # In a thread: restoring reads the checkpoint, and the actor keeps answering meanwhile.
        self._current = await asyncio.to_thread(self._build, checkpointing, restore, attempt)
        self._fencing = None
        self._attempt = attempt.number
        return self._current.task

    def _build(self, checkpointing: CheckpointSetup | None, restore: SubtaskRestore | None,
               attempt: AttemptId | None) -> Subtask:
        plan, vertex_id, subtask, options = self._args
        return subtask_class(plan.vertices[vertex_id])(plan, vertex_id, subtask, options, checkpointing, restore,
                                                       attempt=attempt)

    def _takes(self, attempt: int | None) -> bool:
        """Whether a call from a sender of ``attempt`` (``None``: the job's driver) reaches the subtask."""
        return self._attempt is not None and (attempt is None or attempt == self._attempt)

    async def _run(self, coroutine: Coroutine[Any, Any, Any], fenced: Any = None) -> Any:
        """Run a call of the current subtask as a task a fence can cancel; one that the fence ends returns ``fenced``.

        A fenced attempt's calls end quietly: their callers are fenced too, or
        (the job's driver) no longer wait for them; raising would only have
        Ray report errors nobody retrieves.
        """
        task = asyncio.ensure_future(coroutine)
        self._calls.add(task)
        try:
            return await task
        except asyncio.CancelledError:
            if task.cancelled() and self._attempt is None:
                return fenced
            raise
        except AttemptFencedError:
            return fenced
        finally:
            self._calls.discard(task)

    def _source(self) -> SourceSubtask:
        assert isinstance(self._current, SourceSubtask), "a source subtask's call reached another subtask"
        return self._current

    def _operator(self) -> OperatorSubtask:
        assert isinstance(self._current, OperatorSubtask), "an operator subtask's call reached a source subtask"
        return self._current

    # -- the subtask's calls ----------------------------------------------------------

    def node(self) -> str:
        """The id of the Ray node this actor runs on (``""`` outside Ray)."""
        return self._current.node()

    def metrics(self) -> SubtaskCounters:
        """The current subtask's counters (a fenced one's, until the reset)."""
        return self._current.metrics()

    async def connect(self, downstream: dict[int, list[ActorHandle]]) -> str:
        """Wire the output gates (:meth:`Subtask.connect`)."""
        return await self._run(self._current.connect(downstream))

    async def done(self) -> None:
        """Return when the subtask processed its end of input (:meth:`Subtask.done`)."""
        await self._run(self._current.done())

    async def watch(self) -> None:
        """Return only if the subtask fails (:meth:`Subtask.watch`)."""
        await self._run(self._current.watch())

    async def run(self) -> None:
        """A source: read until the end (:meth:`SourceSubtask.run`)."""
        await self._run(self._source().run())

    def stop(self) -> None:
        """A source: end the input now."""
        if self._attempt is not None:
            self._source().stop()

    async def push(self, message: ChannelMessage, attempt: int | None = None) -> bool:
        """One channel message from a sender of ``attempt``; ``False`` (dropped) if that attempt was fenced."""
        if not self._takes(attempt):
            return False
        return await self._run(self._operator().push(message), fenced=False)

    async def receive_barrier(self, channel: int, checkpoint_id: int, triggered_at: float, last_seq: int,
                              attempt: int | None = None) -> None:
        """An unaligned barrier from a sender of ``attempt`` (:meth:`OperatorSubtask.receive_barrier`)."""
        if self._takes(attempt):
            await self._run(self._operator().receive_barrier(channel, checkpoint_id, triggered_at, last_seq))

    async def trigger_checkpoint(self, checkpoint_id: int, triggered_at: float, attempt: int | None = None) -> None:
        """A source: snapshot and inject barrier ``checkpoint_id``, if the coordinator's attempt is this one."""
        if self._takes(attempt):
            await self._run(self._source().trigger_checkpoint(checkpoint_id, triggered_at))

    async def notify_checkpoint_complete(self, checkpoint_id: int, attempt: int | None = None) -> None:
        """Checkpoint ``checkpoint_id`` completed: the sink commits (:meth:`Subtask.notify_checkpoint_complete`)."""
        if self._takes(attempt):
            await self._run(self._current.notify_checkpoint_complete(checkpoint_id))

    async def abort_checkpoint(self, checkpoint_id: int, attempt: int | None = None) -> None:
        """The coordinator gave up on ``checkpoint_id``."""
        if self._takes(attempt):
            await self._run(self._current.abort_checkpoint(checkpoint_id))

    async def commit(self) -> int:
        """Without checkpoints: commit what the sink pre-committed at the end of input."""
        return await self._run(self._current.commit())

    async def abort(self) -> None:
        """Stop the sink's writes (:meth:`Subtask.abort`)."""
        await self._run(self._current.abort())

    async def loop_status(self) -> LoopStatus:
        """An operator on a loop: its counts (:meth:`OperatorSubtask.loop_status`)."""
        return await self._run(self._operator().loop_status())

    async def end_loop(self) -> None:
        """A loop head: end the output (:meth:`OperatorSubtask.end_loop`)."""
        await self._run(self._operator().end_loop())
