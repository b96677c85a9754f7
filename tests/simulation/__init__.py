"""A deterministic whole-job simulation of onceflow's exactly-once protocol (no Ray, one thread).

:mod:`tests.simulation.world` holds the simulated job, actors, coordinator
and driver around the real sans-IO supervisor, coordinator and barrier
handler; :mod:`tests.simulation.scheduler` picks every interleaving and crash
from one seed; :mod:`tests.simulation.invariants` says what must hold after
each run; :mod:`tests.simulation.chooser` records, replays and shrinks choices.
"""
