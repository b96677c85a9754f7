"""Connecting to Ray: reuse an initialised Ray, start an embedded one, or join a cluster."""

from __future__ import annotations

import logging
import os

import ray

from onceflow.runtime.warm import embedded_system_config

__all__ = ["NAMESPACE", "ensure_ray"]

NAMESPACE = "onceflow"
"""The Ray namespace of every onceflow actor."""

log = logging.getLogger("onceflow")


def ensure_ray(address: str | None) -> bool:
    """Make sure this process is connected to Ray.

    Args:
        address: ``None`` reuses an initialised Ray, joins the cluster in
            ``RAY_ADDRESS`` (as under ``ray job submit``), or starts an embedded
            local Ray (whose workers preload onceflow, see
            :mod:`onceflow.runtime.warm`); ``"auto"`` or ``"ray://host:port"`` joins that cluster.

    Returns:
        Whether this call started Ray (the caller then owns it).

    """
    if ray.is_initialized():
        return False
    if address is None and not os.environ.get("RAY_ADDRESS"):
        log.info("starting an embedded local Ray")
        ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=True, _system_config=embedded_system_config())
        return True
    ray.init(address=address, logging_level=logging.WARNING)
    return True
