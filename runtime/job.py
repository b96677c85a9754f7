"""Running a dataflow: create the actors, wire them, supervise, recover, commit.

``run`` blocks until a bounded job has finished and returns its
:class:`JobResult`; ``submit`` starts the job and returns a :class:`JobHandle`.

With checkpointing (``checkpoint=CheckpointConfig(...)``) a coordinator actor
takes asynchronous barrier snapshots, sinks commit when a checkpoint completes,
and when any actor dies or fails the job restores every subtask from the newest
complete checkpoint and goes on, within its :class:`RestartStrategy`. A bounded
job ends with a final checkpoint, so its last transactions commit.

Without checkpointing, sinks commit once, after every subtask reached the end
of its input; a failure aborts every sink, so a failed job publishes nothing
(at-most-once: run it again from the start).

A failure in any phase (deploying, wiring, restoring, running, the final
checkpoint, committing) is one failure for the restart strategy. The decisions
are a :class:`~onceflow.checkpoint.supervisor.JobSupervisor`'s; :class:`JobHandle` only
carries them out. How a job ends:

- *finished*: the final checkpoint completed and every sink committed it; or,
  stopped with a savepoint, the savepoint completed and committed, and the
  sinks abort everything after it (as a cancel's end).
- *cancelled*: every actor is killed and confirmed dead; then the sinks commit
  what the newest completed checkpoint decided and abort everything else.
- *failed* (a failure a restart would repeat, or restarts ran out): every actor
  is killed; the sinks keep exactly the newest completed checkpoint's
  transactions (prepared, not visible), which ``resume=True`` commits, and
  abort everything else. Without checkpoints a failure aborts everything.

No actor of a job outlives it, whatever phase a cancel or a failure hits.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import queue
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import TYPE_CHECKING, Any, Literal, Unpack, overload

from onceflow.checkpoint.config import CheckpointConfig
from onceflow.checkpoint.lease import may_take, taken
from onceflow.checkpoint.s3 import with_s3_environment
from onceflow.checkpoint.savepoint import import_savepoint, read_savepoint
from onceflow.checkpoint.state import read_sink_state
from onceflow.checkpoint.storage import CheckpointStorage, CheckpointStorageError, StateHandle
from onceflow.checkpoint.supervisor import (
    CancelRequested,
    CommitOutput,
    Committed,
    DeployAttempt,
    Deployed,
    Failed,
    FenceAttempt,
    Fenced,
    FinalCheckpointCompleted,
    Finish,
    InputEnded,
    JobEnd,
    JobPhase,
    JobSupervisor,
    ResolveSinks,
    RestartDue,
    ScheduleRestart,
    SinkEnd,
    SinksResolved,
    StopRequested,
    StopSources,
    SupervisorAction,
    SupervisorEvent,
    TakeFinalCheckpoint,
)
from onceflow.checkpoint.two_phase_commit import CommittableRecord, SinkContext
from onceflow.errors import CheckpointError, DataError, JobFailedError, OnceflowError, PlanError
from onceflow.redaction import redact_uri
from onceflow.runtime import progress
from onceflow.runtime.checkpointing import LEASE_LOST, CoordinatorActor, RestorePoint
from onceflow.runtime.dataflow import NodeKind
from onceflow.runtime.deployment import AttemptId, CheckpointSetup, RuntimeOptions, SubtaskRestore
from onceflow.runtime.events import JobEvents
from onceflow.runtime.executor import Executor, RayExecutor, executor_named
from onceflow.runtime.figures import LastKnown
from onceflow.runtime.loops import LoopTermination
from onceflow.runtime.metrics import SubtaskCounters
from onceflow.runtime.monitor import Observer
from onceflow.runtime.options import JobKeywords, JobOptions
from onceflow.runtime.output import DownstreamFailedError
from onceflow.runtime.placement import (
    PlacementDecision,
    check_pinned_operators,
    decide_placement,
    describe_placement,
    room_on,
    silent_nodes,
)
from onceflow.runtime.plan import PhysicalPlan, plan
from onceflow.runtime.ray_env import ensure_ray
from onceflow.runtime.restart import RestartStrategy
from onceflow.runtime.restore import assign_restored_state, restored_sink_states
from onceflow.runtime.sink_committer import resolve_sink_operator
from onceflow.runtime.subtask_actor import FENCE_WAIT_S, SubtaskActor
from onceflow.runtime.telemetry import RestartCounter
from onceflow.runtime.warm import SPARE_AFTER_S

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from ray.actor import ActorHandle

    from onceflow.runtime.dataflow import Dataflow

__all__ = ["JobHandle", "JobResult", "JobStatus", "run", "submit"]

log = logging.getLogger("onceflow")

_NOT_RETRYABLE = (DataError, PlanError)
"""Failures that a restart would only repeat: the job fails at once."""

_CALL_TIMEOUT_S = 60.0
"""How long the driver waits for one step of deploying, fencing or resolving before calling it a failure."""

_ROOT_CAUSE_WAIT_S = 0.3
"""After a failure, how long the failures of the same moment may take to surface before the root cause is chosen."""

_TRACEBACK_CHARS = 8_000
"""How much of a failure's traceback the event log keeps (its end, where the error is)."""


def _gather(executor: Executor, refs: list[Any], timeout_s: float = 10.0) -> list[Any]:
    """The values of the calls that succeed within ``timeout_s`` (the others are left out)."""
    ready, _ = executor.wait(refs, num_returns=len(refs), timeout=timeout_s)
    values = []
    for ref in ready:
        with contextlib.suppress(Exception):
            values.append(executor.get(ref, timeout=0))
    return values


class JobStatus(Enum):
    """Where a job is in its life."""

    RUNNING = "RUNNING"
    RESTARTING = "RESTARTING"
    FINISHED = "FINISHED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


@dataclass(slots=True)
class JobResult:
    """What a finished job reports.

    Attributes:
        job: the job name.
        metrics: ``events_in`` (rows read by sources, replays after a restart
            included), ``events_out`` (rows written to sinks, also counting
            rows of aborted attempts), ``checkpoints_completed``, ``restarts``,
            ``duration_s`` (first read to last commit), ``startup_s``,
            ``events_per_s``, ``late_events``, ``backpressure_s``, checkpoint
            figures (``checkpoint_duration_p50_s``/``p99``, ``alignment_p50_s``/
            ``p99``, ``state_bytes_last``, ``checkpoint_history``) and
            ``operators`` (per operator: counts summed over subtasks, ratios
            such as a dedupe filter's fill as the largest over subtasks).
        plan: the physical plan, one line per vertex.
        placement: where the last attempt's actors ran: task (``<vertex>/<subtask>``)
            or ``"coordinator"`` -> Ray node id (see :meth:`JobHandle.placement`).
    """

    job: str
    metrics: dict[str, Any] = field(default_factory=dict)
    plan: str = ""
    placement: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class _Attempt:
    """The live actors of one attempt (the first deployment, or one after a restart)."""

    number: int
    actors: dict[int, list[ActorHandle]] = field(default_factory=dict)
    names: dict[ActorHandle, str] = field(default_factory=dict)
    sources: list[ActorHandle] = field(default_factory=list)
    sinks: list[ActorHandle] = field(default_factory=list)

    @property
    def everyone(self) -> list[ActorHandle]:
        return [a for group in self.actors.values() for a in group]


class _LoopWatch:
    """Asks the subtasks of one loop for their status, round after round; ends the loop once it is empty.

    The decision is :class:`~onceflow.runtime.loops.LoopTermination`'s; this
    only carries the calls. A round that fails (a subtask died) counts for
    nothing: the failure reaches the supervisor through the subtask's watch.
    """

    _PERIOD_S = 0.02

    def __init__(self, executor: Executor, subtasks: list[ActorHandle], heads: list[ActorHandle]) -> None:
        self._executor = executor
        self._subtasks = subtasks
        self._heads = heads
        self._termination = LoopTermination()
        self._round: list[Any] = []
        self._next_at = 0.0
        self.closed = False

    def poll(self) -> None:
        """Start a round, or finish the one in flight (without waiting)."""
        if self.closed:
            return
        if not self._round:
            if time.monotonic() >= self._next_at:
                self._round = [actor.loop_status.remote() for actor in self._subtasks]
            return
        ready, _ = self._executor.wait(self._round, num_returns=len(self._round), timeout=0)
        if len(ready) < len(self._round):
            return
        refs, self._round = self._round, []
        self._next_at = time.monotonic() + self._PERIOD_S
        try:
            statuses = [self._executor.get(ref, timeout=0) for ref in refs]
        except Exception:  # noqa: BLE001 - the subtask's watch reports the failure
            self._termination.reset()
            return
        if self._termination.observe(statuses):
            self.closed = True
            for head in self._heads:
                head.end_loop.remote()


class _Wait(Enum):
    """What a Ray reference the driver waits on stands for."""

    DONE = "done"
    WATCH = "watch"
    FINAL = "final"


class JobHandle:
    """A running job: watch it, wait for it, stop or cancel it.

    The handle is the *driver* of a :class:`~onceflow.checkpoint.supervisor.JobSupervisor`:
    a thread feeds it what happens (actors deployed, failed, input ended,
    checkpoints completed, the user's stop and cancel) and carries out what it
    decides (deploy, fence, resolve sink transactions, restart, finish). The
    driver decides nothing itself.
    """

    def __init__(self, flow: Dataflow, plan_: PhysicalPlan, options: RuntimeOptions,
                 checkpoint: CheckpointConfig | None, restart: RestartStrategy,
                 actor_options: dict[str, Any], resume: bool = False,
                 allow_non_restored_state: bool = False, executor: Executor | None = None,
                 from_savepoint: str | None = None,
                 placement: str | Mapping[str, Sequence[str]] = "spread", restart_in_place: bool = True,
                 spare_workers: int = 1) -> None:
        self.job = flow.name
        self._executor: Executor = executor or RayExecutor()
        self.run_id = uuid.uuid4().hex[:12]
        self._plan = plan_
        self._options = options
        # The actors' processes need not share this driver's environment: the S3 settings travel in the URI.
        self._checkpoint = (replace(checkpoint, storage=with_s3_environment(checkpoint.storage, os.environ))
                            if checkpoint is not None else None)
        self._actor_options = actor_options
        self._placement_policy = placement
        self._placement: dict[str, str] = {}  # task or "coordinator" -> the node it runs on, as it reported
        self._placed_attempt = 0  # the attempt whose actors _placement records
        self._silent_nodes: set[str] = set()  # nodes where no subtask of the failed attempt answered: kept out
        self._allow_non_restored_state = allow_non_restored_state
        self._supervisor = JobSupervisor(restart, checkpointing=checkpoint is not None)
        self._restart_counter = RestartCounter(flow.name)
        self._storage = (CheckpointStorage(self._checkpoint.storage, self.job) if self._checkpoint is not None
                         else None)
        # The supervisor thread owns everything below; other threads only read it.
        self._coordinator: ActorHandle | None = None
        self._attempt = _Attempt(0)
        self._restart_in_place = restart_in_place
        self._spare_workers = spare_workers
        self._kept: dict[str, ActorHandle] = {}  # actor name -> a fenced actor the next attempt resets in place
        self._waits: dict[Any, tuple[_Wait, str]] = {}
        self._loops: list[_LoopWatch] = []
        self._timer: tuple[float, int] | None = None
        self._events: collections.deque[SupervisorEvent] = collections.deque()
        self._known = LastKnown({n.name for v in plan_.vertices for n in v.nodes if n.kind is NodeKind.SOURCE})
        self._last_failure: BaseException | None = None
        self._last_reason = ""  # the reason of the newest failure the supervisor acted on, for the log
        self._failed_actor = ""  # the actor whose death or error the newest failure is
        self._failure_seen: float | None = None  # when the failure that the next restart recovers from was seen
        self._restarts: list[dict[str, Any]] = []
        self._pending_restart: dict[str, Any] = {}
        self._checkpoint_stats: dict[str, Any] = {}  # the coordinator's newest figures (kept if it dies)
        self._coordinators = 0  # coordinators started so far (a new one numbers its outcomes afresh)
        self._stop_requested = False
        self._last_checkpoint: dict[str, Any] = {}  # the newest completed checkpoint's summary, as last seen
        self._final_counts: list[SubtaskCounters] = []
        self.restored_from: list[int] = []
        self._result: JobResult | None = None
        self._error: BaseException | None = None
        # User intents (stop, cancel) cross threads through this queue.
        self._requests: queue.SimpleQueue[SupervisorEvent] = queue.SimpleQueue()
        self._deployed = threading.Event()
        self._done = threading.Event()
        self._refuse_if_running()
        self._lease_renewed = float("-inf")
        if self._storage is not None:
            self._take_lease()
        try:
            self._restore = (self._import_savepoint(from_savepoint) if from_savepoint is not None
                             else self._starting_point(resume))
        except BaseException:
            if self._storage is not None:
                self._storage.release_lease(self.run_id)
            raise
        self._created = time.monotonic()
        self._created_at = time.time()
        self.startup_s = 0.0
        self._started = self._created
        self._events_log = JobEvents(self.job, self.run_id, self._storage)
        self._observer = Observer(self.job, self.run_id, self._executor, self._sample, self._on_remote_request,
                                  self._events_log, self._deployed.is_set)
        self._thread = threading.Thread(target=self._drive, daemon=True, name=f"onceflow-supervisor-{self.job}")
        self._thread.start()
        self._wait_deployed()

    # -- start --------------------------------------------------------------------------

    def _refuse_if_running(self) -> None:
        clash = self._executor.running(f"{self.job}/")
        if clash:
            msg = (f"cannot start job {self.job!r}: actors of a job of that name are running "
                   f"({', '.join(clash[:3])}{', ...' if len(clash) > 3 else ''}); stop or cancel that job, "
                   "or rename the dataflow")
            raise PlanError(msg)

    def _take_lease(self) -> None:
        """Take this job's hold on its checkpoint storage, waiting while another live run holds it."""
        assert self._storage is not None and self._checkpoint is not None
        lease_s = self._checkpoint.lease_s
        deadline = time.monotonic() + 3 * lease_s + 5
        warned = False
        while True:
            lease = self._storage.read_lease()
            if may_take(lease, self.run_id, now=time.time(), lease_s=lease_s):
                self._storage.write_lease(taken(lease, self.run_id, now=time.time()))
                self._lease_renewed = time.monotonic()
                return
            assert lease is not None
            age = time.time() - lease.renewed_at
            if time.monotonic() > deadline:
                msg = (f"cannot start job {self.job!r}: run {lease.run} holds its checkpoint storage "
                       f"{self._storage.uri!r} (renewed {age:.1f} s ago), so it is still running elsewhere; "
                       f"stop that run, or start this one at least {lease_s:g} s after it died")
                raise PlanError(msg)
            if not warned:
                log.warning("job %s: run %s held the checkpoint storage %.1f s ago; waiting until its lease "
                            "(%g s) lapses", self.job, lease.run, age, lease_s)
                warned = True
            time.sleep(0.2)

    def _renew_lease(self) -> SupervisorEvent | None:
        """Renew the storage lease between the coordinator's renewals (while it is being replaced, say)."""
        if self._storage is None or self._checkpoint is None or self._supervisor.finished:
            return None
        if time.monotonic() - self._lease_renewed < self._checkpoint.lease_s / 3:
            return None
        self._lease_renewed = time.monotonic()
        try:
            lease = self._storage.read_lease()
            if lease is not None and lease.run != self.run_id:
                reason = f"run {lease.run} took over the checkpoint storage {self._storage.uri!r}"
                return Failed(self._supervisor.attempt, reason, retryable=False)
            self._storage.write_lease(taken(lease, self.run_id, now=time.time()))
        except OnceflowError as error:
            log.warning("job %s: could not renew the checkpoint storage lease: %s", self.job, error)
        return None

    def _starting_point(self, resume: bool) -> int | None:
        """The checkpoint to restore first: the newest that verifies, of any run, with ``resume=True``; else none.

        A fresh run never reads an earlier run's checkpoints: it starts from
        the beginning, and its sinks abort every transaction an earlier run
        left (those a failed run kept for a resume included), as a new Flink
        job does without a savepoint. The checkpoints stay in storage, and
        their ids are not reused.
        """
        if self._storage is None:
            return None
        if resume:
            return self._verified_resume_point()
        latest = self._storage.latest_manifest()
        newest = int(latest["checkpoint_id"]) if latest else None
        if newest is not None:
            log.warning("job %s: starting a fresh run (resume=False): checkpoint %d of an earlier run in %r is not "
                        "restored, and sink transactions it kept uncommitted are aborted; pass resume=True to "
                        "continue from it", self.job, newest, self._storage.uri)
        return None

    def _import_savepoint(self, location: str) -> int:
        """Copy the savepoint at ``location`` into the job's storage as a checkpoint of this run; its id."""
        assert self._storage is not None
        savepoint = read_savepoint(location)
        checkpoint_id = import_savepoint(savepoint, self._storage, self.run_id)
        log.info("job %s: starting from savepoint %s (checkpoint %d of job %r), imported as checkpoint %d",
                 self.job, savepoint.uri, savepoint.checkpoint_id, savepoint.meta.get("job"), checkpoint_id)
        return checkpoint_id

    def _verified_resume_point(self) -> int | None:
        """The newest checkpoint whose manifest and files verify; older only when that commits nothing twice.

        A checkpoint that does not verify (a file damaged, missing or of the
        wrong size, or a manifest that does not match its checksum) is never
        restored. Falling back past it is safe only if no checkpoint skipped
        recorded sink transactions: those were committed after the older
        checkpoint, and replaying from it would commit their rows again. Then
        a WARNING names the bad files; otherwise the submit fails naming them.

        Raises:
            CheckpointError: a skipped checkpoint recorded (or may have recorded) sink transactions, or no
                written checkpoint verifies.
        """
        assert self._storage is not None
        skipped: list[tuple[int, list[str]]] = []
        chosen = None
        for checkpoint_id in reversed(self._storage.written_ids()):
            problems = self._storage.verify(checkpoint_id)
            if not problems:
                chosen = checkpoint_id
                break
            skipped.append((checkpoint_id, problems))
        if chosen is None and not skipped:
            log.info("job %s: resume=True, but %r holds no completed checkpoint; starting from the beginning",
                     self.job, self._storage.uri)
            return None
        if not skipped:
            return chosen
        damaged = "; ".join(p for _, problems in skipped for p in problems)
        if chosen is None:
            msg = (f"job {self.job!r}: resume=True, but no checkpoint in {self._storage.uri!r} verifies, so none is "
                   f"restored: {damaged}. Repair the files, or resume=False to start from the beginning (its sinks "
                   "commit everything again)")
            raise CheckpointError(msg, reason="damaged")
        committed = [c for c, problems in skipped if self._recorded_transactions(c, problems)]
        if committed:
            directories = ", ".join(self._storage.checkpoint_path(c) for c, _ in skipped)
            msg = (f"job {self.job!r}: the newest checkpoints do not verify and are not restored: {damaged}. "
                   f"Checkpoint {chosen} verifies, but checkpoint(s) {', '.join(map(str, committed))} after it "
                   f"recorded sink transactions, which were committed: restoring {chosen} would commit their rows "
                   f"again. Repair the files, or move {directories} aside to accept that and resume from {chosen}")
            raise CheckpointError(msg, reason="damaged")
        log.warning("job %s: checkpoint(s) %s do not verify and are not restored (%s); they recorded no sink "
                    "transaction, so resuming from checkpoint %d commits nothing twice",
                    self.job, ", ".join(str(c) for c, _ in skipped), damaged, chosen)
        return chosen

    def _recorded_transactions(self, checkpoint_id: int, problems: list[str]) -> bool:
        """Whether checkpoint ``checkpoint_id``, which does not verify, recorded (or may have) sink transactions."""
        assert self._storage is not None
        try:
            return any(self._sink_committables(checkpoint_id).values())
        except (CheckpointError, CheckpointStorageError):  # its manifest or a sink's file is the damaged one
            log.debug("job %s: checkpoint %d's sink transactions are unreadable: %s", self.job, checkpoint_id,
                      problems)
            return True

    def _wait_deployed(self) -> None:
        """Block until the first attempt runs or the job ended; raise a plan error at once."""
        while not self._deployed.wait(0.05):
            if self._done.is_set():
                break
        if self._done.is_set() and isinstance(self._error, JobFailedError) and isinstance(
                self._error.__cause__, PlanError):
            raise self._error.__cause__

    # -- actors -----------------------------------------------------------------------

    def _create(self, cls: type, name: str, node: str, *args: Any, **kwargs: Any) -> ActorHandle:
        """Create actor ``name``, asking for ``node`` (``""``: anywhere); ``actor_options`` win over the placement."""
        options = {"num_cpus": 0, "max_restarts": 0, "max_concurrency": 1000, **self._executor.on_node(node),
                   **self._actor_options}
        return self._executor.create(cls, name, options, *args, **kwargs)

    def _start_coordinator(self, baseline: int | None, node: str) -> ActorHandle:
        assert self._checkpoint is not None
        tasks = [f"{v.name}/{i}" for v in self._plan.vertices for i in range(v.parallelism)]
        counted = (self._checkpoint_stats.get("checkpoints_completed", 0),
                   self._checkpoint_stats.get("checkpoints_failed", 0))  # a dead coordinator's, as last seen
        self._coordinator = self._create(CoordinatorActor, f"{self.job}/coordinator", node, self.job,
                                         self._checkpoint, tasks, self._options.log_level, self.run_id, baseline,
                                         counted)
        self._coordinators += 1
        return self._coordinator

    def _decide_placement(self) -> PlacementDecision:
        """Where this attempt's actors go, among the nodes alive now (a surviving coordinator stays put)."""
        tasks = [(tuple(n.name for n in v.nodes), f"{v.name}/{i}")
                 for v in self._plan.vertices for i in range(v.parallelism)]
        totals, driver = self._executor.nodes()
        nodes = [n for n in totals if n not in self._silent_nodes]
        if nodes and len(nodes) < len(totals):
            log.warning("job %s: no subtask on node(s) %s answered after the failure (lost, most likely); "
                        "placing this attempt on the other %d node(s)", self.job,
                        ", ".join(sorted(set(totals) - set(nodes))), len(nodes))
        else:
            nodes = list(totals)
        self._silent_nodes = set()
        staying = self._placement.get("coordinator", "") if self._coordinator is not None else ""
        options = {"num_cpus": 0, **self._actor_options}
        demand = {"CPU": options.get("num_cpus") or 0, "GPU": options.get("num_gpus") or 0,
                  "memory": options.get("memory") or 0, **(options.get("resources") or {})}
        room = {n: room_on(totals[n], demand) for n in nodes}
        decision = decide_placement(self._placement_policy, tasks, nodes=nodes, driver=driver, coordinator=staying,
                                    room=room)
        for warning in decision.warnings:
            log.warning("job %s: %s", self.job, warning)
        return decision

    def _record_placement(self, attempt: _Attempt) -> None:
        """Ask every actor of the attempt (and the coordinator) which node it runs on; log it at INFO."""
        actors: dict[str, Any] = {name.split("/", 1)[1]: actor for actor, name in attempt.names.items()}
        if self._coordinator is not None:
            actors["coordinator"] = self._coordinator
        names = list(actors)
        nodes = self._executor.get([actors[n].node.remote() for n in names], timeout=_CALL_TIMEOUT_S)
        self._placement = dict(zip(names, nodes, strict=True))
        self._placed_attempt = attempt.number
        log.info("job %s: attempt %d placement (%s):\n%s", self.job, attempt.number,
                 self._placement_policy if isinstance(self._placement_policy, str) else "pinned",
                 describe_placement(self._placement))

    def placement(self) -> dict[str, str]:
        """Where the current attempt's actors run: task (``<vertex>/<subtask>``) or ``"coordinator"`` -> node id.

        Recorded when the attempt deploys, as each actor reported its Ray node
        (``""`` for the local executor's actors, which run in this process
        when Ray is not initialised). See :mod:`onceflow.runtime.placement`.
        """
        return dict(self._placement)

    # -- observation --------------------------------------------------------------------

    @property
    def actor_names(self) -> list[str]:
        """The named subtask actors of this job (``<job>/<operator>/<subtask>``)."""
        return [f"{self.job}/{v.name}/{i}" for v in self._plan.vertices for i in range(v.parallelism)]

    @property
    def phase(self) -> JobPhase:
        """The supervisor's phase (finer than :meth:`status`: deploying, fencing, resolving...)."""
        return self._supervisor.phase

    @property
    def attempt(self) -> int:
        """The current attempt (1 for the first deployment, one more per restart)."""
        return self._supervisor.attempt

    def status(self) -> JobStatus:
        """The job's status, without waiting."""
        phase = self._supervisor.phase
        if phase is JobPhase.FINISHED:
            return JobStatus.FINISHED
        if phase is JobPhase.FAILED:
            return JobStatus.FAILED
        if phase is JobPhase.CANCELLED:
            return JobStatus.CANCELLED
        if phase in (JobPhase.RUNNING, JobPhase.FINISHING) or (
                phase in (JobPhase.RESOLVING, JobPhase.DEPLOYING) and self._supervisor.attempt <= 1):
            return JobStatus.RUNNING
        return JobStatus.RESTARTING

    def metrics(self, timeout_s: float = 10.0) -> dict[str, Any]:
        """Live counters summed over subtasks (as :attr:`JobResult.metrics`), and where the job is.

        Never raises because an actor is dead, restarting or slow: a subtask
        that does not answer within ``timeout_s`` is counted with its last
        known figures. Besides the counters, the mapping has ``status`` (a
        :class:`JobStatus` value), ``attempt``, ``cause`` (why the job is
        restarting or failed; ``None`` while it runs), ``age_s`` (how old the
        oldest figure counted is; 0 when every subtask answered now) and per
        operator ``age_s`` and ``backpressure_s``.
        """
        return self._live_metrics(timeout_s, checkpoint_stats=True)

    def _live_metrics(self, timeout_s: float, checkpoint_stats: bool) -> dict[str, Any]:
        if self._result is not None:
            return {**self._result.metrics, **self._where(), "age_s": 0.0}
        try:
            attempt = self._attempt
            refs = [a.metrics.remote() for a in list(attempt.everyone)]
            self._known.update(attempt.number, _gather(self._executor, refs, timeout_s))
        except Exception:
            log.debug("job %s: could not ask the subtasks for their figures", self.job, exc_info=True)
        totals, ages = self._known.totals()
        metrics = totals.as_dict()
        metrics["restarts"] = self._supervisor.restarts
        metrics.update(self._checkpoint_stats)
        coordinator = self._coordinator
        if coordinator is not None and checkpoint_stats:
            with contextlib.suppress(Exception):
                self._checkpoint_stats = self._executor.get(coordinator.stats.remote(), timeout=timeout_s)
                metrics.update(self._checkpoint_stats)
        metrics.update(self._where())
        metrics["age_s"] = max(ages.values(), default=0.0)
        return metrics

    def _where(self) -> dict[str, Any]:
        """The job's status, attempt and the cause of its restart or failure."""
        status = self.status()
        cause = None
        if status is JobStatus.RESTARTING:
            cause = self._last_reason or None
        elif status in (JobStatus.FAILED, JobStatus.CANCELLED) and self._error is not None:
            cause = str(self._error)
        return {"status": status.value, "attempt": self._supervisor.attempt, "cause": cause}

    def view(self) -> dict[str, Any]:
        """What a live view shows, as the observer last sampled it (twice a second); never raises.

        A JSON-able mapping: ``job``, ``run``, ``status``, ``attempt``,
        ``cause``, ``uptime_s``, ``ended``, the counters of :meth:`metrics`,
        ``events_per_s`` (over the last seconds while running; the job's
        average once ended), ``checkpoints`` (``completed``, ``failed``,
        ``latest``, ``last``: the newest completed one's figures,
        ``in_progress``), ``restarts`` (one entry per restart: ``attempt``,
        ``at``, ``actor``, ``node``, ``cause``, ``restored_from``,
        ``recovery_s``; ``fence_s`` and ``deploy_s``, its two steps;
        ``replaced``, the actors started anew) and ``operators`` (per operator: ``task``, records in
        and out, ``backpressure_s``, ``state_bytes`` and ``alignment_s`` of
        the last checkpoint, ``age_s``).
        """
        return self._observer.latest

    def _sample(self, since: int) -> dict[str, Any]:
        """The job's view now (checkpoint outcomes after ``since``, of the current coordinator); never raises."""
        metrics = self._live_metrics(timeout_s=1.0, checkpoint_stats=False)
        inflight: dict[str, Any] = {}
        coordinator = self._coordinator
        if coordinator is not None:
            with contextlib.suppress(Exception):
                inflight = self._executor.get(coordinator.progress.remote(since), timeout=1.0)
                self._checkpoint_stats.update({k: inflight[k] for k in (
                    "checkpoints_completed", "checkpoints_failed", "latest_checkpoint")})
                metrics.update(self._checkpoint_stats)
        last = inflight.get("last") or self._last_checkpoint
        self._last_checkpoint = last
        operators: dict[str, dict[str, Any]] = {}
        for vertex in self._plan.vertices:
            alignments = [m.get("alignment_s", 0.0) for task, m in (last.get("tasks") or {}).items()
                          if task.rsplit("/", 1)[0] == vertex.name]
            for position, node in enumerate(vertex.nodes):
                figures = metrics.get("operators", {}).get(node.name, {})
                operators[node.name] = {
                    "task": vertex.name,
                    "subtasks": vertex.parallelism,
                    "records_in": figures.get("records_in", 0),
                    "records_out": figures.get("records_out", 0),
                    "backpressure_s": figures.get("backpressure_s", 0.0),
                    "state_bytes": (last.get("operator_state_bytes") or {}).get(node.uid),
                    "alignment_s": max(alignments, default=None) if position == 0 else None,
                    "age_s": figures.get("age_s"),
                }
        ended = self._done.is_set() or self._result is not None
        duration = metrics.get("duration_s") or max(time.monotonic() - self._started, 1e-9)
        return {
            "job": self.job,
            "run": self.run_id,
            "status": metrics["status"],
            "phase": self._supervisor.phase.value,
            "attempt": metrics["attempt"],
            "cause": metrics["cause"],
            "started_at": self._created_at,
            "uptime_s": time.time() - self._created_at,
            "ended": ended,
            "age_s": metrics["age_s"],
            "events_in": metrics.get("events_in", 0),
            "events_out": metrics.get("events_out", 0),
            "events_per_s": metrics.get("events_in", 0) / duration,
            "late_events": metrics.get("late_events", 0),
            "dead_letters": metrics.get("dead_letters", 0),
            "backpressure_s": metrics.get("backpressure_s", 0.0),
            "watermark": metrics.get("watermark"),
            "max_event_time": metrics.get("max_event_time"),
            "checkpointing": self._checkpoint is not None,
            "checkpoints": {
                "coordinator": self._coordinators,
                "completed": metrics.get("checkpoints_completed", 0),
                "failed": metrics.get("checkpoints_failed", 0),
                "latest": metrics.get("latest_checkpoint"),
                "last": {k: v for k, v in last.items() if k not in ("tasks", "operator_state_bytes")} or None,
                "in_progress": inflight.get("in_progress", []),
                "outcomes": inflight.get("outcomes", []),
            },
            "restarts": list(self._restarts),
            "operators": operators,
        }

    # -- control ------------------------------------------------------------------------

    @overload
    def stop(self, timeout_s: float | None = None, *, savepoint: Literal[False] = False) -> JobResult: ...

    @overload
    def stop(self, timeout_s: float | None = None, *, savepoint: Literal[True], path: str | None = None) -> str: ...

    def stop(self, timeout_s: float | None = None, *, savepoint: bool = False,
             path: str | None = None) -> JobResult | str:
        """End the job gracefully; return its result, or with ``savepoint=True`` the savepoint's location.

        Without a savepoint, every source ends its input, the job drains (every
        window fires), takes a final checkpoint and commits it. The stop holds
        across restarts: an attempt that deploys after it ends its input at once.

        With ``savepoint=True`` (Flink's stop with a savepoint), the job takes
        a savepoint (into ``path``, by default under the checkpoint storage),
        waits until its transactions committed, and then ends without
        committing anything past it: windows that have not fired stay in the
        savepoint, and a run started ``from_savepoint`` goes on from there, at
        any parallelism. The job ends FINISHED; :meth:`wait` gives its result.

        Raises:
            JobFailedError: the job failed or was cancelled instead.
            CheckpointError: the savepoint could not be taken (the job goes on; try again).
            PlanError: ``savepoint=True`` on a job without checkpoints.
        """
        if not savepoint:
            self._request("stop", "handle")
            return self.wait(timeout_s)
        location = self.savepoint(path, timeout_s=timeout_s, then_stop=True)
        self._request("stop_after_savepoint", "handle")
        self.wait(timeout_s)
        return location

    def savepoint(self, path: str | None = None, timeout_s: float | None = None, *, then_stop: bool = False) -> str:
        """Take a savepoint of the running job now; return its location (the job goes on).

        A savepoint is a checkpoint the user owns (never deleted by
        retention), copied into ``path`` (a directory or ``pyarrow.fs`` URI;
        by default ``<storage>/<job>/savepoints/savepoint-<id>-<random>``), that
        ``of.run(flow, from_savepoint=...)`` restores at any parallelism. It is
        returned once the checkpoint completed, its sink transactions
        committed, and its files were copied.

        Raises:
            PlanError: the job has no checkpoints.
            CheckpointError: the job is not running (restarting, ending) or the checkpoint failed.
            TimeoutError: ``timeout_s`` passed first.
        """
        if self._checkpoint is None:
            msg = f"job {self.job!r} takes no checkpoints, so it has no savepoints; run it with checkpoint=..."
            raise PlanError(msg)
        coordinator = self._coordinator
        if coordinator is None or self.status() is not JobStatus.RUNNING:
            msg = f"job {self.job!r} is {self.status().value.lower()}; take the savepoint once it runs"
            raise CheckpointError(msg, reason="not running")
        try:
            taken_ = self._executor.get(coordinator.savepoint.remote(path, then_stop), timeout=timeout_s)
        except (CheckpointError, TimeoutError):
            raise
        except Exception as error:
            if self._done.wait(1.0) or self.status() is not JobStatus.RUNNING:
                msg = f"job {self.job!r} ended or restarted before its savepoint completed; none was written"
                raise CheckpointError(msg, reason="not running") from error
            cause = getattr(error, "cause", None)
            if isinstance(cause, OnceflowError):
                raise cause from None
            msg = f"job {self.job!r}: the savepoint failed: {error}"
            raise CheckpointError(msg, reason="failed") from error
        return str(taken_["path"])

    def cancel(self) -> None:
        """End the job at once, whatever phase it is in.

        With checkpoints, the sinks commit what the newest completed checkpoint
        decided and abort everything else; no actor of the job is left.
        """
        if not self._done.is_set():
            self._request("cancel", "handle")
            self._done.wait()

    def _request(self, kind: str, by: str) -> None:
        """Hand a stop or cancel to the supervisor (``by``: who asked, for the event log)."""
        if self._done.is_set():
            return
        if kind.startswith("stop"):
            self._stop_requested = True
        self._events_log.emit("stop_requested" if kind.startswith("stop") else "cancel_requested", by=by,
                              **({"after_savepoint": True} if kind == "stop_after_savepoint" else {}))
        if kind == "stop":
            self._requests.put(StopRequested())
        else:
            self._requests.put(CancelRequested(after_savepoint=kind == "stop_after_savepoint"))

    def _on_remote_request(self, kind: str) -> None:
        self._request(kind, "monitor")

    def wait(self, timeout_s: float | None = None) -> JobResult:
        """Block until the job finishes; return its result.

        Raises:
            JobFailedError: an operator failed and the job could not (or may
                not) restart, or the job was cancelled; the message names the
                failure and, with checkpointing, the checkpoint the job can
                resume from.
            TimeoutError: ``timeout_s`` passed first (the job keeps running).
        """
        if not self._done.wait(timeout_s):
            msg = f"job {self.job!r} still running after {timeout_s} s"
            raise TimeoutError(msg)
        if self._result is not None:
            return self._result
        assert self._error is not None
        raise self._error

    # -- the driver loop ------------------------------------------------------------------

    def _drive(self) -> None:
        """The supervisor thread: feed events to the supervisor and carry out its actions until the end."""
        factory = progress.current()
        reporter = factory(self) if factory is not None else None
        try:
            self._carry_out(self._supervisor.start(self._restore))
            while not self._supervisor.finished:
                event = self._next_event()
                failed = event if isinstance(event, Failed) and event.attempt == self._supervisor.attempt else None
                if failed is not None:
                    self._on_failure(failed)
                actions = self._supervisor.on_event(event)
                if failed is not None:  # the phase says so now: watchers see it before a fast restart is over
                    self._observer.show({**self._where(), "phase": self._supervisor.phase.value})
                self._carry_out(actions)
        except BaseException as error:
            log.exception("job %s: the job driver failed", self.job)
            if self._error is None and self._result is None:
                self._error = JobFailedError(f"job {self.job!r} failed: {type(error).__name__}: {error}",
                                             job=self.job)
                self._error.__cause__ = error
            with contextlib.suppress(Exception):
                self._remove_everything()
        finally:
            try:
                self._end_observation()
            except Exception:
                log.exception("job %s: could not record the job's end", self.job)
            if reporter is not None:
                reporter.close()
            self._events_log.close()
            self._deployed.set()
            self._done.set()

    def _on_failure(self, event: Failed) -> None:
        """Note a failure of the current attempt: for the log, the view and the next restart's record."""
        self._last_reason = event.reason
        self._failure_seen = time.monotonic()
        actor = self._failed_actor
        cause = self._last_failure
        trace = "".join(traceback.format_exception(cause))[-_TRACEBACK_CHARS:] if cause is not None else ""
        node = self._known.node_of(actor.split("/", 1)[-1]) if actor else ""
        self._events_log.emit("failure", attempt=event.attempt, actor=actor or None, node=node or None,
                              cause=event.reason, retryable=event.retryable, traceback=trace)
        self._pending_restart = {"attempt": event.attempt + 1, "at": time.time(), "actor": actor or None,
                                 "node": node or None, "cause": event.reason}
        self._failed_actor = ""

    def _end_observation(self) -> None:
        """The job ended: record how, publish the final view, and remove the monitor with the job."""
        view = self._sample(0)
        view.pop("checkpoints", {}).pop("outcomes", None)
        final = {**view, "ended": True, "checkpoints": self._observer.latest.get("checkpoints", {})}
        final["checkpoints"].pop("outcomes", None)
        if self._result is not None:
            m = self._result.metrics
            final["events_per_s"] = m.get("events_per_s", 0.0)
            self._events_log.emit("stopped" if self._stop_requested else "finished",
                                  events_in=m.get("events_in"), events_out=m.get("events_out"),
                                  duration_s=m.get("duration_s"), restarts=m.get("restarts"))
        else:
            self._events_log.emit(final["status"].lower(), cause=final["cause"], restarts=self._supervisor.restarts,
                                  latest_checkpoint=self._supervisor.latest_checkpoint)
        monitor = self._observer.close(final)
        if monitor is not None:
            self._executor.kill([monitor])
            self._executor.confirm_dead([monitor])

    def _carry_out(self, actions: list[SupervisorAction]) -> None:
        for action in actions:
            event = self._execute(action)
            if event is not None:
                self._events.append(event)

    def _next_event(self) -> SupervisorEvent:
        """The next thing that happened: an action's outcome, a user request, a Ray reference, a timer."""
        while True:
            if self._events:
                return self._events.popleft()
            with contextlib.suppress(queue.Empty):
                return self._requests.get_nowait()
            renewal = self._renew_lease()
            if renewal is not None:
                return renewal
            if self._timer is not None and time.monotonic() >= self._timer[0]:
                attempt = self._timer[1]
                self._timer = None
                return RestartDue(attempt)
            if not self._waits:
                time.sleep(0.02)
                continue
            if self._supervisor.phase is JobPhase.RUNNING:
                for loop in self._loops:
                    loop.poll()
            ready, _ = self._executor.wait(list(self._waits), num_returns=1, timeout=0.02 if self._loops else 0.05)
            for ref in ready:
                event = self._on_ready(ref)
                if event is not None:
                    return event

    def _on_ready(self, ref: Any) -> SupervisorEvent | None:
        kind, _ = self._waits[ref]
        attempt = self._attempt.number
        try:
            value = self._executor.get(ref, timeout=0)
        except Exception:  # noqa: BLE001 - classified by _root_cause
            return self._root_cause()
        del self._waits[ref]
        if kind is _Wait.FINAL:
            return FinalCheckpointCompleted(attempt, int(value))
        if kind is _Wait.DONE and not any(k is _Wait.DONE for k, _ in self._waits.values()):
            return InputEnded(attempt)
        return None  # one subtask done, or a watch that ended with its attempt

    def _root_cause(self) -> Failed:
        """Among the attempt's failed calls, the error that explains the rest (not a downstream echo)."""
        # Give the other failures of the same moment a little time to surface: the root cause (a bad
        # batch) may report a moment after its echoes. A death or an error of onceflow's own explains
        # the rest: no need to wait longer then.
        refs = dict(self._waits)
        pending = list(refs)
        deadline = time.monotonic() + _ROOT_CAUSE_WAIT_S
        root: BaseException | None = None
        actor = ""
        while pending and not (root is not None and (isinstance(root, OnceflowError) or self._executor.died(root))):
            ready, pending = self._executor.wait(pending, num_returns=1,
                                                 timeout=max(deadline - time.monotonic(), 0.0))
            if not ready:
                break
            for ref in ready:
                try:
                    self._executor.get(ref, timeout=0)
                except Exception as error:  # noqa: BLE001 - classified below
                    cause = getattr(error, "cause", None) or error
                    if isinstance(cause, DownstreamFailedError):
                        continue
                    if root is None or (isinstance(cause, OnceflowError) and not isinstance(root, OnceflowError)):
                        root, actor = cause, refs[ref][1]
        attempt = self._attempt.number
        if root is None:
            return Failed(attempt, "a downstream subtask failed")
        reason = f"actor {actor!r} died" if self._executor.died(root) else str(root)
        self._last_failure = root
        self._failed_actor = actor
        lost = isinstance(root, CheckpointError) and root.reason == LEASE_LOST
        return Failed(attempt, reason, retryable=not isinstance(root, _NOT_RETRYABLE) and not lost,
                      operator=getattr(root, "operator", "") or actor)

    # -- actions ----------------------------------------------------------------------------

    def _execute(self, action: SupervisorAction) -> SupervisorEvent | None:
        if isinstance(action, ResolveSinks):
            return self._resolve_sinks(action)
        if isinstance(action, DeployAttempt):
            return self._deploy(action.attempt, action.restore)
        if isinstance(action, StopSources):
            for source in self._attempt.sources:
                source.stop.remote()
            return None
        if isinstance(action, TakeFinalCheckpoint):
            assert self._coordinator is not None
            self._final_counts = self._attempt_counters()  # every subtask ended its input: final now
            self._waits[self._coordinator.final_checkpoint.remote(action.attempt)] = (_Wait.FINAL,
                                                                               f"{self.job}/coordinator")
            return None
        if isinstance(action, CommitOutput):
            self._final_counts = self._attempt_counters()
            try:
                self._executor.get([a.commit.remote() for a in self._attempt.sinks], timeout=_CALL_TIMEOUT_S)
            except Exception as error:  # noqa: BLE001 - a failure like any other
                self._last_failure = error
                return Failed(action.attempt, f"committing the output failed: {error}", retryable=False)
            return Committed(action.attempt)
        if isinstance(action, FenceAttempt):
            return self._fence(action.attempt)
        if isinstance(action, ScheduleRestart):
            self._timer = (time.monotonic() + action.delay_s, action.attempt)
            return None
        if isinstance(action, Finish):
            self._finish(action)
            return None
        msg = f"unknown supervisor action {action!r}"
        raise AssertionError(msg)

    def _resolve_sinks(self, action: ResolveSinks) -> SupervisorEvent:
        """Commit what the checkpoint decided and abort every other transaction, one task per sink operator."""
        attempt = self._supervisor.attempt
        checkpoint_id = action.checkpoint_id
        try:
            decided = self._sink_committables(checkpoint_id) if checkpoint_id is not None else {}
            refs = []
            for vertex in self._plan.vertices:
                node = vertex.nodes[-1]
                if node.kind is not NodeKind.SINK:
                    continue
                committables = [node.spec.read_committable(record, operator=node.name)
                                for record in decided.get(node.uid, [])]
                commit = [] if action.end is SinkEnd.FAIL else committables
                ctx = SinkContext(self.job, node.name, 0, vertex.parallelism, run=self.run_id, attempt=attempt)
                refs.append(self._executor.call(resolve_sink_operator, node.spec, ctx, commit, committables))
            self._executor.get(refs, timeout=_CALL_TIMEOUT_S)
        except Exception as error:  # noqa: BLE001 - a failure like any other
            self._last_failure = error
            return Failed(attempt, f"resolving the sinks' transactions failed: {error}")
        return SinksResolved(attempt)

    def _sink_committables(self, checkpoint_id: int) -> dict[str, list[CommittableRecord]]:
        """Per sink operator (uid), every transaction checkpoint ``checkpoint_id`` recorded as pre-committed."""
        assert self._storage is not None
        manifest = self._storage.manifest(checkpoint_id)
        if manifest is None:
            msg = f"checkpoint {checkpoint_id} of job {self.job!r} is not complete in {self._storage.uri!r}"
            raise CheckpointError(msg, reason="missing")
        paths = {task: {key: StateHandle.from_manifest(state) for key, state in entry["states"].items()
                        if "pieces" not in state}  # a sink's state is never in pieces
                 for task, entry in manifest["tasks"].items()}
        found: dict[str, list[CommittableRecord]] = {}
        for uid, handles in restored_sink_states(self._plan, paths).items():
            for path in handles:
                restored = read_sink_state(self._storage.read_state(path))
                found.setdefault(uid, []).extend(
                    c for c_id, items in sorted(restored.items()) if c_id <= checkpoint_id for c in items)
        return found

    def _deploy(self, number: int, restore_id: int | None) -> SupervisorEvent:
        """Create, restore and wire the actors of attempt ``number``; a failure anywhere is one failure."""
        attempt = _Attempt(number)
        self._attempt = attempt
        self._waits = {}
        started = time.monotonic()
        if number > 1:
            log.warning("job %s: %s; restart %d restores %s", self.job, self._last_reason, number - 1,
                        f"checkpoint {restore_id}" if restore_id is not None else "the beginning")
        try:
            setup = None
            restore: RestorePoint | None = None
            decision = self._decide_placement()
            if self._checkpoint is not None:
                coordinator = self._coordinator or self._start_coordinator(restore_id, decision.coordinator)
                setup = CheckpointSetup(coordinator, self._checkpoint.storage, cache=self._executor.object_store,
                                        unaligned=self._checkpoint.mode == "unaligned",
                                        aligned_timeout_s=self._checkpoint.aligned_timeout_s,
                                        incremental=self._checkpoint.incremental)
                if restore_id is not None:
                    restore = self._executor.get(coordinator.restore_point.remote(restore_id),  # type: ignore[assignment]
                                      timeout=_CALL_TIMEOUT_S)
            identity = AttemptId(self.run_id, number)
            assigned = {} if restore is None else assign_restored_state(
                self._plan, restore[1], allow_non_restored_state=self._allow_non_restored_state)
            resets: list[Any] = []
            for vertex in self._plan.vertices:
                group = []
                for subtask in range(vertex.parallelism):
                    name = f"{self.job}/{vertex.name}/{subtask}"
                    task_restore = None
                    if restore is not None:
                        task_restore = SubtaskRestore(restore[0], assigned[f"{vertex.name}/{subtask}"])
                    actor = self._kept.pop(name, None)
                    if actor is not None:  # fenced cleanly in place: the same process starts this attempt
                        resets.append(actor.reset.remote(setup, task_restore, identity))
                    else:
                        actor = self._create(SubtaskActor, name, decision.subtasks.get(f"{vertex.name}/{subtask}", ""),
                                             self._plan, vertex.id, subtask, self._options, setup, task_restore,
                                             attempt=identity)
                    group.append(actor)
                    attempt.names[actor] = name
                    attempt.actors[vertex.id] = group
            self._executor.get(resets, timeout=_CALL_TIMEOUT_S)
            everyone = attempt.everyone
            downstream = {v.id: attempt.actors[v.id] for v in self._plan.vertices}
            self._executor.get([a.connect.remote(downstream) for a in everyone], timeout=_CALL_TIMEOUT_S)
            attempt.sources = [a for v in self._plan.vertices if v.is_source for a in attempt.actors[v.id]]
            attempt.sinks = [a for v in self._plan.vertices if v.nodes[-1].kind is NodeKind.SINK
                             for a in attempt.actors[v.id]]
            if self._coordinator is not None:
                self._executor.get(self._coordinator.start.remote(number, attempt.sources, everyone),
                                   timeout=_CALL_TIMEOUT_S)
                self._waits[self._coordinator.watch.remote(number)] = (_Wait.WATCH, f"{self.job}/coordinator")
            for actor in everyone:
                self._waits[actor.done.remote()] = (_Wait.DONE, attempt.names[actor])
                self._waits[actor.watch.remote()] = (_Wait.WATCH, attempt.names[actor])
            self._loops = self._loop_watches(attempt)
            self._record_placement(attempt)
            for source in attempt.sources:
                source.run.remote()
        except Exception as error:  # noqa: BLE001 - a failure while deploying is one failure like any other
            self._last_failure = error
            return Failed(number, f"deploying attempt {number} failed: {type(error).__name__}: {error}",
                          retryable=not isinstance(error, _NOT_RETRYABLE))
        if restore is not None:
            self.restored_from.append(restore[0])
        if number == 1:
            self.startup_s = time.monotonic() - self._created
            self._started = time.monotonic()
            self._events_log.emit("started", parallelism={v.name: v.parallelism for v in self._plan.vertices},
                                  restored_from=restore[0] if restore else None, startup_s=self.startup_s)
        else:
            self._restart_counter.inc()
            recovery = time.monotonic() - self._failure_seen if self._failure_seen is not None else None
            self._restarts.append({**self._pending_restart, "attempt": number,
                                   "restored_from": restore[0] if restore else None, "recovery_s": recovery,
                                   "deploy_s": time.monotonic() - started})
            self._events_log.emit("restart", attempt=number, restored_from=restore[0] if restore else None,
                                  recovery_s=recovery, **{k: self._restarts[-1].get(k)
                                                          for k in ("fence_s", "deploy_s", "replaced")})
            self._observer.nudge()
        log.info("job %s: attempt %d: %d subtask actors running in %.2f s%s\n%s", self.job, number,
                 len(attempt.everyone), time.monotonic() - started,
                 f" (restored from checkpoint {restore[0]})" if restore else "", self._plan.describe())
        self._deployed.set()
        if self._spare_workers:  # a replaced actor's next process, warm; in the background, once the job ran a while
            self._executor.keep_warm(self.run_id, dict.fromkeys(set(self._placement.values()), self._spare_workers),
                                     after_s=SPARE_AFTER_S)
        return Deployed(number)

    def _loop_watches(self, attempt: _Attempt) -> list[_LoopWatch]:
        loops = sorted({v.loop for v in self._plan.vertices if v.loop is not None})
        watches = []
        for loop in loops:
            on_loop = [v for v in self._plan.vertices if v.loop == loop]
            watches.append(_LoopWatch(self._executor, [a for v in on_loop for a in attempt.actors[v.id]],
                                      [a for v in on_loop if v.feedback_channels for a in attempt.actors[v.id]]))
        return watches

    def _fence(self, number: int) -> SupervisorEvent:
        """Fence the attempt, settle the coordinator, and report the restore point.

        The actors that answer are fenced in place (:meth:`_fence_in_place`);
        the others are killed and their death confirmed.
        """
        attempt = self._attempt
        started = time.monotonic()
        answered = self._collect_attempt_counts()
        if self._placed_attempt == attempt.number:
            subtasks = {task: node for task, node in self._placement.items() if task != "coordinator"}
            self._silent_nodes = silent_nodes(subtasks, answered)
        actors = attempt.everyone
        if self._restart_in_place:
            self._kept.update(self._fence_in_place(attempt, answered))
            actors = [a for a in actors if attempt.names[a] not in self._kept]
        self._executor.kill(actors)
        self._drop_waits()
        latest: int | None = None
        if self._checkpoint is not None:
            if self._coordinator is not None:
                try:
                    latest = self._executor.get(self._coordinator.fence.remote(), timeout=_CALL_TIMEOUT_S)  # type: ignore[assignment]
                except Exception:  # noqa: BLE001 - the coordinator is gone or hung: replace it
                    coordinator = self._coordinator
                    self._coordinator = None
                    self._executor.kill([coordinator])
                    self._executor.confirm_dead([coordinator])
            if self._coordinator is None:
                latest = self._latest_of_run()
        self._executor.confirm_dead(actors)
        self._attempt = _Attempt(number)
        self._pending_restart.update(fence_s=time.monotonic() - started, replaced=len(actors))
        log.info("job %s: attempt %d fenced; the newest completed checkpoint is %s", self.job, number, latest)
        return Fenced(number, latest)

    def _drop_waits(self) -> None:
        """Stop waiting on the attempt's calls; read the failures already in, so Ray does not report them unread.

        After a failure the supervisor reads only the root cause: the echoes
        (a subtask whose downstream died) stay unread, and Ray logs every
        failed result that is dropped unread as an unhandled error.
        """
        ready, _ = self._executor.wait(list(self._waits), num_returns=len(self._waits), timeout=0)
        for ref in ready:
            with contextlib.suppress(Exception):
                self._executor.get(ref, timeout=0)
        self._waits = {}
        self._loops = []

    def _fence_in_place(self, attempt: _Attempt, answered: set[str]) -> dict[str, ActorHandle]:
        """Fence ``attempt`` inside the actors whose subtask just answered; return those that stopped cleanly, by name.

        The others (dead, hung, on a lost node, or with a write still running)
        are left for the caller to kill, as every actor was before.
        """
        candidates = [a for a in attempt.everyone if attempt.names[a].split("/", 1)[1] in answered]
        refs: list[Any] = [a.fence.remote(attempt.number) for a in candidates]
        ready, _ = self._executor.wait(refs, num_returns=len(refs), timeout=2 * FENCE_WAIT_S + 2)
        kept: dict[str, ActorHandle] = {}
        for actor, ref in zip(candidates, refs, strict=True):
            if ref not in ready:
                continue
            try:
                clean = self._executor.get(ref, timeout=_CALL_TIMEOUT_S)
            except Exception:  # it died while fencing: replaced like any dead actor
                log.debug("job %s: %s died while its attempt was fenced", self.job, attempt.names[actor],
                          exc_info=True)
                continue
            if clean:
                kept[attempt.names[actor]] = actor
        if len(kept) < len(attempt.everyone):
            log.info("job %s: attempt %d fenced in place in %d of %d subtask actors; the others are replaced",
                     self.job, attempt.number, len(kept), len(attempt.everyone))
        return kept

    def _latest_of_run(self) -> int | None:
        """Without a coordinator: the newest checkpoint of this run in storage, or the one it resumed from."""
        assert self._storage is not None
        return self._storage.latest_id(run=self.run_id, otherwise=self._supervisor.latest_checkpoint)

    def _attempt_counters(self, timeout_s: float = 10.0) -> list[SubtaskCounters]:
        """The counters of the attempt's subtasks that answer within ``timeout_s`` (a dead one's are lost)."""
        return _gather(self._executor, [a.metrics.remote() for a in self._attempt.everyone], timeout_s)

    def _collect_attempt_counts(self) -> set[str]:
        """The attempt is fenced: its subtasks' last figures (a dead one's as last known) become earlier counts.

        Returns the tasks that answered.
        """
        counters = self._attempt_counters(timeout_s=2.0)
        self._known.update(self._attempt.number, counters)
        self._known.retire(self._attempt.number)
        return {c.task for c in counters}

    def _finish(self, finish: Finish) -> None:
        if finish.end is JobEnd.FINISHED:
            self._result = self._final_result()
        else:
            self._error = self._end_error(finish)
        try:
            self._observer.tick()  # the coordinator still lives: its last checkpoint outcomes reach the event log
        except Exception:
            log.debug("job %s: the last sample before the end failed", self.job, exc_info=True)
        self._remove_everything()

    def _final_result(self) -> JobResult:
        """The finished job's result; an actor that dies now (the output is committed) only loses its counters."""
        finished = time.monotonic()
        per_actor = self._final_counts or self._attempt_counters()
        processed = max((e.active_s or 0.0 for e in per_actor), default=0.0)
        self._known.update(self._attempt.number, per_actor)
        counters, _ = self._known.totals()
        metrics = counters.as_dict()
        for operator in metrics["operators"].values():
            operator.pop("age_s", None)
        duration = finished - self._started
        metrics.update(checkpoints_completed=0, restarts=self._supervisor.restarts, restored_from=self.restored_from,
                       duration_s=duration, processing_s=processed, startup_s=self.startup_s,
                       events_per_s=metrics["events_in"] / duration if duration > 0 else 0.0)
        if self._coordinator is not None:
            for stats in _gather(self._executor, [self._coordinator.stats.remote()]):
                metrics.update(stats)
        return JobResult(self.job, metrics, self._plan.describe(), dict(self._placement))

    def _end_error(self, finish: Finish) -> JobFailedError:
        cause = self._last_failure
        if finish.end is JobEnd.CANCELLED:
            error = JobFailedError(f"job {self.job!r} was cancelled", job=self.job)
        else:
            message = f"job {self.job!r} failed: {finish.reason}"
            if finish.gave_up:
                message += (f"; gave up after {self._supervisor.restarts} restart(s) "
                            f"({self._supervisor.strategy.kind})")
            if self._checkpoint is not None and finish.latest_checkpoint is not None:
                message += (f"; it can resume from checkpoint {finish.latest_checkpoint} in "
                            f"{redact_uri(self._checkpoint.storage)!r} (resume=True)")
            error = JobFailedError(message, job=self.job, operator=finish.operator)
        error.__cause__ = cause
        return error

    def _remove_everything(self) -> None:
        """Kill every actor of the job that is left, coordinator included, confirm it, and release the storage."""
        actors = self._attempt.everyone + list(self._kept.values())
        self._kept = {}
        if self._coordinator is not None:
            actors.append(self._coordinator)
            self._coordinator = None
        self._executor.kill(actors)
        self._executor.release_warm(self.run_id)
        self._drop_waits()
        self._executor.confirm_dead(actors)
        if self._storage is not None:
            with contextlib.suppress(OnceflowError):
                if self._checkpoint is not None and self._checkpoint.incremental:
                    self._storage.discard_unreferenced_shared()  # pieces of checkpoints that never completed
                self._storage.release_lease(self.run_id)


def submit(flow: Dataflow, *, options: JobOptions | None = None, **keywords: Unpack[JobKeywords]) -> JobHandle:
    """Start ``flow`` and return a handle without waiting for it.

    Args:
        flow: the dataflow.
        options: how to run it, as one :class:`~onceflow.runtime.options.JobOptions`;
            or give the same options as keywords (below), not both.
        **keywords: the fields of :class:`~onceflow.runtime.options.JobOptions`, each optional:

            - ``parallelism`` (1): the default parallelism of sources, keyed operators and unions.
            - ``address`` (``None``): ``None`` reuses an initialised Ray or starts an embedded one
              (or joins ``RAY_ADDRESS`` under ``ray job submit``); ``"auto"`` or
              ``"ray://..."`` joins a cluster.
            - ``checkpoint`` (``None``): take checkpoints (exactly-once through failures); ``None``
              turns them off: a failure then fails the job and commits nothing.
            - ``restart`` (``None``): how often and how soon to restart after a failure (with
              checkpointing); ``RestartStrategy.default()`` by default.
            - ``resume`` (``False``): start from the newest complete checkpoint of this job in
              ``checkpoint.storage``, whichever run took it (after the driver
              itself was lost, or a job failed for good); without one the job
              starts from the beginning. A fresh run (``False``) never restores
              another run's state: it starts from the beginning, and its sinks
              abort every transaction an earlier run left uncommitted.
            - ``allow_non_restored_state`` (``False``): when resuming, drop (with a warning)
              checkpointed state that matches no operator of ``flow`` instead of
              refusing to start. State is matched by operator uid: an
              operator's ``name=``, or an id derived from the steps upstream of
              it, so give stateful operators names to keep their state across
              changes to the graph.
            - ``max_parallelism`` (128): the number of key groups (the most subtasks a keyed operator can have).
            - ``batch_bytes`` (4 MiB): a channel sends once it buffers this many bytes.
            - ``linger_s`` (50 ms): a channel sends buffered rows at the latest after this long.
            - ``credits`` (2): unacknowledged messages per channel.
            - ``chaining`` (``True``): fuse forward-connected operators into one actor.
            - ``actor_options`` (``None``): extra Ray actor options for every subtask (``num_cpus``, ...).
            - ``placement`` (``"spread"``): where the subtasks run on a cluster: ``"spread"``,
              ``"pack"``, or ``{operator name: node id or [node ids]}``; chosen again at each
              restart from the nodes alive (see :mod:`onceflow.runtime.placement`).
            - ``restart_in_place`` (``True``): a restart resets the subtask actors that still
              answer in place and replaces only the dead or hung ones; ``False`` replaces every
              actor (see :mod:`onceflow.runtime.subtask_actor`).
            - ``spare_workers`` (1): idle Ray worker processes kept on each node the job runs
              on from 5 s after each deployment, so a replaced actor starts in one (see
              :mod:`onceflow.runtime.warm`).

    Returns once the first attempt runs (its actors deployed and wired), or
    the job already ended; failures from then on are the job's to recover.

    Raises:
        PlanError: the dataflow cannot run (no sink, bad parallelism, a job of
            the same name is already running, or resumed state that matches
            no operator, without ``allow_non_restored_state``), an option is
            invalid, a sink refuses the checkpoint settings (its
            ``check_job``), or both ``options`` and keyword options were given.
        TypeError: a keyword names no option.
    """
    job = JobOptions.from_keywords(options, keywords)
    physical = plan(flow, job.parallelism, max_parallelism=job.max_parallelism, chaining=job.chaining)
    check_pinned_operators(job.placement, {v.name: [n.name for n in v.nodes] for v in physical.vertices})
    defaults = RuntimeOptions()
    runtime_options = RuntimeOptions(
        batch_bytes=job.batch_bytes or defaults.batch_bytes,
        linger_s=defaults.linger_s if job.linger_s is None else job.linger_s,
        credits=job.credits or defaults.credits,
        log_level=logging.getLogger("onceflow").getEffectiveLevel(),
    )
    if job.checkpoint is not None and job.checkpoint.max_concurrent > 1 and any(
            v.loop is not None for v in physical.vertices):
        msg = (f"dataflow {flow.name!r} has a loop, whose head records one checkpoint at a time (what comes round "
               f"until the barrier does); pass CheckpointConfig(max_concurrent=1), not "
               f"{job.checkpoint.max_concurrent}")
        raise PlanError(msg)
    sinks = [node.spec for node in flow.nodes if node.kind is NodeKind.SINK]
    for sink in sinks:
        sink.check_job(job.checkpoint, job.restart_strategy)
    if job.executor == "ray":
        ensure_ray(job.address)
    for sink in sinks:
        sink.prepare()
    return JobHandle(flow, physical, runtime_options, job.checkpoint, job.restart_strategy, job.actor_options or {},
                     job.resume, job.allow_non_restored_state, executor_named(job.executor),
                     from_savepoint=job.from_savepoint, placement=job.placement,
                     restart_in_place=job.restart_in_place, spare_workers=job.spare_workers)


def run(flow: Dataflow, *, options: JobOptions | None = None, timeout_s: float | None = None,
        **keywords: Unpack[JobKeywords]) -> JobResult:
    """Run a bounded ``flow`` to the end and return its result (see :func:`submit` for the options).

    Args:
        flow: the dataflow.
        options: how to run it (see :func:`submit`); or give the options as keywords, not both.
        timeout_s: cancel the job and raise :class:`TimeoutError` if it has not ended after this long.
        **keywords: the fields of :class:`~onceflow.runtime.options.JobOptions` (see :func:`submit`).

    Raises:
        JobFailedError: an operator failed (and restarts, if any, ran out); the
            message names it.
        PlanError: the dataflow cannot run, an option is invalid, or both
            ``options`` and keyword options were given.
    """
    handle = submit(flow, options=JobOptions.from_keywords(options, keywords))
    try:
        return handle.wait(timeout_s)
    except TimeoutError:
        handle.cancel()
        raise
