"""A driver with a runtime environment of its own (as ``ray job submit --working-dir`` gives one).

Starts its own embedded Ray with ``runtime_env``, prestarts two workers, and
prints whether an actor created afterwards took one of them: an actor
inherits the job's runtime environment, and the raylet hands it only a
worker started with the same one. Used by ``tests/test_warm_workers.py``.
"""

from __future__ import annotations

import json

import ray

import onceflow as of
from onceflow.runtime import warm


def _probe_class() -> type:
    class Probe:
        def pid(self) -> int:
            import os

            return os.getpid()

    return Probe


def main() -> None:
    ray.init(address="local", include_dashboard=False, logging_level="ERROR", num_cpus=2,
             runtime_env={"env_vars": {"ONCEFLOW_WARM_TEST": "1"}}, _system_config=warm.embedded_system_config())
    probe = ray.remote(num_cpus=0)(_probe_class())
    # Use up the workers the raylet started with itself (no runtime environment: no actor of this job takes them).
    first = [probe.remote() for _ in range(2)]
    ray.get([a.pid.remote() for a in first])
    counts = of.prestart(2, keep_alive_s=60)
    idle = warm.idle_workers()
    pid = ray.get(probe.remote().pid.remote())
    print(json.dumps({"counts": list(counts.values()), "idle": idle, "pid": pid}))


if __name__ == "__main__":
    main()
