"""A chaos job shape as a stand-alone driver, for schedules that SIGKILL the driver itself.

    python tests/jobs/chaos_job.py --shape SHAPE --job NAME --workspace DIR [--dsn DSN] [--kafka BOOTSTRAP] [--resume]

Runs :data:`tests.chaos.SHAPES` ``[SHAPE]`` with the same parallelism and
checkpoint settings as :func:`tests.chaos.run_schedule` and prints its restarts
and restored checkpoints as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))

import onceflow as of  # noqa: E402
from tests.chaos import SHAPES, Workspace, build_flow  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", required=True, choices=sorted(SHAPES))
    parser.add_argument("--job", required=True)
    parser.add_argument("--workspace", required=True)
    parser.add_argument("--dsn", default=None)
    parser.add_argument("--kafka", default=None)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    workspace = Workspace(Path(args.workspace), args.dsn, args.kafka)
    result = of.run(build_flow(args.shape, args.job, workspace), parallelism=SHAPES[args.shape].parallelism,
                    resume=args.resume, checkpoint=of.CheckpointConfig(interval_s=0.3, storage=workspace.storage))
    print(json.dumps({"restarts": result.metrics["restarts"], "restored_from": result.metrics["restored_from"]}))


if __name__ == "__main__":
    main()
