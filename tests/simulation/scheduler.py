"""The scheduler: from one seed (or choice list), every interleaving and every crash of a schedule.

At each step the scheduler lists what could happen next (deliver the oldest
message of some caller-to-actor queue, let a source read, let the driver take
a step, let time pass, complete or fail a manifest write, let a sent kill
land, crash any live actor, the user's stop or cancel) and lets the
:class:`~tests.simulation.chooser.Chooser` pick one. A schedule has a chaotic
part (crashes, failing writes, the user's requests) and then runs calmly to
its end. A run that ends FAILED or CANCELLED is followed, in the same world,
by a calm ``resume=True`` run that must finish with the exact output.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

from onceflow.checkpoint.config import CheckpointConfig
from onceflow.checkpoint.supervisor import JobEnd
from onceflow.runtime.restart import RestartStrategy
from tests.simulation.chooser import Chooser
from tests.simulation.invariants import check_run
from tests.simulation.world import LOOP_EVENTS, SOURCE, Job, SimActor, Subtask, World

__all__ = ["Outcome", "Policy", "draw_job", "drive", "run_schedule", "step"]

MAX_STEPS = 4000
MODES = ("aligned", "unaligned", "timeout")
SITUATIONS = ("any", "RUNNING", "DEPLOYING", "RESOLVING", "FENCING", "WAITING", "FINISHING", "ENDING",
              "FINISHED", "manifest in flight", "notify in flight", "final checkpoint")
LOOP_SITUATIONS = ("loop recording", "termination round")
"""The moments of a loop job: a loop head records what comes round; the driver's loop round is in flight."""


def _loop_recording(world: World, *, aligned: bool = False) -> bool:
    """A loop head took its snapshot and waits for what comes round until its barrier does (``aligned``: the
    snapshot of an aligned barrier, not an unaligned one's)."""
    return any(isinstance(a, Subtask) and a.loop and a.alive and a.pending_ack is not None
               and (a.recording_aligned or not aligned) for a in world.driver.actors)


def _termination_round(world: World) -> bool:
    loop = world.driver.loop
    return loop is not None and loop.in_flight()


def _holds(world: World, situation: str) -> bool:
    driver = world.driver
    if situation == "any":
        return True
    if situation == "manifest in flight":
        return bool(world.storage.in_flight)
    if situation == "notify in flight":
        return any(q[0].method == "notify" for q in world.queues.values())
    if situation == "final checkpoint":
        return any(w.kind == "final" for w in driver.waits)
    if situation == "loop recording":
        return _loop_recording(world)
    if situation == "termination round":
        return _termination_round(world)
    return driver.supervisor.phase.name == situation


@dataclass(slots=True)
class Policy:
    """What the scheduler may do in the chaotic part of a run.

    Attributes:
        crashes: the crashes still to come, in order: each the earliest step and the situation (a
            supervisor phase's name, ``manifest in flight``, ``notify in flight``, ``final checkpoint``
            or ``any``) at which a random live actor crashes.
        chaos_steps: steps of chaos; calm after them (no crash, failed write, stop or cancel).
        stop_at: the step at which the user stops the job, or ``None``.
        cancel_at: the step at which the user cancels the job, or ``None``.
        hold_writes: never complete a manifest write (a script completes it).
        fail_writes: in the chaotic part, a manifest write fails one time in four.
    """

    crashes: list[tuple[int, str]] = field(default_factory=list)
    chaos_steps: int = 0
    stop_at: int | None = None
    cancel_at: int | None = None
    hold_writes: bool = False
    fail_writes: bool = True


@dataclass(slots=True)
class Outcome:
    """What one schedule did and broke.

    Attributes:
        world: the world after the schedule (for inspection and the trace).
        ends: how each run ended (the first, then the resume if there was one).
        problems: every invariant broken, ``[]`` when none.
        findings: failures of the modelled Ray side that break no invariant of the output (reported, not
            fixed here: the job handle's own bugs).
        crashes: per supervisor phase (and situation, such as ``manifest in flight``), the crashes.
        steps: the steps taken.
        choices: the choices made (replaying them gives the same schedule).
    """

    world: World
    ends: list[JobEnd] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)
    crashes: collections.Counter[str] = field(default_factory=collections.Counter)
    steps: int = 0
    choices: list[int] = field(default_factory=list)


def draw_job(chooser: Chooser, *, loop: bool = False, modes: tuple[str, ...] = MODES) -> Job:
    """The job of a schedule: checkpoint and restart settings drawn from ``chooser`` (``loop``: the cyclic job).

    ``modes``: the barrier modes to draw from (all three by default).
    """
    config = CheckpointConfig(interval_s=0.3, timeout_s=(2.0, 0.5)[chooser.choose(2)],
                              max_concurrent=1 + chooser.choose(2), retain=2,
                              tolerable_failures=(1, 0)[chooser.choose(2)])
    attempts = (3, 2, 1, 0)[chooser.choose(4)]
    restart = (RestartStrategy.fixed_delay(attempts=attempts, delay_s=(0.2, 0.0)[chooser.choose(2)]) if attempts
               else RestartStrategy.no_restart())
    mode = modes[chooser.choose(3) % len(modes)]
    if loop:
        return Job(events=LOOP_EVENTS, config=config, restart=restart, mode=mode, loop=True)
    return Job(config=config, restart=restart, mode=mode)


def step(world: World, policy: Policy, number: int, crashes: collections.Counter[str]) -> bool:
    """Take one step of the schedule; ``False`` when nothing can happen any more."""
    chooser = world.chooser
    driver = world.driver
    chaos = number < policy.chaos_steps
    if number == policy.stop_at:
        world.log("USER: stop")
        driver.stop()
        return True
    if number == policy.cancel_at:
        world.log("USER: cancel")
        driver.cancel()
        return True
    sources = [a for a in driver.actors if a.kind == SOURCE and a.alive and a.running and not a.ended]
    landing = world.doomed
    writes = [] if policy.hold_writes else world.storage.in_flight
    if chaos and policy.crashes and number >= policy.crashes[0][0] and _holds(world, policy.crashes[0][1]):
        live = world.live_actors()
        if live:
            policy.crashes.pop(0)
            victim = live[chooser.choose(len(live))]
            if isinstance(victim, Subtask) and chooser.chance(5):
                crashes["bad data"] += 1
                world.log(f"BAD DATA in {victim} ({driver.supervisor.phase.name})")
                victim.broken = True
            else:
                crash(world, victim, crashes)
            return True
    # Weights in a fixed order: a choice of 0 picks the first enabled, calmest move.
    w_deliver = 8 if world.queues else 0
    w_driver = 8 if driver.ready() else 0
    w_source = 3 if sources else 0
    w_land = 3 if landing else 0
    w_write = (1 if chaos else 3) if writes else 0
    enabled = w_deliver + w_driver + w_source + w_land + w_write
    w_tick = 1 if not driver.done and (chaos or not enabled) else 0
    total = enabled + w_tick
    if not total:
        return False
    pick = chooser.choose(total)
    if pick < w_deliver:
        world.deliver(list(world.queues)[chooser.choose(len(world.queues))])
        return True
    pick -= w_deliver
    if pick < w_driver:
        driver.step()
        return True
    pick -= w_driver
    if pick < w_source:
        source = sources[chooser.choose(len(sources))]
        if world.trace is not None:
            world.log(f"read {source} at {source.offset}")
        source.source_step()
        return True
    pick -= w_source
    if pick < w_land:
        actor = landing[chooser.choose(len(landing))]
        if world.trace is not None:
            world.log(f"kill lands on {actor}")
        actor.die()
        return True
    pick -= w_land
    if pick < w_write:
        write = writes[chooser.choose(len(writes))]
        world.settle_write(write, landed=not (chaos and policy.fail_writes and chooser.chance(4)))
        return True
    world.clock = round(world.clock + (0.1, 0.3)[chooser.choose(2)], 6)
    if world.trace is not None:
        world.log(f"tick: {world.clock:.1f} s")
    for coordinator in world.coordinators():
        coordinator.tick()
    for actor in world.driver.actors:
        if isinstance(actor, Subtask) and actor.alive and actor.connected:
            actor.on_tick()
    return True


def crash(world: World, victim: SimActor, crashes: collections.Counter[str]) -> None:
    """Crash ``victim`` now, counting the moment by supervisor phase and situation."""
    driver = world.driver
    crashes[driver.supervisor.phase.name] += 1
    if world.storage.in_flight:
        crashes["manifest in flight"] += 1
    if any(m.method == "notify" for q in world.queues.values() for m in q):
        crashes["notify in flight"] += 1
    if any(w.kind == "final" for w in driver.waits):
        crashes["final checkpoint"] += 1
    if driver.supervisor.stop_requested:
        crashes["stop requested"] += 1
    if any(type(r).__name__ == "CancelRequested" for r in driver.requests):
        crashes["cancel requested"] += 1
    if _loop_recording(world):
        crashes["loop recording"] += 1
    if _loop_recording(world, aligned=True):
        crashes["loop recording (aligned)"] += 1
    if _termination_round(world):
        crashes["termination round"] += 1
    world.log(f"CRASH {victim} ({driver.supervisor.phase.name})")
    victim.die()


def drive(world: World, policy: Policy, until: Callable[[World], bool] | None = None,
          crashes: collections.Counter[str] | None = None, max_steps: int = MAX_STEPS) -> int:
    """Take steps until the run ends (or ``until`` holds); return the steps taken."""
    counter = crashes if crashes is not None else collections.Counter()
    for number in range(max_steps):
        if world.driver.done or (until is not None and until(world)):
            return number
        if not step(world, policy, number, counter):
            return number
    return max_steps


def run_schedule(seed: int | None = None, choices: list[int] | None = None, *, trace: bool = False,
                 job: Job | None = None, loop: bool = False, modes: tuple[str, ...] = MODES) -> Outcome:
    """Run one whole schedule (and its resume) and check every invariant.

    Args:
        seed: draw every choice from this seed.
        choices: or replay this choice list.
        trace: keep a readable trace in ``outcome.world.trace``.
        job: the job (drawn from the choices when ``None``).
        loop: draw the loop job (when ``job`` is ``None``); its crashes also land at its own moments.
        modes: the barrier modes the job is drawn with.
    """
    chooser = Chooser(seed, choices)
    job = job or draw_job(chooser, loop=loop, modes=modes)
    situations = SITUATIONS + LOOP_SITUATIONS if job.loop else SITUATIONS
    chaos_steps = chooser.choose(300)
    crash_plan = sorted((chooser.choose(chaos_steps + 1), situations[chooser.choose(len(situations))])
                        for _ in range(chooser.choose(4)))
    policy = Policy(crashes=crash_plan, chaos_steps=chaos_steps,
                    stop_at=chooser.choose(chaos_steps + 1) if chooser.chance(5) else None,
                    cancel_at=chooser.choose(chaos_steps + 1) if chooser.chance(8) else None)
    world = World(job, chooser, trace=trace)
    world.log(f"job: {job.config}, {job.restart}; {policy}")
    outcome = Outcome(world)
    outcome.steps = drive(world, policy, crashes=outcome.crashes)
    first = world.driver
    outcome.problems = check_run(world, first)
    outcome.findings += first.findings
    if first.finish is not None:
        outcome.ends.append(first.finish.end)
    if not outcome.problems and first.finish is not None and first.finish.end is not JobEnd.FINISHED:
        world.log("RESUME (resume=True)")
        resumed = world.new_run(resume=True)
        outcome.steps += drive(world, dataclasses.replace(policy, crashes=[], chaos_steps=0, stop_at=None,
                                                          cancel_at=None))
        problems = check_run(world, resumed)
        outcome.findings += resumed.findings
        if resumed.finish is not None:
            outcome.ends.append(resumed.finish.end)
            if resumed.finish.end is not JobEnd.FINISHED:
                problems.append(f"the resumed run ended {resumed.finish.end.value}")
        outcome.problems += [f"resume: {p}" for p in problems]
    outcome.choices = chooser.made
    return outcome
