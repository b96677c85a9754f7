"""Warm worker processes: Ray workers started, with onceflow imported, before an actor needs one.

Every subtask actor is its own Ray actor, and Ray gives each new actor a
worker process. Measured on this project's 2-core machine (Ray 2.60): a new
process costs about 0.5 s of CPU to start Python and import Ray, and the
actor's first call another 0.25 s to import pyarrow, numpy and onceflow. Five
actors starting at once took 2.3 s; after a restart, the one replaced actor
took 0.75 s of the 0.85 s the recovery took.

Ray keeps idle worker processes that a new actor can take at once, but only
the ones its node started for a driver's first job (as many as the node has
CPUs); it never starts more on its own. Two pieces of Ray make more:

- **Preloading.** Ray's ``preload_python_modules`` system setting makes every
  worker process import the listed modules when it starts. An embedded Ray
  that onceflow starts sets it to :data:`PRELOAD_MODULES`; a cluster started
  with ``ray start`` takes it from the environment
  (``RAY_preload_python_modules=onceflow.runtime.subtask_actor``, names
  separated by commas, set for ``ray start`` on every node).
- **Prestarting.** A node's raylet starts idle workers for a Ray job when asked
  (its ``PrestartWorkers`` call, which Ray 2.60 does not expose in Python;
  this module makes it over the raylet's gRPC port, as Ray's own clients do).
  A prestarted worker belongs to this driver's Ray job and runtime
  environment, stays idle for ``keep_alive_s`` unless an actor takes it, and
  dies with the driver. A raylet starts at most a few workers at once (as
  many as its machine has cores), so :class:`WarmWorkers` asks in rounds,
  counting the node's idle workers (its ``GetNodeStats`` call) in between.

A job keeps :attr:`~onceflow.runtime.options.JobOptions.spare_workers` warm
processes on each node it runs on, so a replaced subtask starts in one (from
:data:`SPARE_AFTER_S` after each deployment: starting a process takes a CPU
core for most of a second, which a short job would lose from its work);
:func:`prestart` warms a number of them for the jobs to come. Both are
optimisations only: when a raylet cannot be reached or answers otherwise
than expected (another Ray version), nothing is prestarted and actors start
in new processes, as before (logged once per driver).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import ray

if TYPE_CHECKING:
    from collections.abc import Collection, Mapping

__all__ = ["PRELOAD_MODULES", "SPARE_AFTER_S", "WARM_WORKERS", "WarmWorkers", "embedded_system_config",
           "idle_workers", "prestart"]

log = logging.getLogger("onceflow")

PRELOAD_MODULES = ("onceflow.runtime.subtask_actor",)
"""What every worker of an embedded Ray imports when it starts: the subtask and coordinator actors' code."""

KEEP_ALIVE_S = 300.0
"""How long a prestarted worker waits for an actor before the raylet may stop it."""

SPARE_AFTER_S = 5.0
"""How long after a deployment a job starts its spare workers. Measured on 2 cores, a spare started at once
cut a 2 M-event job from 2.8 to 1.8 M events/s (an ad-hoc A/B, 5 runs each); a job that runs for less needs no spare."""

_ROUND_S = 0.1
"""How often a round of prestarting looks at the node's idle workers."""

_REFRESH_S = 30.0
"""How often the warm workers a running job asked for are counted and topped up."""

_NIL_JOB = bytes.fromhex("ffffffff")


def embedded_system_config() -> dict[str, Any]:
    """Ray system settings for an embedded Ray that onceflow starts: its workers preload :data:`PRELOAD_MODULES`."""
    return {"preload_python_modules": list(PRELOAD_MODULES)}


class _Raylet:
    """The two raylet calls this module makes on one node."""

    def __init__(self, address: str) -> None:
        from ray._private.grpc_utils import init_grpc_channel
        from ray.core.generated import node_manager_pb2_grpc

        self.host = address.rsplit(":", 1)[0]
        self._cpu: dict[int, int] = {}  # pid -> CPU ticks used, when last looked at
        self._channel = init_grpc_channel(address)
        self._stub = node_manager_pb2_grpc.NodeManagerServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def idle(self, job_id: bytes, local: bool) -> tuple[list[int], list[int]]:
        """Idle workers here that an actor of job ``job_id`` can take: (registered, ready) process ids.

        Such a worker never ran anything, holds no actor, and belongs to this
        job or to none. On this driver's machine (``local``), a registered
        worker is ready once its process stopped using CPU since the last
        look (its start-up and the preloaded imports are done): an actor
        given it earlier waits for the imports (measured: 1.4 s to start a
        job instead of 0.5 s). Elsewhere, registering is all it can show.
        """
        pids = self.idle_pids(job_id)
        if not local:
            return pids, pids
        cpu = {pid: _cpu_ticks(pid) for pid in pids}
        ready = [pid for pid, ticks in cpu.items() if pid in self._cpu and ticks - self._cpu[pid] <= 1]
        self._cpu = cpu
        return pids, ready

    def idle_pids(self, job_id: bytes) -> list[int]:
        """The process ids of the idle workers here that an actor of job ``job_id`` can take."""
        from ray.core.generated import node_manager_pb2

        # Generated protobuf classes: built at import time, so no type stubs know them.
        request = node_manager_pb2.GetNodeStatsRequest(include_memory_info=False)  # type: ignore[attr-defined]
        reply = self._stub.GetNodeStats(request, timeout=5)
        # A worker of no job yet (one of those the raylet started with itself) has no runtime environment.
        jobs = (job_id, _NIL_JOB) if _job_runtime_env().serialized_runtime_env in ("", "{}") else (job_id,)
        return [w.pid for w in reply.core_workers_stats
                if w.worker_type == 0 and w.num_executed_tasks == 0 and not _has_actor(w.actor_id)
                and w.job_id in jobs and w.pid > 0]

    def prestart(self, job_id: bytes, count: int, keep_alive_s: float) -> None:
        from ray.core.generated import common_pb2, node_manager_pb2

        request = node_manager_pb2.PrestartWorkersRequest(  # type: ignore[attr-defined]
            language=common_pb2.Language.PYTHON, job_id=job_id,  # type: ignore[attr-defined]
            keep_alive_duration_secs=max(1, int(keep_alive_s)), num_workers=count)
        # The job's runtime environment (``ray job submit --working-dir``, ``ray.init(runtime_env=...)``): an
        # actor created without one of its own inherits it, and takes only a worker started with the same one.
        request.runtime_env_info.CopyFrom(_job_runtime_env())
        self._stub.PrestartWorkers(request, timeout=5)


def _job_runtime_env() -> Any:
    """The runtime environment of this driver's Ray job (a ``RuntimeEnvInfo`` message)."""
    worker: Any = ray._private.worker.global_worker  # its core_worker is set on connecting, untyped
    return worker.core_worker.get_job_config().runtime_env_info


def _cpu_ticks(pid: int) -> int:
    """The CPU time process ``pid`` of this machine used so far, in clock ticks (0 where unknown)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime, stime
    except (OSError, IndexError, ValueError):  # gone, or not Linux: nothing to wait for
        return 0


def _has_actor(actor_id: bytes) -> bool:
    return any(b != 0xFF for b in actor_id)  # the nil id is all ones (or empty)


class WarmWorkers:
    """The warm workers of this driver on each node: counted, and topped up to what jobs asked for.

    One per driver process (:data:`WARM_WORKERS`). :meth:`keep` records a job's
    wish (node id -> warm workers), which a background thread carries out from
    ``after_s`` later, then every 30 s while the job runs; :meth:`release`
    forgets it. :meth:`ensure` tops up and waits, for :func:`prestart`.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wishes: dict[str, tuple[float, dict[str, int]]] = {}  # owner -> (from when, node -> count)
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned = False

    # -- jobs' wishes -------------------------------------------------------------------

    def keep(self, owner: str, per_node: Mapping[str, int], after_s: float = 0.0) -> None:
        """Keep ``per_node[node]`` warm workers on each node while ``owner`` runs, from ``after_s`` on."""
        with self._lock:
            self._wishes[owner] = (time.monotonic() + after_s, {n: c for n, c in per_node.items() if n and c > 0})
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="onceflow-warm-workers", daemon=True)
                self._thread.start()
        self._wake.set()

    def release(self, owner: str) -> None:
        """Forget ``owner``'s wish; the warm workers it left stay until their keep-alive ends."""
        with self._lock:
            self._wishes.pop(owner, None)

    def _wanted(self) -> tuple[dict[str, int], float]:
        """The wishes in force now, merged (the most any asks for, per node), and how long until the next one is."""
        now = time.monotonic()
        wanted: dict[str, int] = {}
        wait_s = _REFRESH_S
        with self._lock:
            for since, wish in self._wishes.values():
                if since > now:
                    wait_s = min(wait_s, since - now)
                    continue
                for node, count in wish.items():
                    wanted[node] = max(wanted.get(node, 0), count)
        return wanted, wait_s

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._wishes or not ray.is_initialized():
                    self._wishes.clear()
                    self._thread = None
                    return
            wanted, wait_s = self._wanted()
            if wanted:
                self.ensure(wanted, KEEP_ALIVE_S, timeout_s=10.0)
                wait_s = min(wait_s, self._wanted()[1])
            self._wake.wait(wait_s)
            self._wake.clear()

    # -- topping up ---------------------------------------------------------------------

    def ensure(self, per_node: Mapping[str, int], keep_alive_s: float, timeout_s: float) -> dict[str, int]:
        """Prestart workers until each node has ``per_node[node]`` idle ones or ``timeout_s`` passed; count them."""
        try:
            return self._ensure(per_node, keep_alive_s, timeout_s)
        except Exception as error:  # noqa: BLE001 - an optimisation: never fail a job for it
            if not self._warned:
                log.info("onceflow could not prestart Ray worker processes (%s: %s); actors start in new "
                         "processes", type(error).__name__, error)
            self._warned = True
            return {}

    def _ensure(self, per_node: Mapping[str, int], keep_alive_s: float, timeout_s: float) -> dict[str, int]:
        job_id = bytes.fromhex(ray.get_runtime_context().get_job_id())
        here = ray.util.get_node_ip_address()
        raylets = _raylets(per_node)
        deadline = time.monotonic() + timeout_s
        asked: dict[str, tuple[int, float]] = {}  # node -> (registered when last asked, when)
        try:
            while True:
                counts = {node: tuple(map(len, raylet.idle(job_id, raylet.host == here)))
                          for node, raylet in raylets.items()}
                if all(ready >= per_node[n] for n, (_, ready) in counts.items()) or time.monotonic() > deadline:
                    return {node: ready for node, (_, ready) in counts.items()}
                for node, (registered, _) in counts.items():
                    before, when = asked.get(node, (-1, 0.0))
                    # Ask again once a worker of the last request registered, or after 2 s: a raylet starts
                    # only so many at once (as many as its machine has cores) and drops the rest of a request.
                    if registered < per_node[node] and (registered > before or time.monotonic() - when > 2.0):
                        raylets[node].prestart(job_id, per_node[node] - registered, keep_alive_s)
                        asked[node] = (registered, time.monotonic())
                time.sleep(_ROUND_S)
        finally:
            for raylet in raylets.values():
                raylet.close()


WARM_WORKERS = WarmWorkers()
"""This driver's warm workers (jobs ask through their executor; :func:`prestart` directly)."""


def _raylets(nodes: Collection[str]) -> dict[str, _Raylet]:
    return {info["NodeID"]: _Raylet(f"{info['NodeManagerAddress']}:{info['NodeManagerPort']}")
            for info in ray.nodes() if info.get("Alive") and info["NodeID"] in nodes}


def idle_workers(node: str | None = None, *, ready: bool = False) -> list[int]:
    """The process ids of the idle workers on ``node`` (default: this driver's) that this driver's actors can take.

    With ``ready``, only those done starting (see :meth:`_Raylet.idle`; it looks twice, 0.1 s apart).
    """
    node = node or ray.get_runtime_context().get_node_id()
    raylet = _raylets([node])[node]
    job_id = bytes.fromhex(ray.get_runtime_context().get_job_id())
    local = raylet.host == ray.util.get_node_ip_address()
    try:
        if not ready:
            return raylet.idle_pids(job_id)
        raylet.idle(job_id, local)
        time.sleep(_ROUND_S)
        return raylet.idle(job_id, local)[1]
    finally:
        raylet.close()


def prestart(workers_per_node: int, *, keep_alive_s: float = KEEP_ALIVE_S, timeout_s: float = 30.0,
             address: str | None = None) -> dict[str, int]:
    """Start idle Ray worker processes for the jobs this driver will run, so they start without waiting for any.

    A job's actors take these processes instead of starting new ones (with
    preloading, see :mod:`onceflow.runtime.warm`, onceflow is imported in them
    already): measured on 2 cores, a parallelism-2 job then starts in about
    0.44-0.51 s instead of 2.4 s (``benchmarks/startup.py``). Call it ahead of time, e.g. when a service that
    submits jobs starts.

    Args:
        workers_per_node: idle workers to have on every alive node (a job's
            subtask actors and its coordinator each take one).
        keep_alive_s: how long an unused prestarted worker stays.
        timeout_s: how long to wait for them to start.
        address: the Ray to use, as for :func:`onceflow.run`.

    Returns:
        Node id -> idle workers there when this returned (empty when the
        raylets could not be asked: actors then start new processes).

    """
    from onceflow.runtime.ray_env import ensure_ray

    ensure_ray(address)
    nodes = {n["NodeID"]: workers_per_node for n in ray.nodes() if n.get("Alive")}
    return WARM_WORKERS.ensure(nodes, keep_alive_s, timeout_s)
