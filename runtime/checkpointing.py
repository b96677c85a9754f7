"""The checkpoint coordinator actor: ``<job>/coordinator``.

A thin Ray adapter around :class:`onceflow.checkpoint.coordinator.CheckpointCoordinator`:
it polls the state machine on a timer, tells source subtasks to inject
barriers, collects acknowledgements, writes each completed checkpoint's
manifest atomically to durable storage (the only thing that makes a checkpoint
complete), then notifies every subtask so sinks commit. Snapshot tables put in
the object store by subtasks are *owned* by this actor, so a crashed subtask
does not take its snapshot with it; if this actor dies, a new one recovers
from the manifests in storage.

The actor serves one *run* of a job (manifests record the run's id, and only
this run's checkpoints, or the one a resume adopted, are restore points) and
one *attempt* at a time: ``start(attempt, ...)`` opens an attempt, ``fence()``
closes it (no more triggers, pending checkpoints aborted, every manifest write
in flight settled) and returns the newest completed checkpoint, which is then
final for that attempt. Acknowledgements of any other attempt are ignored.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import statistics
import time
from typing import TYPE_CHECKING, Any

import ray

from onceflow.checkpoint.coordinator import (
    AbortCheckpoint,
    CheckpointAction,
    CheckpointCoordinator,
    CompletedCheckpoint,
    DiscardCheckpoint,
    FailJob,
    NotifyCheckpointComplete,
    PersistCheckpoint,
    TaskAck,
    TriggerCheckpoint,
)
from onceflow.checkpoint.failure_tolerance import CheckpointFailureReason, CheckpointFailureTolerance
from onceflow.checkpoint.lease import may_complete, taken
from onceflow.checkpoint.savepoint import write_savepoint
from onceflow.checkpoint.storage import CheckpointStorage, CheckpointStorageError
from onceflow.errors import CheckpointError
from onceflow.runtime.deployment import RestoredState
from onceflow.runtime.logs import configure_logging
from onceflow.runtime.telemetry import CheckpointMetrics
from onceflow.testing.failpoints import crash_point, pause_point

if TYPE_CHECKING:
    from ray.actor import ActorHandle

    from onceflow.checkpoint.config import CheckpointConfig

__all__ = ["LEASE_LOST", "CoordinatorActor", "RestorePoint", "percentile"]

LEASE_LOST = "lease lost"
"""The reason of the :class:`CheckpointError` of a run whose storage another run took over."""

log = logging.getLogger("onceflow")

_LEASE_RETRY_S = 0.5
"""How soon a lease renewal that failed (the storage unreachable) is tried again."""

_BASES_KEPT = 16
"""How many triggered checkpoints :meth:`CoordinatorActor.base_of` still answers for."""

_OUTCOMES_KEPT = 1_000
"""How many checkpoint outcomes (completed, failed) :meth:`CoordinatorActor.progress` can still report."""


RestorePoint = tuple[int, dict[str, dict[str, RestoredState]]]
"""A checkpoint id and, per subtask (``<vertex>/<subtask>``), per operator, its state."""


def percentile(values: list[float], q: float) -> float:
    """Return the ``q`` quantile (0..1) of ``values`` by nearest rank; 0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _summary(checkpoint: CompletedCheckpoint, persisted_at: float) -> dict[str, Any]:
    tasks = {task: ack.metrics for task, ack in checkpoint.acks.items()}
    operator_bytes: dict[str, int] = {}
    for ack in checkpoint.acks.values():
        for uid, state in ack.states.items():
            operator_bytes[uid] = operator_bytes.get(uid, 0) + int(state.get("bytes", 0))

    def most(key: str) -> float:
        return max((m.get(key, 0.0) for m in tasks.values()), default=0.0)

    return {
        "checkpoint_id": checkpoint.checkpoint_id,
        "triggered_at": checkpoint.trigger_time,
        "completed_at": persisted_at,
        "duration_s": persisted_at - checkpoint.trigger_time,
        "state_bytes": checkpoint.state_bytes,
        "written_bytes": int(sum(m.get("written_bytes", 0.0) for m in tasks.values())),
        "alignment_s": most("alignment_s"),
        "sync_s": most("sync_s"),
        "async_s": most("async_s"),
        "start_delay_s": most("start_delay_s"),
        "unaligned": any(m.get("unaligned", 0.0) for m in tasks.values()),
        "channel_state_bytes": int(sum(m.get("channel_state_bytes", 0.0) for m in tasks.values())),
        "tasks": tasks,
        "operator_state_bytes": operator_bytes,
    }


class CoordinatorActor:
    """Coordinates the checkpoints of one job (an async Ray actor)."""

    def __init__(self, job: str, config: CheckpointConfig, tasks: list[str], log_level: int = logging.WARNING,
                 run: str = "", baseline: int | None = None, counted: tuple[int, int] = (0, 0)) -> None:
        """Create the coordinator of ``run`` of ``job``.

        Args:
            job: the job name.
            config: the checkpoint settings.
            tasks: the subtasks (``<vertex>/<subtask>``) that acknowledge every checkpoint.
            log_level: the ``onceflow`` logger's level here.
            run: this run's id; its manifests record it.
            baseline: a checkpoint this run restored from (a resume: another run's), or ``None``.
            counted: the checkpoints completed and failed under the run's earlier coordinators, as
                last reported (this one replaces a dead one): the counts it reports go on from them.
        """
        configure_logging(log_level)
        self._counted = counted
        self._job = job
        self._config = config
        self._run_id = run
        self._baseline = baseline
        self._storage = CheckpointStorage(config.storage, job)
        self._storage.discard_incomplete()
        if config.incremental:
            self._storage.discard_unreferenced_shared()  # pieces of checkpoints that never completed
        newest = self._storage.completed_ids()
        next_id = newest[-1] + 1 if newest else 1
        self._core = CheckpointCoordinator(config, tasks, clock=time.time, next_id=next_id)
        self._core.paused = True
        self._attempt = 0  # guards acknowledgements: only this attempt's count (0: none open)
        self._fenced = 0  # the newest attempt closed by fence()
        self._sources: list[ActorHandle] = []
        self._subtasks: list[ActorHandle] = []
        self._cache: dict[int, dict[str, dict[str, Any]]] = {}
        self._waiters: dict[int, asyncio.Future[int]] = {}
        self._history: list[dict[str, Any]] = []
        self._fatal: dict[int, str] = {}  # attempt -> why its checkpoints failed too often
        self._loop: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._persisting: set[asyncio.Task[None]] = set()
        self._lost_to: str | None = None  # the run that took the storage over from this one
        self._telemetry = CheckpointMetrics(job)
        self._bases: dict[int, int | None] = {}  # checkpoint -> the newest completed one when it was triggered
        self._pinned: set[int] = set()  # checkpoints being copied into savepoints
        self._unpinned_discards: set[int] = set()  # pinned checkpoints retention deleted meanwhile
        self._outcomes: collections.deque[dict[str, Any]] = collections.deque(maxlen=_OUTCOMES_KEPT)
        self._outcome_seq = 0

    # -- lifecycle --------------------------------------------------------------------

    def node(self) -> str:
        """The id of the Ray node the coordinator runs on (``""`` outside Ray)."""
        if not ray.is_initialized():
            return ""
        return ray.get_runtime_context().get_node_id()

    async def start(self, attempt: int, sources: list[ActorHandle], subtasks: list[ActorHandle]) -> None:
        """Open ``attempt``: trigger checkpoints for these subtasks, from a clean failure count."""
        if self._config.incremental:  # the last attempt's subtasks are dead or fenced: nothing in flight
            await asyncio.to_thread(self._storage.discard_unreferenced_shared)
        self._attempt = attempt
        self._sources = sources
        self._subtasks = subtasks
        self._core.resume()
        if self._loop is None:
            self._loop = asyncio.get_running_loop().create_task(self._run())

    async def fence(self) -> int | None:
        """Close the open attempt; return the newest completed checkpoint, final for that attempt.

        Stops triggering, aborts pending checkpoints, ignores every later
        acknowledgement of the attempt, and waits for each manifest write in
        flight to land or fail: a checkpoint that completes does so before
        this returns, never after.
        """
        self._fenced = max(self._fenced, self._attempt)
        self._attempt = 0
        self._sources = []
        self._subtasks = []
        await self._execute(self._core.on_job_failure())
        while self._persisting:
            await asyncio.gather(*self._persisting, return_exceptions=True)
        return self.latest_checkpoint()

    def latest_checkpoint(self) -> int | None:
        """The newest completed checkpoint of this run (or the one it resumed from), or ``None``."""
        latest = self._core.store.latest
        if latest is not None:
            return latest.checkpoint_id
        return self._storage.latest_id(run=self._run_id, otherwise=self._baseline)

    async def _run(self) -> None:
        period = min(self._config.interval_s / 4, 0.05)
        renewed = float("-inf")
        while True:
            try:
                if time.monotonic() - renewed >= self._config.lease_s / 3:
                    try:
                        await asyncio.to_thread(self._renew_lease)
                        renewed = time.monotonic()
                    except CheckpointStorageError as error:  # the storage is away: try again soon, not in a third
                        renewed = time.monotonic() - self._config.lease_s / 3 + _LEASE_RETRY_S
                        log.warning("job %s: could not renew the checkpoint storage lease (again in %.1f s): %s",
                                    self._job, _LEASE_RETRY_S, error)
                await self._execute(self._core.poll())
            except Exception:
                log.exception("job %s: checkpoint coordinator loop failed", self._job)
            await asyncio.sleep(period)

    def _renew_lease(self) -> None:
        """Renew this run's hold on the storage; once another run holds it, complete nothing more."""
        if self._lost_to is not None:
            return
        lease = self._storage.read_lease()
        if lease is not None and lease.run != self._run_id:
            self._lose_lease(lease.run)
            return
        self._storage.write_lease(taken(lease, self._run_id, now=time.time()))

    def _lose_lease(self, holder: str) -> None:
        self._lost_to = holder
        self._core.paused = True
        self._fatal.setdefault(self._attempt, f"another run ({holder}) took over the checkpoint storage")
        log.error("job %s: run %s took over checkpoint storage %r; this run completes no more checkpoints",
                  self._job, holder, self._storage.uri)

    def _may_complete(self) -> bool:
        """Whether this run still holds a fresh lease on the storage (checked before a manifest or a deletion)."""
        lease = self._storage.read_lease()
        if lease is not None and lease.run != self._run_id:
            self._lose_lease(lease.run)
        return self._lost_to is None and may_complete(lease, self._run_id, now=time.time(),
                                                      lease_s=self._config.lease_s)

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _execute(self, actions: list[CheckpointAction]) -> None:
        for action in actions:
            if isinstance(action, TriggerCheckpoint):
                log.debug("job %s: triggering checkpoint %d", self._job, action.checkpoint_id)
                latest = self._core.store.latest
                self._bases[action.checkpoint_id] = latest.checkpoint_id if latest else None
                for old in [c for c in self._bases if c < action.checkpoint_id - _BASES_KEPT]:
                    del self._bases[old]
                for source in self._sources:
                    source.trigger_checkpoint.remote(action.checkpoint_id, action.timestamp, self._attempt)
            elif isinstance(action, PersistCheckpoint):
                task = asyncio.get_running_loop().create_task(self._persist(action.checkpoint))
                self._persisting.add(task)
                task.add_done_callback(self._persisting.discard)
            elif isinstance(action, NotifyCheckpointComplete):
                refs = [t.notify_checkpoint_complete.remote(action.checkpoint_id, self._attempt)
                        for t in self._subtasks]
                waiter = self._waiters.pop(action.checkpoint_id, None)
                if waiter is not None:
                    self._spawn(self._resolve(waiter, action.checkpoint_id, refs))
            elif isinstance(action, AbortCheckpoint):
                log.info("job %s: checkpoint %d aborted (%s)", self._job, action.checkpoint_id, action.reason.value)
                if CheckpointFailureTolerance.counts(action.reason):  # as stats()' checkpoints_failed counts
                    self._telemetry.failed()
                if action.reason is not CheckpointFailureReason.SUBSUMED:  # a newer one completed: no failure
                    self._record("checkpoint_failed", checkpoint_id=action.checkpoint_id, reason=action.reason.value)
                for subtask in self._subtasks:
                    subtask.abort_checkpoint.remote(action.checkpoint_id, self._attempt)
                waiter = self._waiters.pop(action.checkpoint_id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_exception(CheckpointError(
                        f"checkpoint {action.checkpoint_id} was aborted ({action.reason.value})",
                        reason=action.reason.value))
            elif isinstance(action, DiscardCheckpoint):
                self._cache.pop(action.checkpoint_id, None)
                if action.checkpoint_id in self._pinned:  # being copied into a savepoint: deleted after
                    self._unpinned_discards.add(action.checkpoint_id)
                else:
                    await asyncio.to_thread(self._discard, action.checkpoint_id)
            elif isinstance(action, FailJob):
                self._fatal.setdefault(self._attempt, action.reason)

    async def _resolve(self, waiter: asyncio.Future[int], checkpoint_id: int, refs: list[Any]) -> None:
        try:
            await asyncio.gather(*refs)
        except Exception as error:  # noqa: BLE001 - the job restarts and commits again on recovery
            if not waiter.done():
                waiter.set_exception(error)
            return
        if not waiter.done():
            waiter.set_result(checkpoint_id)

    async def _persist(self, checkpoint: CompletedCheckpoint) -> None:
        manifest = {
            "checkpoint_id": checkpoint.checkpoint_id,
            "job": self._job,
            "run": self._run_id,
            "trigger_time": checkpoint.trigger_time,
            "acknowledged_time": checkpoint.completion_time,
            "state_bytes": checkpoint.state_bytes,
            "tasks": {task: {"states": ack.states, "metrics": ack.metrics} for task, ack in checkpoint.acks.items()},
        }
        try:
            await asyncio.to_thread(self._write_manifest, manifest)
            crash_point(self._job, "coordinator.after_manifest")
        except Exception:
            log.exception("job %s: writing the manifest of checkpoint %d failed", self._job, checkpoint.checkpoint_id)
            await self._execute(self._core.on_persist_failed(checkpoint.checkpoint_id))
            return
        summary = _summary(checkpoint, time.time())
        self._history.append(summary)
        self._record("checkpoint_completed", checkpoint_id=checkpoint.checkpoint_id,
                     duration_s=summary["duration_s"], state_bytes=summary["state_bytes"],
                     alignment_s=summary["alignment_s"], unaligned=summary["unaligned"])
        self._telemetry.completed(summary["duration_s"], summary["alignment_s"], summary["state_bytes"])
        self._cache[checkpoint.checkpoint_id] = {task: ack.cache for task, ack in checkpoint.acks.items()}
        log.info("job %s: checkpoint %d complete in %.3f s (%d bytes, alignment %.3f s)", self._job,
                 checkpoint.checkpoint_id, summary["duration_s"], summary["state_bytes"], summary["alignment_s"])
        try:
            await asyncio.to_thread(self._storage.append_history, summary)
        except Exception:  # noqa: BLE001 - the history is informational
            log.warning("job %s: could not append checkpoint history", self._job)
        await self._execute(self._core.on_persisted(checkpoint.checkpoint_id))

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        pause_point(self._job, "coordinator.before_manifest", str(manifest["checkpoint_id"]))
        if not self._may_complete():
            msg = (f"job {self._job!r}: run {self._run_id} does not hold a fresh lease on {self._storage.uri!r}; "
                   f"checkpoint {manifest['checkpoint_id']} is not completed")
            raise CheckpointError(msg, reason=LEASE_LOST)
        self._storage.write_manifest(manifest)

    def _discard(self, checkpoint_id: int) -> None:
        if self._may_complete():  # a run that lost the storage deletes nothing of its successor's
            self._storage.discard(checkpoint_id)

    # -- calls from subtasks ----------------------------------------------------------

    async def acknowledge(self, checkpoint_id: int, ack: TaskAck) -> None:
        """A subtask finished its snapshot of ``checkpoint_id`` (ignored unless its attempt is open)."""
        if ack.attempt != self._attempt or not self._attempt:
            log.debug("job %s: ignoring %s's acknowledgement of checkpoint %d from fenced attempt %d", self._job,
                      ack.task, checkpoint_id, ack.attempt)
            return
        _, actions = self._core.on_ack(checkpoint_id, ack)
        await self._execute(actions)

    async def decline(self, checkpoint_id: int, task: str, reason: str) -> None:
        """A subtask could not snapshot ``checkpoint_id``."""
        log.warning("job %s: %s declined checkpoint %d: %s", self._job, task, checkpoint_id, reason)
        await self._execute(self._core.on_decline(checkpoint_id, task))

    # -- calls from the job -----------------------------------------------------------

    def restore_point(self, checkpoint_id: int) -> RestorePoint:
        """Completed checkpoint ``checkpoint_id``'s states: object-store copies where they live, files always.

        Raises:
            CheckpointError: the checkpoint is not complete (or was deleted).
        """
        for completed in self._core.store.all():
            if completed.checkpoint_id == checkpoint_id:
                cache = self._cache.get(checkpoint_id, {})
                return checkpoint_id, {
                    task: {op: RestoredState.recorded_in(state, cache.get(task, {}).get(op))
                           for op, state in ack.states.items()}
                    for task, ack in completed.acks.items()
                }
        manifest = self._storage.manifest(checkpoint_id)
        if manifest is None:
            msg = (f"job {self._job!r}: checkpoint {checkpoint_id} is not complete in {self._storage.uri!r}; "
                   "it cannot be restored")
            raise CheckpointError(msg, reason="missing")
        return int(manifest["checkpoint_id"]), {
            task: {op: RestoredState.recorded_in(state) for op, state in entry["states"].items()}
            for task, entry in manifest["tasks"].items()
        }

    async def final_checkpoint(self, attempt: int) -> int:
        """Take attempt ``attempt``'s final checkpoint; return once every subtask was notified that it completed.

        Waits while a periodic checkpoint is pending. The call ends with its
        attempt: once the attempt is fenced it raises, so it can never trigger
        a checkpoint for the next attempt.

        Raises:
            CheckpointError: the attempt was fenced, or the checkpoint was aborted.
        """
        actions = await self._trigger_now(attempt, "its final checkpoint")
        checkpoint_id = actions[0].checkpoint_id  # type: ignore[union-attr]
        # The input has ended: no periodic checkpoint after the final one (retention would delete it).
        self._core.paused = True
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiters[checkpoint_id] = waiter
        await self._execute(actions)
        return await waiter

    async def _trigger_now(self, attempt: int, what: str) -> list[CheckpointAction]:
        """Trigger a checkpoint of ``attempt`` at once, waiting while one is in flight; the trigger's actions.

        Raises:
            CheckpointError: the attempt was fenced before it could be triggered.
        """
        while True:
            if self._attempt != attempt:
                msg = f"job {self._job!r}: attempt {attempt} was fenced before {what} was triggered"
                raise CheckpointError(msg, reason="fenced")
            actions = self._core.trigger_now()
            if actions:
                return actions
            await asyncio.sleep(0.01)

    async def savepoint(self, target: str | None = None, stop: bool = False) -> dict[str, Any]:
        """Take a checkpoint now, wait until it completed and its transactions committed, copy it into a savepoint.

        Args:
            target: the savepoint's directory (see :func:`~onceflow.checkpoint.savepoint.write_savepoint`).
            stop: the job stops after it: no periodic checkpoint is triggered after this one, so it
                stays the newest completed checkpoint (what the sinks keep when the job then ends).

        Returns:
            ``{"path": ..., "checkpoint_id": ...}``.

        Raises:
            CheckpointError: no attempt is running, or the checkpoint was aborted (a failure, a fence).
        """
        attempt = self._attempt
        if not attempt:
            msg = f"job {self._job!r} is not running (it is restarting or ending); take the savepoint once it runs"
            raise CheckpointError(msg, reason="not running")
        actions = await self._trigger_now(attempt, "its savepoint")
        checkpoint_id = actions[0].checkpoint_id  # type: ignore[union-attr]
        self._pinned.add(checkpoint_id)  # retention keeps it until it is copied
        if stop:
            self._core.paused = True
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiters[checkpoint_id] = waiter
        try:
            await self._execute(actions)
            await waiter
            path = await asyncio.to_thread(write_savepoint, self._storage, checkpoint_id, target)
            entry = {"path": path, "checkpoint_id": checkpoint_id, "run": self._run_id, "at": time.time()}
            with contextlib.suppress(Exception):  # the list is informational
                await asyncio.to_thread(self._storage.record_savepoint, entry)
        except BaseException:
            if stop:
                self._core.paused = False
            raise
        finally:
            self._pinned.discard(checkpoint_id)
            if checkpoint_id in self._unpinned_discards:
                self._unpinned_discards.discard(checkpoint_id)
                await asyncio.to_thread(self._discard, checkpoint_id)
        self._record("savepoint", checkpoint_id=checkpoint_id, path=path)
        log.info("job %s: savepoint of checkpoint %d written to %s", self._job, checkpoint_id, path)
        return {"path": path, "checkpoint_id": checkpoint_id}

    async def watch(self, attempt: int) -> None:
        """Raise once checkpoints of ``attempt`` failed too often for it to go on; return once it is fenced."""
        while attempt not in self._fatal and self._lost_to is None:
            if attempt <= self._fenced:
                return
            await asyncio.sleep(0.05)
        reason = self._fatal.get(attempt, f"another run ({self._lost_to}) took over the checkpoint storage")
        msg = f"job {self._job!r}: {reason}"
        raise CheckpointError(msg, reason=LEASE_LOST if self._lost_to is not None else "too many failures")

    def base_of(self, checkpoint_id: int) -> int | None:
        """The newest completed checkpoint when ``checkpoint_id`` was triggered (an incremental snapshot's base).

        It stays in storage until ``checkpoint_id`` completes or is aborted,
        so the pieces it names may be named again; ``None``: write everything.
        """
        return self._bases.get(checkpoint_id)

    def _record(self, event: str, **fields: Any) -> None:
        self._outcome_seq += 1
        self._outcomes.append({"seq": self._outcome_seq, "event": event, "at": time.time(), **fields})

    def progress(self, since: int = 0) -> dict[str, Any]:
        """What a live view shows, cheaply: counts, the last checkpoint, those in flight, outcomes after ``since``.

        Outcomes (``checkpoint_completed``, ``checkpoint_failed`` with its
        reason) carry a rising ``seq``: pass the last one seen as ``since``.
        """
        latest = self._core.store.latest
        now = time.time()
        return {
            "checkpoints_completed": self._counted[0] + self._core.completed_count,
            "checkpoints_failed": self._counted[1] + self._core.failed_count,
            "latest_checkpoint": latest.checkpoint_id if latest else None,
            "last": self._history[-1] if self._history else None,
            "in_progress": [{"checkpoint_id": p.checkpoint_id, "age_s": now - p.trigger_time,
                             "acknowledged": len(p.acks), "tasks": len(p.acks) + len(p.not_yet_acknowledged),
                             "persisting": p.persisting}
                            for p in sorted(self._core.pending.values(), key=lambda p: p.checkpoint_id)],
            "outcomes": [o for o in self._outcomes if o["seq"] > since],
        }

    def stats(self) -> dict[str, Any]:
        """Checkpoint figures as Flink reports them: counts, durations, alignment, sizes."""
        history = self._history
        durations = [h["duration_s"] for h in history]
        alignments = [h["alignment_s"] for h in history]
        latest = self._core.store.latest
        return {
            "checkpoints_completed": self._counted[0] + self._core.completed_count,
            "checkpoints_failed": self._counted[1] + self._core.failed_count,
            "checkpoint_duration_p50_s": percentile(durations, 0.5),
            "checkpoint_duration_p99_s": percentile(durations, 0.99),
            "checkpoint_duration_mean_s": statistics.fmean(durations) if durations else 0.0,
            "alignment_p50_s": percentile(alignments, 0.5),
            "alignment_p99_s": percentile(alignments, 0.99),
            "state_bytes_last": history[-1]["state_bytes"] if history else 0,
            "latest_checkpoint": latest.checkpoint_id if latest else None,
            "checkpoint_storage": self._storage.uri,
            "checkpoint_history": history,
        }
