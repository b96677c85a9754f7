"""The deterministic whole-job simulation: thousands of seeded schedules, replay, shrinking, hand-written holes.

``ONCEFLOW_SIM_SEED=<n> pytest tests/test_simulation.py -k schedules -s`` replays schedule ``n`` alone
and prints its trace; ``ONCEFLOW_SIM_SCHEDULES=<count>`` changes how many schedules the sweep runs.
"""

from __future__ import annotations

import collections
import os
import time

import pytest

from onceflow.checkpoint.config import CheckpointConfig
from onceflow.checkpoint.supervisor import JobEnd, JobPhase
from onceflow.runtime.restart import RestartStrategy
from tests.simulation.chooser import Chooser, shrink
from tests.simulation.invariants import check_run
from tests.simulation.scheduler import Outcome, Policy, crash, drive, run_schedule
from tests.simulation.store import ManifestWrite, TxnState
from tests.simulation.world import COUNT, SINK, SOURCE, Job, Subtask, World

SCHEDULES = int(os.environ.get("ONCEFLOW_SIM_SCHEDULES", "10000"))
PHASES = {"RESOLVING", "DEPLOYING", "RUNNING", "FINISHING", "FENCING", "WAITING", "ENDING"}
SITUATIONS = {"manifest in flight", "notify in flight", "final checkpoint", "stop requested", "bad data"}


def _report(outcome: Outcome, seed: int | None, job: Job | None = None) -> str:
    """The failure message: the problems, then the shrunk schedule's trace."""

    def fails(choices: list[int]) -> bool:
        return bool(run_schedule(choices=choices, job=job).problems)

    shrunk = shrink(outcome.choices, fails)
    replay = run_schedule(choices=shrunk, trace=True, job=job)
    trace = replay.world.trace or []
    return (f"schedule {seed} broke: {outcome.problems}\nreplay: ONCEFLOW_SIM_SEED={seed}; shrunk to "
            f"{len(shrunk)} of {len(outcome.choices)} choices: {shrunk}\nshrunk schedule: {replay.problems}\n"
            + "\n".join(trace[-200:]))


def test_schedules_keep_exactly_once() -> None:
    """Every seeded schedule ends with exact output, nothing prepared or open, no actor, fencing held."""
    replay = os.environ.get("ONCEFLOW_SIM_SEED")
    if replay is not None:
        outcome = run_schedule(int(replay), trace=True)
        print("\n".join(outcome.world.trace or []))
        print(f"ends {[e.value for e in outcome.ends]}, findings {outcome.findings}")
        assert not outcome.problems, _report(outcome, int(replay))
        return
    started, cpu_started = time.perf_counter(), time.process_time()
    ends: collections.Counter[str] = collections.Counter()
    crashes: collections.Counter[str] = collections.Counter()
    findings: dict[int, list[str]] = {}
    steps = 0
    for seed in range(SCHEDULES):
        outcome = run_schedule(seed)
        assert not outcome.problems, _report(outcome, seed)
        ends["/".join(e.value for e in outcome.ends)] += 1
        crashes.update(outcome.crashes)
        steps += outcome.steps
        if outcome.findings:
            findings[seed] = outcome.findings
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    print(f"\n{SCHEDULES} schedules in {elapsed:.1f} s ({cpu:.1f} s of CPU): {SCHEDULES / elapsed:.0f} "
          f"schedules/s ({SCHEDULES / cpu:.0f} per CPU second), "
          f"{steps / SCHEDULES:.0f} steps each; ends {dict(ends)}; crashes {dict(crashes)}; "
          f"runtime findings in {len(findings)} schedules (first: {next(iter(findings.items()), None)})")
    if SCHEDULES >= 10_000:
        assert set(crashes) >= PHASES, f"no crash in {PHASES - set(crashes)}"
        assert set(crashes) >= SITUATIONS, f"no crash with {SITUATIONS - set(crashes)}"
        assert {"finished", "failed/finished", "cancelled/finished"} <= set(ends)


def test_a_seed_replays_exactly() -> None:
    first = run_schedule(123, trace=True)
    again = run_schedule(123, trace=True)
    from_choices = run_schedule(choices=first.choices, trace=True)
    assert first.world.trace == again.world.trace == from_choices.world.trace
    assert first.choices == from_choices.choices


def test_the_simulation_finds_and_shrinks_a_completion_racing_recovery() -> None:
    """With a fence that does not wait for manifest writes in flight, the simulation breaks exactly-once."""
    racy = Job(fence_waits_for_manifests=False)
    failing = next(o for o in (run_schedule(seed, job=racy) for seed in range(500)) if o.problems)

    def fails(choices: list[int]) -> bool:
        return bool(run_schedule(choices=choices, job=racy).problems)

    shrunk = shrink(failing.choices, fails)
    assert len(shrunk) < len(failing.choices)
    replayed = run_schedule(choices=shrunk, job=racy, trace=True)
    assert replayed.problems
    assert replayed.problems == run_schedule(choices=shrunk, job=racy).problems
    assert not run_schedule(choices=shrunk).problems  # the real fence holds on the same schedule


# -- hand-written schedules -----------------------------------------------------------------------

LONG = Job(events=((0, 1, 2, 3, 0, 1, 2, 3, 0, 1), (3, 2, 1, 0, 3, 2, 1, 0, 3, 2)),
           config=CheckpointConfig(interval_s=0.2, timeout_s=5.0, retain=2),
           restart=RestartStrategy.fixed_delay(attempts=3, delay_s=0.2))
"""Long enough for several checkpoints; patient checkpoints (the chaos is scripted)."""

TICKING = Policy(chaos_steps=10**9, fail_writes=False)
"""No crash, no failing write, but time passes (so checkpoints trigger) while there is work."""


def _world(job: Job = LONG, seed: int = 7) -> World:
    return World(job, Chooser(seed), trace=True)


def _finish(world: World) -> list[str]:
    drive(world, Policy())
    return check_run(world, world.driver)


def _trace(world: World) -> str:
    return "\n".join((world.trace or [])[-120:])


def _own_transactions(write: ManifestWrite) -> set[str]:
    """The transactions the sinks pre-committed on the barrier of the checkpoint ``write`` completes."""
    return {t for task, states in write.manifest["tasks"].items() if task.startswith(f"{SINK}/")
            for t in states[SINK]["state"].get(write.checkpoint_id, [])}


def _subtask(world: World, kind: str) -> Subtask:
    return next(a for a in world.driver.actors if a.kind == kind and a.alive)


@pytest.mark.parametrize("landed", [True, False])
def test_coordinator_dies_while_the_manifest_is_written(landed: bool) -> None:
    """Checkpoint n's manifest is in flight when the coordinator dies; it lands (n) or not (n-1).

    Recovery restores the newest checkpoint that will ever complete; nothing n names is aborted if n
    completed, and its transactions are never committed if it did not.
    """
    world = _world()
    drive(world, TICKING, until=lambda w: bool(w.storage.completed_ids()))
    drive(world, Policy(chaos_steps=10**9, fail_writes=False, hold_writes=True),
          until=lambda w: bool(w.storage.in_flight))
    write = world.storage.in_flight[0]
    n = write.checkpoint_id
    previous = max(world.storage.completed_ids())
    world.storage.settle(write, landed=landed)  # settled as the process dies: the rename happened or not
    crash(world, world.coordinators()[0], collections.Counter())
    problems = _finish(world)
    assert not problems, _trace(world)
    assert world.driver.finish is not None and world.driver.finish.end is JobEnd.FINISHED
    assert world.driver.restored_from[0] == (n if landed else previous), _trace(world)
    own = _own_transactions(write)
    assert own, "checkpoint n pre-committed nothing: pick another seed"
    wanted = TxnState.COMMITTED if landed else TxnState.ABORTED
    assert all(world.store.txns[t].state is wanted for t in own), _trace(world)


def test_subtask_dies_while_the_manifest_is_written_and_recovery_waits_for_it() -> None:
    """The fence waits for checkpoint n's manifest: recovery restores n, and n's transactions commit."""
    world = _world()
    drive(world, TICKING, until=lambda w: bool(w.storage.completed_ids()))
    holding = Policy(chaos_steps=10**9, fail_writes=False, hold_writes=True)
    drive(world, holding, until=lambda w: bool(w.storage.in_flight))
    write = world.storage.in_flight[0]
    crash(world, _subtask(world, SINK), collections.Counter())
    coordinator = world.coordinators()[0]
    drive(world, holding, until=lambda w: bool(coordinator.fence_calls))
    assert world.driver.supervisor.phase is JobPhase.FENCING  # fencing waits for the write in flight
    world.settle_write(write, landed=True)
    problems = _finish(world)
    assert not problems, _trace(world)
    assert world.driver.restored_from[0] == write.checkpoint_id
    own = _own_transactions(write)
    assert own and all(world.store.txns[t].state is TxnState.COMMITTED for t in own)


@pytest.mark.parametrize("kind", [SOURCE, COUNT, SINK, "coordinator"])
def test_failure_during_deploy_is_one_failure(kind: str) -> None:
    world = _world()
    drive(world, TICKING, until=lambda w: w.driver.supervisor.phase is JobPhase.DEPLOYING
          and len(w.driver.actors) == 6)
    victim = world.coordinators()[0] if kind == "coordinator" else _subtask(world, kind)
    crash(world, victim, collections.Counter())
    problems = _finish(world)
    assert not problems, _trace(world)
    assert world.driver.finish is not None and world.driver.finish.end is JobEnd.FINISHED
    assert world.driver.supervisor.restarts == 1


@pytest.mark.parametrize("phase", [JobPhase.WAITING, JobPhase.RESOLVING, JobPhase.DEPLOYING])
def test_cancel_during_a_restart_leaves_nothing(phase: JobPhase) -> None:
    world = _world()
    drive(world, TICKING, until=lambda w: bool(w.storage.completed_ids()))
    crash(world, _subtask(world, COUNT), collections.Counter())
    drive(world, TICKING, until=lambda w: w.driver.supervisor.phase is phase and w.driver.supervisor.attempt == 2)
    world.driver.cancel()
    problems = _finish(world)
    assert not problems, _trace(world)
    assert world.driver.finish is not None and world.driver.finish.end is JobEnd.CANCELLED
    assert not world.live_actors()
    assert not world.store.in_state(TxnState.PREPARED) and not world.store.in_state(TxnState.OPEN)


def test_stop_survives_a_restart() -> None:
    world = _world()
    drive(world, TICKING, until=lambda w: bool(w.storage.completed_ids()))
    crash(world, _subtask(world, SOURCE), collections.Counter())
    drive(world, TICKING, until=lambda w: w.driver.supervisor.phase is JobPhase.WAITING)
    world.driver.stop()
    problems = _finish(world)
    assert not problems, _trace(world)
    assert world.driver.finish is not None and world.driver.finish.end is JobEnd.FINISHED
    assert world.driver.supervisor.restarts == 1
    assert "driver: StopSources(attempt=2)" in (world.trace or [])  # the new attempt was told to stop


def _expire_a_checkpoint(world: World) -> None:
    """Wait for a checkpoint that is still collecting acknowledgements, then let it time out."""
    holding = Policy(chaos_steps=10**9, fail_writes=False, hold_writes=True)
    drive(world, holding, until=lambda w: any(not p.persisting for c in w.coordinators()
                                                for p in c.core.pending.values()))
    coordinator = world.coordinators()[0]
    expiring = next(p.checkpoint_id for p in coordinator.core.pending.values() if not p.persisting)
    world.clock += 2.0
    coordinator.tick()
    assert expiring not in coordinator.core.pending


def test_an_expired_checkpoint_does_not_count_against_the_restarted_attempt() -> None:
    """One expiry is tolerated per attempt: a restart starts from a clean checkpoint failure count."""
    tolerant = Job(events=LONG.events, config=CheckpointConfig(interval_s=0.2, timeout_s=1.0, retain=2,
                                                                tolerable_failures=1),
                   restart=RestartStrategy.fixed_delay(attempts=1, delay_s=0.2))
    world = _world(tolerant)
    _expire_a_checkpoint(world)  # tolerated
    crash(world, _subtask(world, COUNT), collections.Counter())
    drive(world, TICKING, until=lambda w: w.driver.supervisor.phase is JobPhase.RUNNING
          and w.driver.supervisor.attempt == 2)
    _expire_a_checkpoint(world)  # tolerated again: the restarted attempt starts from zero failures
    problems = _finish(world)
    assert not problems, _trace(world)
    assert world.driver.finish is not None and world.driver.finish.end is JobEnd.FINISHED, _trace(world)
    assert world.driver.supervisor.restarts == 1


def test_an_expired_checkpoint_then_a_restart_that_succeeds() -> None:
    """With no failure tolerated, an expiry fails the attempt; the restarted attempt is not failed by it."""
    strict = Job(events=LONG.events, config=CheckpointConfig(interval_s=0.2, timeout_s=1.0, retain=2),
                 restart=RestartStrategy.fixed_delay(attempts=1, delay_s=0.2))
    world = _world(strict)
    _expire_a_checkpoint(world)
    problems = _finish(world)
    assert not problems, _trace(world)
    assert world.driver.finish is not None and world.driver.finish.end is JobEnd.FINISHED, _trace(world)
    assert world.driver.supervisor.restarts == 1
