"""Logging set-up of the processes a job runs in (subtask and coordinator actors)."""

from __future__ import annotations

import logging

__all__ = ["configure_logging"]


def configure_logging(level: int) -> None:
    """In an actor process: log ``onceflow`` records at ``level`` to stderr (Ray forwards it to the driver)."""
    logger = logging.getLogger("onceflow")
    logger.setLevel(level)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
