"""What must hold after every simulated run, whatever its schedule."""

from __future__ import annotations

import collections

from onceflow.checkpoint.supervisor import JobEnd
from tests.simulation.store import TxnState
from tests.simulation.world import CHANNEL_STATE, COUNT, SINK, SOURCE, Driver, World, passes

__all__ = ["channel_state_output", "check_run", "decided_transactions", "source_offsets"]


def source_offsets(world: World, checkpoint_id: int | None) -> tuple[int, ...]:
    """How far each source had read at checkpoint ``checkpoint_id`` (nothing for ``None``)."""
    sources = len(world.job.events)
    if checkpoint_id is None:
        return (0,) * sources
    manifest = world.storage.manifest(checkpoint_id)
    assert manifest is not None, f"checkpoint {checkpoint_id} has no manifest"
    return tuple(manifest["tasks"][f"{SOURCE}/{i}"][SOURCE]["state"] for i in range(sources))


def decided_transactions(world: World, checkpoint_id: int | None) -> set[str]:
    """The sink transactions checkpoint ``checkpoint_id`` names (what it decided to commit)."""
    if checkpoint_id is None:
        return set()
    manifest = world.storage.manifest(checkpoint_id)
    assert manifest is not None, f"checkpoint {checkpoint_id} has no manifest"
    return {txn for task, states in manifest["tasks"].items() if task.startswith(f"{SINK}/")
            for c_id, txns in states[SINK]["state"].items() if c_id <= checkpoint_id for txn in txns}


def channel_state_output(world: World, checkpoint_id: int | None) -> collections.Counter[tuple[int, int]]:
    """The rows that replaying checkpoint ``checkpoint_id``'s channel state would still commit.

    An unaligned checkpoint decides its sinks' transactions *and* the messages
    that were in flight: the keys queued at a counting subtask (counted on from
    its restored counts) and the rows queued at a sink. A loop head's channel
    state (what was coming round the loop) counts every pass still to come of
    its values, on whichever counting subtask each pass lands (the keys of the
    two subtasks differ, so their counts merge).
    """
    rows: collections.Counter[tuple[int, int]] = collections.Counter()
    if checkpoint_id is None:
        return rows
    manifest = world.storage.manifest(checkpoint_id)
    assert manifest is not None, f"checkpoint {checkpoint_id} has no manifest"
    counts: dict[int, int] = {}
    values: list[int] = []
    for task, states in manifest["tasks"].items():
        recorded = states.get(CHANNEL_STATE, {}).get("state", [])
        if task.startswith(f"{COUNT}/"):
            counts.update(states[COUNT]["state"])
            values += [value for _, _, batch in recorded for value in batch]
        elif task.startswith(f"{SINK}/"):
            rows.update(tuple(row) for _, _, batch in recorded for row in batch)
    for value in values:
        for key in passes(value):
            counts[key] = counts.get(key, 0) + 1
            rows[(key, counts[key])] += 1
    return rows


def check_run(world: World, driver: Driver) -> list[str]:
    """Every invariant broken by the run ``driver`` drove; ``[]`` when it ended as it must.

    - the run ended and no simulated actor is left alive;
    - no transaction was misused (committed after an abort, written after a prepare...) and no
      acknowledgement or commit of a fenced attempt was applied;
    - the newest completed checkpoint the supervisor ended with is the newest that exists;
    - FINISHED: the committed rows are exactly the failure-free output of what the sources read
      (everything, unless the job was stopped), and nothing is left open or prepared;
    - CANCELLED: the committed rows are exactly what the newest completed checkpoint decided and
      nothing is left open or prepared;
    - FAILED: nothing is open, only the newest completed checkpoint's transactions are prepared,
      and committed plus prepared rows are exactly what it decided (with what replaying its
      channel state would commit, for an unaligned checkpoint);
    - always: no committed row is duplicated or beyond the newest completed checkpoint.
    """
    problems = list(world.violations) + list(world.store.violations) + list(driver.errors)
    if not driver.done:
        return [*problems, f"run {driver.run} did not end (phase {driver.supervisor.phase.name})"]
    live = world.live_actors()
    if live:
        problems.append(f"actors left alive after the job ended: {live}")
    finish = driver.finish
    assert finish is not None
    newest = world.storage.latest(run=driver.run)
    newest_id = newest["checkpoint_id"] if newest is not None else driver.restore
    reference = finish.latest_checkpoint
    if (finish.end is JobEnd.FINISHED and reference is not None and newest_id is not None
            and newest_id > reference):
        # The coordinator may complete a periodic checkpoint after the final one (retention may even
        # drop the final one): harmless when it decides nothing that is not committed (checked below).
        reference = newest_id
    if reference != newest_id:
        problems.append(f"the job ended with checkpoint {finish.latest_checkpoint}, but the newest completed "
                        f"one is {newest_id}")
        return problems
    store = world.store
    expected = world.job.expected(source_offsets(world, reference))
    committed = store.committed_rows()
    beyond = committed - expected
    if beyond:
        problems.append(f"committed rows that checkpoint {finish.latest_checkpoint} did not decide (duplicates "
                        f"or later rows): {sorted(beyond.elements())}")
    open_txns = store.in_state(TxnState.OPEN)
    prepared = store.in_state(TxnState.PREPARED)
    if finish.end is JobEnd.FINISHED:
        if not driver.supervisor.stop_requested and expected != world.job.expected():
            problems.append(f"the job finished at checkpoint {finish.latest_checkpoint} before reading everything")
        if committed != expected:
            problems.append(f"finished with committed {_diff(committed, expected)}")
        if open_txns or prepared:
            problems.append(f"finished with open {open_txns} and prepared {prepared} transactions")
    elif not driver.end_resolved:
        pass  # resolving the sinks at the end failed: a resume resolves what is left
    elif finish.end is JobEnd.CANCELLED:
        committed = committed + channel_state_output(world, reference)  # a resume replays what was in flight
        if committed != expected:
            problems.append(f"cancelled with committed {_diff(committed, expected)}")
        if open_txns or prepared:
            problems.append(f"cancelled with open {open_txns} and prepared {prepared} transactions")
    else:
        keep = decided_transactions(world, reference)
        if open_txns:
            problems.append(f"failed with open transactions {open_txns}")
        if not set(prepared) <= keep:
            problems.append(f"failed with prepared transactions {sorted(set(prepared) - keep)} that checkpoint "
                            f"{finish.latest_checkpoint} does not name")
        kept = collections.Counter(row for name in prepared for row in store.txns[name].rows)
        kept += channel_state_output(world, reference)
        if committed + kept != expected:
            problems.append(f"failed with committed + kept {_diff(committed + kept, expected)}")
    return problems


def _diff(got: collections.Counter[tuple[int, int]], expected: collections.Counter[tuple[int, int]]) -> str:
    return f"rows missing {sorted((expected - got).elements())}, extra {sorted((got - expected).elements())}"
