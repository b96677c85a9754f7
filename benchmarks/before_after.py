"""Feature-window throughput of this checkout against an earlier revision, measured in one session.

A refactoring must not cost speed. This installs ``--base`` (a git revision,
by default ``HEAD~1``) into a scratch virtualenv beside this one (its own
onceflow, the same Ray, pyarrow and numpy), then runs the feature-window job
(:mod:`onceflow.testing.workload`: N events, tumbling 10 s windows per user,
``count`` and ``sum(amount)`` into the Parquet sink, parallelism 2) with
checkpointing off and with aligned checkpoints every second, for the base and
for this checkout, alternating, ``--repeats`` times. Every run is a fresh
process with its own embedded Ray and is verified (the counts add up to N).
With ``--local`` it also runs this checkout's in-process executor
(``executor="local"``, no Ray, one core).

Writes ``benchmarks/results/before_after.json`` and ``before_after.png``: the
median and the range of events/s per configuration, and each configuration's
ratio of medians (this checkout / base).

    python benchmarks/before_after.py [--base REV] [--events 10000000] [--repeats 3] [--local]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import pyplot, range_bars, save_figure, write_json

ROOT = Path(__file__).resolve().parent.parent

_JOB = """
import json, sys, tempfile, shutil
import pyarrow.dataset as ds
import onceflow as of
try:
    from onceflow.testing.workload import feature_events
except ImportError:  # revisions before onceflow.testing
    from onceflow.operators.workload import feature_events
events, checkpoint, executor = int(sys.argv[1]), sys.argv[2] == "on", sys.argv[3]
work = tempfile.mkdtemp(prefix="of-before-after-")
flow = of.Dataflow("before-after")
stream = flow.source(of.sources.GeneratorSource(feature_events, total=events, batch_size=100_000),
                     watermark=of.BoundedOutOfOrderness("event_time"))
(stream.key_by("user_id").window(of.windows.Tumbling(size_ms=10_000))
 .aggregate(count=of.agg.count(), total=of.agg.sum("amount")).sink(of.sinks.ParquetSink(work + "/out")))
options = {"parallelism": 2}
if checkpoint:
    options["checkpoint"] = of.CheckpointConfig(interval_s=1.0, storage=work + "/checkpoints")
if executor != "ray":
    options["executor"] = executor
result = of.run(flow, **options)
counted = int(ds.dataset(work + "/out", format="parquet").to_table(columns=["count"])["count"].to_numpy().sum())
shutil.rmtree(work, ignore_errors=True)
assert counted == events, (counted, events)
m = result.metrics
print(json.dumps({"events_per_s": m["events_per_s"], "duration_s": m["duration_s"],
                  "checkpoints": m["checkpoints_completed"]}))
"""


def install_base(revision: str, scratch: Path) -> Path:
    """Check ``revision`` out and install it into a virtualenv that borrows this one's packages; its python."""
    source = scratch / "source"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(source), revision], check=True,
                   capture_output=True)
    venv = scratch / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # This environment's packages (Ray, pyarrow...) but not its editable onceflow: a path listed in
    # a .pth file is added without processing the .pth files inside it.
    borrowed = [p for p in sys.path if p.endswith("site-packages")] or [sysconfig.get_paths()["purelib"]]
    Path(purelib, "zz-borrowed.pth").write_text("".join(f"{p}\n" for p in borrowed))
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    str(source)], check=True)
    return python


def one_run(python: Path, events: int, checkpoint: bool, executor: str) -> dict[str, Any]:
    done = subprocess.run([str(python), "-c", _JOB, str(events), "on" if checkpoint else "off", executor],
                          capture_output=True, text=True, check=False, cwd=tempfile.gettempdir())
    if done.returncode != 0:
        raise SystemExit(f"the job failed ({python}, checkpoint={checkpoint}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="HEAD~1", help="the git revision to compare with")
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--local", action="store_true", help="also run this checkout with executor='local'")
    args = parser.parse_args()
    base_commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.base], check=True,
                                 capture_output=True, text=True).stdout.strip()
    head_commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], check=True,
                                 capture_output=True, text=True).stdout.strip()
    scratch = Path(tempfile.mkdtemp(prefix="of-base-"))
    try:
        base = install_base(args.base, scratch)
        this = Path(sys.executable)
        configs = [(f"base {base_commit}", base, False, "ray"), (f"this {head_commit}", this, False, "ray"),
                   (f"base {base_commit}", base, True, "ray"), (f"this {head_commit}", this, True, "ray")]
        if args.local:
            configs.append((f"this {head_commit}", this, False, "local"))
        runs: dict[tuple[str, bool, str], list[dict[str, Any]]] = {(c[0], c[2], c[3]): [] for c in configs}
        one_run(this, 200_000, False, "ray")  # warm-up: file caches, imports
        for repeat in range(args.repeats):
            for label, python, checkpoint, executor in configs:
                result = one_run(python, args.events, checkpoint, executor)
                runs[(label, checkpoint, executor)].append(result)
                print(f"[{repeat + 1}/{args.repeats}] {label:>16} checkpoints {'on ' if checkpoint else 'off'} "
                      f"{executor:>5}: {result['events_per_s']:>12,.0f} events/s", flush=True)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(scratch / "source")],
                       check=False, capture_output=True)
        shutil.rmtree(scratch, ignore_errors=True)
    results = []
    for (label, checkpoint, executor), measured in runs.items():
        rates = [r["events_per_s"] for r in measured]
        results.append({"revision": label, "checkpointing": checkpoint, "executor": executor,
                        "events_per_s_min": min(rates), "events_per_s_median": statistics.median(rates),
                        "events_per_s_max": max(rates), "runs": measured})
    ratios = {}
    for checkpoint in (False, True):
        pair = [r for r in results if r["checkpointing"] is checkpoint and r["executor"] == "ray"]
        ratios["checkpoints on" if checkpoint else "checkpoints off"] = (
            pair[1]["events_per_s_median"] / pair[0]["events_per_s_median"])
    for name, ratio in ratios.items():
        print(f"{name}: this / base = {ratio:.3f} (ratio of medians)")
    path = write_json("before_after", {"workload": "feature-window, parallelism 2, ParquetSink",
                                       "events": args.events, "repeats": args.repeats, "base": base_commit,
                                       "head": head_commit, "results": results, "ratio_of_medians": ratios})
    plot(results, args.events)
    print(f"wrote {path}")


def plot(results: list[dict[str, Any]], events: int) -> None:
    plt = pyplot()
    fig, axis = plt.subplots(figsize=(8, 4))
    labels = [f"{r['revision']}\n{'ckpt 1 s' if r['checkpointing'] else 'no ckpt'}"
              f"{'' if r['executor'] == 'ray' else chr(10) + r['executor']}" for r in results]
    colours = ["#8c8c8c" if r["revision"].startswith("base") else "#4c72b0" for r in results]
    range_bars(axis, labels, [r["events_per_s_median"] for r in results], [r["events_per_s_min"] for r in results],
               [r["events_per_s_max"] for r in results], scale=1e6, color=colours)
    axis.set_ylabel("million events/s (median, min..max)")
    axis.set_title(f"feature-window, N={events / 1e6:g}M, parallelism 2: base vs this checkout")
    axis.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    save_figure(fig, "before_after")


if __name__ == "__main__":
    main()
