"""A job's lifecycle events: one JSON line each in ``<storage>/<job>/events.jsonl``, and a log line.

The job's driver records what an operator needs to reconstruct a run:

========================  =======================================================================
event                     fields
========================  =======================================================================
``started``               ``parallelism``, ``restored_from`` (a checkpoint, or ``null``), ``startup_s``
``checkpoint_completed``  ``checkpoint_id``, ``duration_s``, ``state_bytes``, ``alignment_s``, ``unaligned``
``checkpoint_failed``     ``checkpoint_id``, ``reason`` (``expired``, ``declined``, ``task failure``, ...)
``failure``               ``attempt``, ``actor``, ``node``, ``cause``, ``retryable``, ``traceback``
``restart``               ``attempt``, ``restored_from``, ``recovery_s`` (failure seen to attempt running)
``savepoint``             ``checkpoint_id``, ``path``
``stop_requested``        ``by`` (``handle`` or ``monitor``: another process); ``after_savepoint``
``cancel_requested``      ``by``
``finished``, ``stopped``  ``events_in``, ``events_out``, ``duration_s``, ``restarts``
``failed``, ``cancelled``  ``cause``, ``restarts``, ``latest_checkpoint``
========================  =======================================================================

Every line also has ``at`` (seconds since the epoch), ``job``, ``run`` and
``event``. The lines go out through the ``onceflow.events`` logger at once and
reach storage through a background thread, so a slow or unreachable storage
never holds the job up; a failed write is logged and retried with the next
event. Without checkpoint storage, events go to the logger only.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from typing import TYPE_CHECKING, Any

from onceflow.errors import OnceflowError

if TYPE_CHECKING:
    from onceflow.checkpoint.storage import CheckpointStorage

__all__ = ["JobEvents"]

log = logging.getLogger("onceflow.events")

_CLOSE = object()


class JobEvents:
    """Records the lifecycle events of one run of a job (thread-safe)."""

    def __init__(self, job: str, run: str, storage: CheckpointStorage | None) -> None:
        """Record events of run ``run`` of ``job`` into ``storage``'s event log (none: only log them)."""
        self._job = job
        self._run = run
        self._storage = storage
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._unwritten: list[dict[str, Any]] = []
        self._thread: threading.Thread | None = None
        if storage is not None:
            self._thread = threading.Thread(target=self._write, daemon=True, name=f"onceflow-events-{job}")
            self._thread.start()

    def emit(self, event: str, at: float | None = None, **fields: Any) -> dict[str, Any]:
        """Record ``event`` with ``fields`` (JSON values); return the line.

        ``at`` is when it happened (now by default; a checkpoint outcome
        reported later passes its own time, so lines are in the order they
        were learnt, and ``at`` orders them as they happened).
        """
        line = {"at": time.time() if at is None else at, "job": self._job, "run": self._run, "event": event,
                **fields}
        line = json.loads(json.dumps(line, default=str))  # what is not JSON is written as its str()
        brief = {k: v for k, v in fields.items() if k != "traceback"}
        log.log(logging.WARNING if event in ("failure", "failed", "checkpoint_failed") else logging.INFO,
                "job %s: %s %s", self._job, event, json.dumps(brief, default=str))
        if self._thread is not None:
            self._queue.put(line)
        return line

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is left and stop the writer (waits at most ``timeout_s``)."""
        if self._thread is None:
            return
        self._queue.put(_CLOSE)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("job %s: the event log writer did not finish in %.0f s; recent events may be missing from "
                        "events.jsonl", self._job, timeout_s)

    def _write(self) -> None:
        assert self._storage is not None
        closing = False
        while not closing:
            item = self._queue.get()
            items = [item]
            while True:  # write everything that queued up in one append
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            closing = any(i is _CLOSE for i in items)
            self._unwritten.extend(i for i in items if i is not _CLOSE)
            try:
                self._storage.append_events(self._unwritten)
                self._unwritten = []
            except OnceflowError as error:
                log.warning("job %s: could not write %d event(s) to the event log (retried with the next): %s",
                            self._job, len(self._unwritten), error)
