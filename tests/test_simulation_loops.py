"""The deterministic simulation of a job with a loop: seeded schedules, a loop head's channel state, its end.

The loop job (``Job(loop=True)``, see :mod:`tests.simulation.world`) closes a
cycle through the counting operator, which is the loop head (the real
:class:`~onceflow.runtime.input_gate.InputGate` with two feedback channels)
and the loop body; the driver ends the loop with the real
:class:`~onceflow.runtime.loops.LoopTermination`.

``ONCEFLOW_SIM_LOOP_SEED=<n> pytest tests/test_simulation_loops.py -k schedules -s`` replays schedule ``n``
alone and prints its trace; ``ONCEFLOW_SIM_LOOP_SCHEDULES=<count>`` changes how many schedules the sweep runs
and ``ONCEFLOW_SIM_LOOP_MODES=aligned,unaligned,timeout`` its barrier modes.

The sweep found two runtime bugs, now fixed: a barrier that came round the loop before the other head
subtask aligned its input for it was dropped, so that checkpoint never completed (see
:func:`test_a_barrier_that_comes_round_before_the_head_aligned_is_kept`); and a restored subtask replaying its
channel state could push to a peer not wired yet, whose output went nowhere (schedule 2377 in ``timeout``
mode, :func:`test_a_push_before_the_receiver_is_wired_waits_for_it`).
"""

from __future__ import annotations

import collections
import os
import time

from onceflow.checkpoint.config import CheckpointConfig
from onceflow.checkpoint.supervisor import JobEnd
from onceflow.runtime.restart import RestartStrategy
from tests.simulation.chooser import Chooser, shrink
from tests.simulation.invariants import check_run
from tests.simulation.scheduler import Outcome, Policy, drive, run_schedule
from tests.simulation.world import COUNT, LOOP_EVENTS, SOURCE, Job, Subtask, World

SCHEDULES = int(os.environ.get("ONCEFLOW_SIM_LOOP_SCHEDULES", "2000"))
MODES = tuple(os.environ.get("ONCEFLOW_SIM_LOOP_MODES", "aligned,unaligned,timeout").split(","))
LOOP_CRASHES = {"loop recording", "termination round"}

PATIENT = Job(events=LOOP_EVENTS, loop=True, config=CheckpointConfig(interval_s=0.2, timeout_s=1000.0, retain=2),
              restart=RestartStrategy.fixed_delay(attempts=3, delay_s=0.2))
"""The loop job with aligned barriers and checkpoints that never time out (the chaos is scripted)."""

TICKING = Policy(chaos_steps=10**9, fail_writes=False)
"""No crash, no failing write, but time passes (so checkpoints trigger) while there is work."""


def _report(outcome: Outcome, seed: int | None, modes: tuple[str, ...]) -> str:
    """The failure message: the problems, then the shrunk schedule's trace."""

    def fails(choices: list[int]) -> bool:
        return bool(run_schedule(choices=choices, loop=True, modes=modes).problems)

    shrunk = shrink(outcome.choices, fails, budget=200)
    replay = run_schedule(choices=shrunk, trace=True, loop=True, modes=modes)
    trace = replay.world.trace or []
    return (f"loop schedule {seed} ({outcome.world.job.mode}) broke: {outcome.problems}\nreplay: "
            f"ONCEFLOW_SIM_LOOP_SEED={seed} ONCEFLOW_SIM_LOOP_MODES={','.join(modes)}; shrunk to {len(shrunk)} of "
            f"{len(outcome.choices)} choices: {shrunk}\nshrunk schedule: {replay.problems}\n" + "\n".join(trace[-200:]))


def test_loop_schedules_keep_exactly_once() -> None:
    """Every seeded loop schedule ends with exact output, nothing prepared or open, no actor, no row after the end.

    A schedule that does not end within the scheduler's step limit fails too (``check_run``: the run did not
    end): a loop must never deadlock.
    """
    replay = os.environ.get("ONCEFLOW_SIM_LOOP_SEED")
    if replay is not None:
        outcome = run_schedule(int(replay), trace=True, loop=True, modes=MODES)
        print("\n".join(outcome.world.trace or []))
        print(f"ends {[e.value for e in outcome.ends]}, stats {dict(outcome.world.stats)}")
        assert not outcome.problems, _report(outcome, int(replay), MODES)
        return
    started, cpu_started = time.perf_counter(), time.process_time()
    ends: collections.Counter[str] = collections.Counter()
    crashes: collections.Counter[str] = collections.Counter()
    stats: collections.Counter[str] = collections.Counter()
    replayed_and_finished = 0
    steps = 0
    for seed in range(SCHEDULES):
        outcome = run_schedule(seed, loop=True, modes=MODES)
        assert not outcome.problems, _report(outcome, seed, MODES)
        ends["/".join(e.value for e in outcome.ends)] += 1
        crashes.update(outcome.crashes)
        stats.update(outcome.world.stats)
        steps += outcome.steps
        if outcome.world.stats["loop channel state replayed"] and outcome.ends[-1] is JobEnd.FINISHED:
            replayed_and_finished += 1
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    print(f"\n{SCHEDULES} loop schedules ({', '.join(MODES)}) in {elapsed:.1f} s ({cpu:.1f} s of CPU): "
          f"{SCHEDULES / elapsed:.0f} schedules/s, {steps / SCHEDULES:.0f} steps each; ends {dict(ends)}; "
          f"crashes {dict(crashes)}; {dict(stats)}; {replayed_and_finished} finished after replaying what was "
          f"coming round the loop")
    if SCHEDULES >= 1000:
        assert set(crashes) >= LOOP_CRASHES, f"no crash with {LOOP_CRASHES - set(crashes)}"
        assert stats["loops ended"] >= SCHEDULES // 2
        assert stats["loop channel state recorded"], "no loop head ever recorded rows coming round"
        assert replayed_and_finished, "no run restored a loop head with rows coming round and finished exactly"
        assert {"finished", "failed/finished", "cancelled/finished"} <= set(ends)
        if "aligned" in MODES:
            assert crashes["loop recording (aligned)"], "no crash while a head recorded after an aligned barrier"


def test_loop_schedules_with_aligned_barriers() -> None:
    """The sweep with aligned barriers (and aligned ones that time out): strict, so a fix shows up here."""
    for seed in range(300):
        outcome = run_schedule(seed, loop=True, modes=("aligned", "timeout"))
        assert not outcome.problems, (f"loop schedule {seed} ({outcome.world.job.mode}) broke: {outcome.problems} "
                                      f"(ONCEFLOW_SIM_LOOP_SEED={seed} ONCEFLOW_SIM_LOOP_MODES=aligned,timeout)")


def test_a_loop_seed_replays_exactly() -> None:
    first = run_schedule(321, trace=True, loop=True)
    again = run_schedule(321, trace=True, loop=True)
    from_choices = run_schedule(choices=first.choices, trace=True, loop=True)
    assert first.world.trace == again.world.trace == from_choices.world.trace
    assert first.choices == from_choices.choices


# -- hand-written schedules -----------------------------------------------------------------------


def _trace(world: World) -> str:
    return "\n".join((world.trace or [])[-150:])


def _heads(world: World) -> list[Subtask]:
    return [a for a in world.driver.actors if a.kind == COUNT]


def test_a_calm_loop_run_commits_every_pass() -> None:
    """No failure: every key is counted once per pass round the loop, and rows do cross between the heads."""
    job = Job(events=LOOP_EVENTS, loop=True, mode="unaligned", config=PATIENT.config, restart=PATIENT.restart)
    world = World(job, Chooser(3), trace=True)
    drive(world, TICKING)
    assert not check_run(world, world.driver), _trace(world)
    assert world.driver.finish is not None and world.driver.finish.end is JobEnd.FINISHED
    assert world.store.committed_rows() == job.expected()
    assert sum(job.expected().values()) > sum(len(v) for v in LOOP_EVENTS)  # rows came round
    # Rows went round the loop both ways between the heads, and from count/0 to itself (outputs: sink, count/0,
    # count/1; every output also carried its end).
    first, second = _heads(world)
    assert first.sent[1] > 1 and first.sent[2] > 1 and second.sent[1] > 1, [h.sent for h in _heads(world)]
    assert world.stats["loops ended"] == 1


def _checkpoint_progress(job: Job, seed: int, steps: int) -> World:
    world = World(job, Chooser(seed), trace=True)
    drive(world, TICKING, max_steps=steps)
    return world


def test_aligned_barriers_deadlock_when_the_feedback_channels_are_not_declared() -> None:
    """A head that aligns over its feedback channels too waits for barriers that only it can send round.

    Its input from the sources stays blocked behind the first barrier, so no checkpoint completes and the job
    never ends; the same schedule with the feedback channels declared completes checkpoints.
    """
    seed, budget = 1, 3000
    declared = _checkpoint_progress(PATIENT, seed, budget)
    assert len(declared.storage.completed_ids()) >= 2, _trace(declared)
    assert all(len(head.acked) >= 2 for head in _heads(declared))

    undeclared = _checkpoint_progress(Job(events=PATIENT.events, loop=True, feedback=False, config=PATIENT.config,
                                          restart=PATIENT.restart), seed, budget)
    assert not undeclared.storage.completed_ids(), _trace(undeclared)
    assert not any(head.acked for head in _heads(undeclared)), _trace(undeclared)
    sources = [a for a in undeclared.driver.actors if a.kind == SOURCE]
    assert all(1 in s.acked for s in sources), "checkpoint 1 was never triggered"
    assert not undeclared.driver.done
    assert undeclared.driver.supervisor.phase.name == "RUNNING"


def test_a_barrier_that_comes_round_before_the_head_aligned_is_kept() -> None:
    """count/0 aligns first and sends the barrier round to count/1, which is still waiting for a source's.

    That barrier is Chandy-Lamport's first marker for count/1: it snapshots at once (before what follows the
    barrier on that channel, or those rows would be in its state and replayed by count/0 as well), records its
    other channels, and acknowledges.
    """
    world = World(PATIENT, Chooser(0), trace=True)
    drive(world, TICKING, until=lambda w: any(h.early_barriers for h in _heads(w)))
    head = next(h for h in _heads(world) if h.early_barriers)
    checkpoint_id = head.early_barriers[0]
    drive(world, TICKING, until=lambda w: checkpoint_id in w.storage.completed_ids(), max_steps=3000)
    assert checkpoint_id in head.acked, _trace(world)
    assert checkpoint_id in world.storage.completed_ids()


def test_a_push_before_the_receiver_is_wired_waits_for_it() -> None:
    """Schedule 2377 (timeout mode): a restored head replays its channel state before its peer is wired.

    Its rows reach the peer, whose output gates do not exist yet; processing them then would send the
    output nowhere (rows (3, 1) and (3, 2) were lost). The push waits for the peer's connect() instead.
    """
    outcome = run_schedule(2377, loop=True, modes=("timeout",), trace=True)
    assert not outcome.problems, "\n".join((outcome.world.trace or [])[-150:])
    assert outcome.world.stats["sent before connected"] == 0
