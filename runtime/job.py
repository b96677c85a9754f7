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
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, NoReturn

import ray

from checkpoint.config import CheckpointConfig, RestartStrategy, RestartTracker
from checkpoint.errors import DataError, JobFailedError, OnceflowError, PlanError
from operators.keygroups import DEFAULT_MAX_PARALLELISM
from runtime import progress
from runtime.actor import CheckpointSetup, RuntimeOptions, SubtaskActor, _Restore
from runtime.channel import END_OF_TIME, NO_WATERMARK
from runtime.checkpointing import CoordinatorActor, RestorePoint
from runtime.dataflow import NodeKind
from runtime.output import DownstreamFailedError
from runtime.plan import PhysicalPlan, plan
from runtime.ray_env import NAMESPACE, ensure_ray
from runtime.telemetry import RestartCounter

if TYPE_CHECKING:
    from ray.actor import ActorHandle

    from runtime.dataflow import Dataflow

__all__ = ["JobHandle", "JobResult", "JobStatus", "run", "submit"]

log = logging.getLogger("onceflow")

_NOT_RETRYABLE = (DataError, PlanError)
"""Failures that a restart would only repeat: the job fails at once."""


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
    """

    job: str
    metrics: dict[str, Any] = field(default_factory=dict)
    plan: str = ""


def _sum_metrics(per_actor: list[dict[str, Any]], plan_: PhysicalPlan) -> dict[str, Any]:
    operators: dict[str, dict[str, Any]] = {}
    for entry in per_actor:
        for name, counters in entry["operators"].items():
            total = operators.setdefault(name, {"subtasks": 0})
            total["subtasks"] += 1
            for key, value in counters.items():
                # Counts add up over subtasks; ratios (a Bloom filter's fill) are
                # reported for the worst subtask.
                if isinstance(value, bool) or not isinstance(value, int | float):
                    continue
                if isinstance(value, float):
                    total[key] = max(total.get(key, value), value)
                else:
                    total[key] = total.get(key, 0) + value
    source_names = {n.name for v in plan_.vertices for n in v.nodes if n.kind is NodeKind.SOURCE}
    watermarks = [e["input_watermark"] for e in per_actor if not e["is_source"] and NO_WATERMARK < e["input_watermark"]
                  < END_OF_TIME]
    return {
        "watermark": min(watermarks) if watermarks else None,
        "events_in": sum(operators[n]["records_out"] for n in source_names if n in operators),
        "events_out": sum(e["sink_rows"] for e in per_actor),
        "late_events": sum(c.get("late_events", 0) for c in operators.values()),
        "backpressure_s": sum(e["backpressure_s"] for e in per_actor),
        "messages": sum(e["messages_out"] for e in per_actor),
        "operators": operators,
    }


def _add_counts(total: dict[str, Any], part: dict[str, Any]) -> None:
    for key in ("events_in", "events_out", "late_events", "backpressure_s", "messages"):
        total[key] = total.get(key, 0) + part.get(key, 0)


@dataclass(slots=True)
class _Attempt:
    """The actors of one run of the job (the first, or one after a restart)."""

    actors: dict[int, list[ActorHandle]]
    names: dict[Any, str]
    sources: list[ActorHandle]
    sinks: list[ActorHandle]
    done: dict[Any, str]
    watch: dict[Any, str]
    runs: list[Any]

    @property
    def everyone(self) -> list[ActorHandle]:
        return [a for group in self.actors.values() for a in group]


class JobHandle:
    """A running job: watch it, wait for it, stop or cancel it."""

    def __init__(self, flow: Dataflow, plan_: PhysicalPlan, options: RuntimeOptions,
                 checkpoint: CheckpointConfig | None, restart: RestartStrategy,
                 actor_options: dict[str, Any], resume: bool = False) -> None:
        self.job = flow.name
        self._plan = plan_
        self._options = options
        self._checkpoint = checkpoint
        self._restarts = RestartTracker(restart)
        self._restart_counter = RestartCounter(flow.name)
        self._actor_options = actor_options
        self._status = JobStatus.RUNNING
        self._result: JobResult | None = None
        self._error: BaseException | None = None
        self._coordinator: ActorHandle | None = None
        self._coordinator_watch: Any = None
        self._earlier: dict[str, Any] = {}
        self.restored_from: list[int] = []
        created = time.monotonic()
        restore: RestorePoint | None = None
        if checkpoint is not None:
            self._start_coordinator()
            if resume:
                assert self._coordinator is not None
                restore = ray.get(self._coordinator.restore_point.remote())
                if restore is not None:
                    self.restored_from.append(restore[0])
        self._attempt = self._start_attempt(restore)
        self.startup_s = time.monotonic() - created
        self._started = time.monotonic()
        self._done = threading.Event()
        self._supervisor = threading.Thread(target=self._supervise_until_done, daemon=True,
                                            name=f"onceflow-supervisor-{self.job}")
        self._supervisor.start()

    # -- actors -----------------------------------------------------------------------

    def _create(self, remote_cls: Any, name: str, *args: Any) -> ActorHandle:
        deadline = time.monotonic() + 15
        options = {"num_cpus": 0, "max_restarts": 0, "max_concurrency": 1000, **self._actor_options}
        while True:
            try:
                return remote_cls.options(name=name, namespace=NAMESPACE, **options).remote(*args)
            except ValueError as error:
                # A killed actor's name is released asynchronously; a live one is a clash.
                if time.monotonic() > deadline:
                    msg = (
                        f"cannot start job {self.job!r}: an actor named {name!r} already exists "
                        f"in namespace {NAMESPACE!r} ({error}); stop that job or rename the dataflow"
                    )
                    raise PlanError(msg) from error
                time.sleep(0.1)

    def _start_coordinator(self) -> None:
        assert self._checkpoint is not None
        tasks = [f"{v.name}/{i}" for v in self._plan.vertices for i in range(v.parallelism)]
        self._coordinator = self._create(ray.remote(CoordinatorActor), f"{self.job}/coordinator", self.job,
                                         self._checkpoint, tasks, self._options.log_level)
        self._coordinator_watch = self._coordinator.watch.remote()

    def _start_attempt(self, restore: RestorePoint | None) -> _Attempt:
        remote_cls: Any = ray.remote(SubtaskActor)
        setup = None
        if self._checkpoint is not None:
            assert self._coordinator is not None
            setup = CheckpointSetup(self._coordinator, self._checkpoint.storage)
        actors: dict[int, list[ActorHandle]] = {}
        names: dict[Any, str] = {}
        created: list[ActorHandle] = []
        try:
            for vertex in self._plan.vertices:
                group = []
                for subtask in range(vertex.parallelism):
                    name = f"{self.job}/{vertex.name}/{subtask}"
                    task_restore = None
                    if restore is not None:
                        task_restore = _Restore(restore[0], restore[1].get(f"{vertex.name}/{subtask}", {}))
                    actor = self._create(remote_cls, name, self._plan, vertex.id, subtask, self._options, setup,
                                         task_restore)
                    created.append(actor)
                    group.append(actor)
                    names[actor] = name
                actors[vertex.id] = group
            everyone = [a for group in actors.values() for a in group]
            ray.get([a.connect.remote({v.id: actors[v.id] for v in self._plan.vertices}) for a in everyone])
        except BaseException:
            self._kill(created)
            raise
        sources = [a for v in self._plan.vertices if v.is_source for a in actors[v.id]]
        sinks = [a for v in self._plan.vertices if v.nodes[-1].kind is NodeKind.SINK for a in actors[v.id]]
        if self._coordinator is not None:
            ray.get(self._coordinator.start.remote(sources, everyone))
        attempt = _Attempt(actors, names, sources, sinks,
                           done={a.done.remote(): names[a] for a in everyone},
                           watch={a.watch.remote(): names[a] for a in everyone},
                           runs=[a.run.remote() for a in sources])
        log.info("job %s: %d subtask actors running%s\n%s", self.job, len(everyone),
                 f" (restored from checkpoint {restore[0]})" if restore else "", self._plan.describe())
        return attempt

    @staticmethod
    def _kill(actors: list[ActorHandle]) -> None:
        for actor in actors:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)

    # -- observation --------------------------------------------------------------------

    @property
    def actor_names(self) -> list[str]:
        """The named subtask actors of this job (``<job>/<operator>/<subtask>``)."""
        return [f"{self.job}/{v.name}/{i}" for v in self._plan.vertices for i in range(v.parallelism)]

    def status(self) -> JobStatus:
        """The job's status, without waiting."""
        return self._status

    def metrics(self, timeout_s: float = 10.0) -> dict[str, Any]:
        """Live counters summed over subtasks (as :attr:`JobResult.metrics`)."""
        if self._result is not None:
            return self._result.metrics
        per_actor: list[dict[str, Any]] = ray.get([a.metrics.remote() for a in self._attempt.everyone],
                                                  timeout=timeout_s)
        metrics = _sum_metrics(per_actor, self._plan)
        metrics["restarts"] = self._restarts.attempts
        if self._coordinator is not None:
            with contextlib.suppress(Exception):
                metrics.update(ray.get(self._coordinator.stats.remote(), timeout=timeout_s))
        return metrics

    # -- control ------------------------------------------------------------------------

    def stop(self, timeout_s: float | None = None) -> JobResult:
        """End the input of every source now, let the job drain and commit, and return its result."""
        if self._status is JobStatus.RUNNING:
            ray.get([a.stop.remote() for a in self._attempt.sources])
        return self.wait(timeout_s)

    def cancel(self) -> None:
        """Stop at once; everything not yet committed is discarded."""
        if self._status in (JobStatus.RUNNING, JobStatus.RESTARTING):
            self._status = JobStatus.CANCELLED
            self._abort_sinks()
            self._shutdown()
            self._done.wait(30)
            self._shutdown()  # in case a restart was starting actors meanwhile

    def wait(self, timeout_s: float | None = None) -> JobResult:
        """Block until the job finishes; return its result.

        Raises:
            JobFailedError: an operator failed and the job could not (or may
                not) restart; the message names the failure and, with
                checkpointing, the checkpoint the job can resume from.
            TimeoutError: ``timeout_s`` passed first (the job keeps running).
        """
        if not self._done.wait(timeout_s):
            msg = f"job {self.job!r} still running after {timeout_s} s"
            raise TimeoutError(msg)
        if self._result is not None:
            return self._result
        assert self._error is not None
        raise self._error

    # -- supervision --------------------------------------------------------------------

    def _supervise_until_done(self) -> None:
        """The job's supervisor (a thread): wait, recover from failures, finish; record the outcome."""
        factory = progress.current()
        reporter = factory(self) if factory is not None else None
        try:
            while True:
                failure = self._supervise()
                if failure is None:
                    break
                self._recover(*failure)
            self._finish()
        except BaseException as error:  # noqa: BLE001 - handed to wait()
            if self._error is None:
                if not isinstance(error, OnceflowError):
                    wrapped = JobFailedError(f"job {self.job!r} failed: {type(error).__name__}: {error}",
                                             job=self.job)
                    wrapped.__cause__ = error
                    error = wrapped
                self._error = error
            if self._status is not JobStatus.CANCELLED:
                self._status = JobStatus.FAILED
            with contextlib.suppress(Exception):
                self._shutdown()
        finally:
            if reporter is not None:
                reporter.close()
            self._done.set()

    @staticmethod
    def _wait_any(refs: list[Any]) -> Any:
        ready, _ = ray.wait(refs, num_returns=1)
        return ready[0]

    def _supervise(self) -> tuple[BaseException, str] | None:
        """Wait for the end of input (and the final checkpoint); return the failure, if any."""
        attempt = self._attempt
        watch = dict(attempt.watch)
        if self._coordinator_watch is not None:
            watch[self._coordinator_watch] = f"{self.job}/coordinator"
        pending = dict(attempt.done)
        while pending:
            ref = self._wait_any([*pending, *watch])
            try:
                ray.get(ref)
            except Exception:  # noqa: BLE001 - classified by _root_cause
                return self._root_cause({**pending, **watch})
            pending.pop(ref, None)
        if self._checkpoint is None:
            return None
        assert self._coordinator is not None
        final: Any = self._coordinator.final_checkpoint.remote()
        while True:
            ref = self._wait_any([final, *watch])
            try:
                ray.get(ref)
            except Exception:  # noqa: BLE001 - classified by _root_cause
                return self._root_cause({final: f"{self.job}/coordinator", **watch})
            if ref == final:
                return None

    def _root_cause(self, refs: dict[Any, str]) -> tuple[BaseException, str]:
        """Among the failed calls, the error that explains the rest (not a downstream echo)."""
        # Give the other failures of the same moment a little time to surface:
        # the root cause (a bad batch) may report a moment after its echoes.
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0.3)
        root: BaseException | None = None
        actor = ""
        for ref in ready:
            try:
                ray.get(ref, timeout=0)
            except Exception as error:  # noqa: BLE001 - classified below
                cause = getattr(error, "cause", None) or error
                if isinstance(cause, DownstreamFailedError):
                    continue
                if root is None or (isinstance(cause, OnceflowError) and not isinstance(root, OnceflowError)):
                    root, actor = cause, refs[ref]
        if root is None:
            return RuntimeError("a downstream subtask failed"), ""
        return root, actor

    def _describe(self, error: BaseException, actor: str) -> str:
        if isinstance(error, ray.exceptions.ActorDiedError | ray.exceptions.ActorUnavailableError):
            return f"subtask actor {actor!r} died"
        return str(error)

    def _collect_attempt_counts(self) -> None:
        refs: list[Any] = [a.metrics.remote() for a in self._attempt.everyone]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=2.0)
        per_actor = []
        for ref in ready:
            with contextlib.suppress(Exception):
                per_actor.append(ray.get(ref, timeout=0))
        _add_counts(self._earlier, _sum_metrics(per_actor, self._plan))

    def _recover(self, error: BaseException, actor: str) -> None:
        """Restart from the newest complete checkpoint, or fail the job."""
        if self._status is JobStatus.CANCELLED:
            self._fail(JobFailedError(f"job {self.job!r} was cancelled", job=self.job), error)
        reason = self._describe(error, actor)
        if self._checkpoint is None or isinstance(error, _NOT_RETRYABLE):
            self._abort_sinks()
            self._shutdown()
            suffix = "; nothing was committed" if self._checkpoint is None else ""
            self._fail(JobFailedError(f"job {self.job!r} failed: {reason}{suffix}", job=self.job,
                                      operator=getattr(error, "operator", "") or actor), error)
        self._status = JobStatus.RESTARTING
        self._collect_attempt_counts()
        coordinator_alive = True
        try:
            ray.get(self._coordinator.on_job_failure.remote(), timeout=10)  # type: ignore[union-attr]
        except Exception:  # noqa: BLE001 - the coordinator itself is gone
            coordinator_alive = False
        self._kill(self._attempt.everyone)
        delay = self._restarts.on_failure()
        if delay is None:
            point = self._storage_latest()
            resume = f"; it can resume from checkpoint {point} in {self._checkpoint.storage!r}" if point else ""
            self._shutdown()
            self._fail(JobFailedError(
                f"job {self.job!r} failed: {reason}; gave up after {self._restarts.attempts} restart(s) "
                f"({self._restarts.strategy.kind}){resume}", job=self.job,
                operator=getattr(error, "operator", "") or actor), error)
        time.sleep(delay)
        if self._status is JobStatus.CANCELLED:
            self._fail(JobFailedError(f"job {self.job!r} was cancelled", job=self.job), error)
        if not coordinator_alive:
            self._kill([self._coordinator])  # type: ignore[list-item]
            self._start_coordinator()
        assert self._coordinator is not None
        restore: RestorePoint | None = ray.get(self._coordinator.restore_point.remote())  # type: ignore[assignment]
        log.warning("job %s: %s; restart %d restores %s", self.job, reason, self._restarts.attempts,
                    f"checkpoint {restore[0]}" if restore else "the beginning (no checkpoint completed yet)")
        if restore is not None:
            self.restored_from.append(restore[0])
        self._restart_counter.inc()
        self._attempt = self._start_attempt(restore)
        self._status = JobStatus.RUNNING

    def _storage_latest(self) -> int | None:
        from checkpoint.storage import CheckpointStorage

        assert self._checkpoint is not None
        with contextlib.suppress(Exception):
            manifest = CheckpointStorage(self._checkpoint.storage, self.job).latest_manifest()
            return int(manifest["checkpoint_id"]) if manifest else None
        return None

    def _fail(self, error: JobFailedError, cause: BaseException) -> NoReturn:
        error.__cause__ = cause
        self._error = error
        if self._status is not JobStatus.CANCELLED:
            self._status = JobStatus.FAILED
        raise error

    def _finish(self) -> JobResult:
        attempt = self._attempt
        ray.get(attempt.runs)
        processed = time.monotonic()
        per_actor: list[dict[str, Any]] = ray.get([a.metrics.remote() for a in attempt.everyone])
        if self._checkpoint is None:
            try:
                ray.get([a.commit.remote() for a in attempt.sinks])
            except Exception as error:  # noqa: BLE001 - reported as JobFailedError
                self._shutdown()
                self._fail(JobFailedError(f"job {self.job!r}: committing the output failed: {error}",
                                          job=self.job), error)
        finished = time.monotonic()
        metrics = _sum_metrics(per_actor, self._plan)
        _add_counts(metrics, self._earlier)
        duration = finished - self._started
        metrics.update(checkpoints_completed=0, restarts=self._restarts.attempts, restored_from=self.restored_from,
                       duration_s=duration, processing_s=processed - self._started, startup_s=self.startup_s,
                       events_per_s=metrics["events_in"] / duration if duration > 0 else 0.0)
        if self._coordinator is not None:
            metrics.update(ray.get(self._coordinator.stats.remote()))
        self._result = JobResult(self.job, metrics, self._plan.describe())
        self._status = JobStatus.FINISHED
        self._shutdown()
        return self._result

    def _abort_sinks(self) -> None:
        refs: list[Any] = [a.abort.remote() for a in self._attempt.sinks]
        with contextlib.suppress(Exception):
            ray.wait(refs, num_returns=len(refs), timeout=10)

    def _shutdown(self) -> None:
        self._kill(self._attempt.everyone)
        if self._coordinator is not None:
            self._kill([self._coordinator])


def submit(flow: Dataflow, *, parallelism: int = 1, address: str | None = None,
           checkpoint: CheckpointConfig | None = None, restart: RestartStrategy | None = None,
           max_parallelism: int = DEFAULT_MAX_PARALLELISM, batch_bytes: int | None = None,
           linger_s: float | None = None, credits: int | None = None, chaining: bool = True,
           actor_options: dict[str, Any] | None = None, resume: bool = False) -> JobHandle:
    """Start ``flow`` and return a handle without waiting for it.

    Args:
        flow: the dataflow.
        parallelism: the default parallelism of sources, keyed operators and unions.
        address: ``None`` reuses an initialised Ray or starts an embedded one
            (or joins ``RAY_ADDRESS`` under ``ray job submit``); ``"auto"`` or
            ``"ray://..."`` joins a cluster.
        checkpoint: take checkpoints (exactly-once through failures); ``None``
            turns them off: a failure then fails the job and commits nothing.
        restart: how often and how soon to restart after a failure (with
            checkpointing); ``RestartStrategy.default()`` by default.
        resume: start from the newest complete checkpoint of this job in
            ``checkpoint.storage`` (after the driver itself was lost); without
            one the job starts from the beginning.
        max_parallelism: the number of key groups (the most subtasks a keyed operator can have).
        batch_bytes: a channel sends once it buffers this many bytes.
        linger_s: a channel sends buffered rows at the latest after this long.
        credits: unacknowledged messages per channel.
        chaining: fuse forward-connected operators into one actor.
        actor_options: extra Ray actor options for every subtask (``num_cpus``, ...).

    Raises:
        PlanError: the dataflow cannot run (no sink, bad parallelism, a job of
            the same name is already running).
    """
    physical = plan(flow, parallelism, max_parallelism=max_parallelism, chaining=chaining)
    defaults = RuntimeOptions()
    options = RuntimeOptions(
        batch_bytes=batch_bytes or defaults.batch_bytes,
        linger_s=defaults.linger_s if linger_s is None else linger_s,
        credits=credits or defaults.credits,
        log_level=logging.getLogger("onceflow").getEffectiveLevel(),
    )
    ensure_ray(address)
    for node in flow.nodes:
        if node.kind is NodeKind.SINK:
            node.spec.prepare()
    if resume and checkpoint is None:
        msg = "resume=True needs checkpoint=CheckpointConfig(...) naming the storage to resume from"
        raise PlanError(msg)
    return JobHandle(flow, physical, options, checkpoint, restart or RestartStrategy.default(), actor_options or {},
                     resume)


def run(flow: Dataflow, *, parallelism: int = 1, address: str | None = None,
        checkpoint: CheckpointConfig | None = None, restart: RestartStrategy | None = None,
        max_parallelism: int = DEFAULT_MAX_PARALLELISM, batch_bytes: int | None = None,
        linger_s: float | None = None, credits: int | None = None, chaining: bool = True,
        actor_options: dict[str, Any] | None = None, resume: bool = False,
        timeout_s: float | None = None) -> JobResult:
    """Run a bounded ``flow`` to the end and return its result (see :func:`submit` for the arguments).

    Raises:
        JobFailedError: an operator failed (and restarts, if any, ran out); the
            message names it.
    """
    handle = submit(flow, parallelism=parallelism, address=address, checkpoint=checkpoint, restart=restart,
                    max_parallelism=max_parallelism, batch_bytes=batch_bytes, linger_s=linger_s,
                    credits=credits, chaining=chaining, actor_options=actor_options, resume=resume)
    try:
        return handle.wait(timeout_s)
    except TimeoutError:
        handle.cancel()
        raise
