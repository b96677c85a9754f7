"""Sink throughput: the cost of exactly-once into PostgreSQL and Parquet.

The feature-window job (N events, parallelism 2, checkpoints every 1 s)
writes its (user, window) rows into:

- ``PostgresSink`` with two-phase commit (``COPY`` into one transaction per
  checkpoint, ``PREPARE TRANSACTION``, ``COMMIT PREPARED``);
- ``PostgresSink(exactly_once=False)``: plain autocommit ``COPY`` per batch
  (at-least-once), the baseline;
- ``ParquetSink`` (in-progress, pending and committed part files).

Runs alternate between the sinks, ``--repeats`` times each, against a
PostgreSQL server this script starts on loopback (as the tests do). Rows/s is
rows committed over the job's duration. Writes ``benchmarks/results/sinks.json``
and ``sinks.png``.

    python benchmarks/sinks.py [--events 2000000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import onceflow as of
from benchmarks.common import feature_flow, pyplot, range_bars, save_figure, start_ray, write_json
from tests.postgres_server import PostgresServer


def one_run(kind: str, events: int, dsn: str, name: str) -> dict[str, Any]:
    storage = tempfile.mkdtemp(prefix="of-bench-chk-")
    out = tempfile.mkdtemp(prefix="of-bench-out-")
    table = name.replace("-", "_")
    sink: of.sinks.TransactionalSink
    if kind == "parquet":
        sink = of.sinks.ParquetSink(out)
    else:
        sink = of.sinks.PostgresSink(dsn, table, create=True, exactly_once=kind == "postgres-2pc")
    try:
        m = of.run(feature_flow(name, sink, events=events), parallelism=2,
                   checkpoint=of.CheckpointConfig(interval_s=1.0, storage=storage)).metrics
        if kind != "parquet":
            with psycopg.connect(dsn, autocommit=True) as connection:
                committed = connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                connection.execute(f"DROP TABLE {table}")
            assert committed == m["events_out"], (committed, m["events_out"])
        return {"rows": m["events_out"], "duration_s": m["duration_s"],
                "rows_per_s": m["events_out"] / m["duration_s"], "checkpoints": m["checkpoints_completed"]}
    finally:
        shutil.rmtree(storage, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    server = PostgresServer().start()
    try:
        start_ray()
        kinds = ["postgres-2pc", "postgres-autocommit", "parquet"]
        one_run("parquet", args.events // 10, server.dsn, "bench-sink-warmup")
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
        for i in range(args.repeats):
            for kind in kinds:
                runs[kind].append(one_run(kind, args.events, server.dsn, f"bench-{kind}-{i}"))
                print(f"{kind:>20}: {runs[kind][-1]['rows_per_s']:>12,.0f} rows/s", flush=True)
    finally:
        server.destroy()
    summary = {k: {"rows_per_s_median": statistics.median(r["rows_per_s"] for r in v),
                   "rows_per_s_min": min(r["rows_per_s"] for r in v),
                   "rows_per_s_max": max(r["rows_per_s"] for r in v)} for k, v in runs.items()}
    cost = 1 - summary["postgres-2pc"]["rows_per_s_median"] / summary["postgres-autocommit"]["rows_per_s_median"]
    print(f"exactly-once into PostgreSQL costs {cost:.1%} against autocommit COPY")
    path = write_json("sinks", {"events": args.events, "parallelism": 2, "interval_s": 1.0,
                                "exactly_once_cost_postgres": cost, "summary": summary, "runs": runs})
    plot(summary, cost)
    print(f"wrote {path}")


def plot(summary: dict[str, dict[str, float]], cost: float) -> None:
    plt = pyplot()

    fig, axis = plt.subplots(figsize=(6, 4))
    names = list(summary)
    range_bars(axis, names, [summary[n]["rows_per_s_median"] for n in names],
               [summary[n]["rows_per_s_min"] for n in names], [summary[n]["rows_per_s_max"] for n in names],
               scale=1e6, color=["#dd8452", "#4c72b0", "#55a868"])
    axis.set_ylabel("million rows/s committed (median, min..max)")
    axis.set_title(f"sinks, checkpoints every 1 s; 2PC costs {cost:.1%} vs autocommit")
    fig.tight_layout()
    save_figure(fig, "sinks")


if __name__ == "__main__":
    main()
