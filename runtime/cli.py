"""The ``onceflow`` command: run jobs with live progress, inspect checkpoints, run benchmarks.

onceflow run JOB.py [ARGS...]             run a job script, showing live progress
onceflow checkpoints list STORAGE          checkpoints of every job under STORAGE
onceflow checkpoints show STORAGE JOB [ID] one checkpoint, per subtask
onceflow checkpoints verify STORAGE [JOB]  check every checkpoint's files against its manifest
onceflow bench NAME [ARGS...]              run benchmarks/NAME.py and print its figures
"""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from onceflow.checkpoint.storage import CheckpointStorage
from onceflow.runtime import progress

__all__ = ["main"]



def _console() -> Console:
    return Console()  # created per command, so that it sees the terminal (COLUMNS) of this call
BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Onceflow: exactly-once stream processing on Ray."""


@main.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("script", type=click.Path(exists=True, dir_okay=False))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def run(script: str, args: tuple[str, ...]) -> None:
    """Run a job SCRIPT (which calls of.run) with a live progress display."""
    progress.install(progress.RichProgress)
    sys.argv = [script, *args]
    sys.path.insert(0, str(Path(script).resolve().parent))
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        progress.install(None)


@main.group()
def checkpoints() -> None:
    """Inspect the checkpoints in a storage directory or pyarrow.fs URI."""


def _jobs(storage: str) -> list[str]:
    import pyarrow.fs as pafs

    if "://" in storage:
        fs, root = pafs.FileSystem.from_uri(storage)
    else:
        fs, root = pafs.LocalFileSystem(), str(Path(storage).resolve())
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n} B"


@checkpoints.command("list")
@click.argument("storage")
def list_checkpoints(storage: str) -> None:
    """List the retained checkpoints and the history of every job under STORAGE."""
    jobs = _jobs(storage)
    if not jobs:
        _console().print(f"no jobs under {storage}")
        return
    for job in jobs:
        store = CheckpointStorage(storage, job)
        history = {h["checkpoint_id"]: h for h in store.history()}
        table = Table(title=f"job {job}: retained {store.completed_ids()}, {len(history)} completed in all")
        for column in ("checkpoint", "retained", "barriers", "duration", "alignment", "sync", "async", "state",
                       "channel state"):
            table.add_column(column, justify="right")
        retained = set(store.completed_ids())
        for checkpoint_id, h in sorted(history.items())[-20:]:
            table.add_row(str(checkpoint_id), "yes" if checkpoint_id in retained else "",
                          "unaligned" if h.get("unaligned") else "aligned",
                          f"{h['duration_s']:.3f} s", f"{h['alignment_s']:.3f} s", f"{h['sync_s']:.3f} s",
                          f"{h['async_s']:.3f} s", _size(h["state_bytes"]), _size(h.get("channel_state_bytes", 0)))
        _console().print(table)


@checkpoints.command("show")
@click.argument("storage")
@click.argument("job")
@click.argument("checkpoint_id", type=int, required=False)
def show_checkpoint(storage: str, job: str, checkpoint_id: int | None) -> None:
    """Show one checkpoint of JOB (the newest by default): every subtask's state and timings."""
    store = CheckpointStorage(storage, job)
    manifest = store.manifest(checkpoint_id) if checkpoint_id is not None else store.latest_manifest()
    if manifest is None:
        msg = f"no complete checkpoint {checkpoint_id or ''} of job {job!r} in {storage}"
        raise click.ClickException(msg)
    table = Table(title=f"job {job}, checkpoint {manifest['checkpoint_id']}: {_size(manifest['state_bytes'])}")
    for column in ("subtask", "operator", "rows", "bytes", "barrier", "sync", "async", "barrier wait",
                   "start delay"):
        table.add_column(column, justify="right" if column not in ("subtask", "operator", "barrier") else "left")
    for task, entry in sorted(manifest["tasks"].items()):
        m: dict[str, Any] = entry.get("metrics", {})
        for operator, state in sorted(entry["states"].items()):
            table.add_row(task, operator, f"{state['rows']:,}", _size(state["bytes"]),
                          "unaligned" if m.get("unaligned") else "aligned",
                          f"{m.get('sync_s', 0):.3f} s", f"{m.get('async_s', 0):.3f} s",
                          f"{m.get('alignment_s', 0):.3f} s", f"{m.get('start_delay_s', 0):.3f} s")
    _console().print(table)


@checkpoints.command("verify")
@click.argument("storage")
@click.argument("job", required=False)
def verify_checkpoints(storage: str, job: str | None) -> None:
    """Check the checkpoints of JOB (of every job by default) offline: manifests, file sizes and CRC-32s.

    Exits with status 1 when a checkpoint does not verify, naming each damaged or missing file.
    """
    damaged = 0
    for name in [job] if job else _jobs(storage):
        store = CheckpointStorage(storage, name)
        ids = store.written_ids()
        if not ids:
            _console().print(f"job {name}: no checkpoint")
            continue
        for checkpoint_id in ids:
            problems = store.verify(checkpoint_id)
            damaged += bool(problems)
            verdict = "[red]damaged[/red]" if problems else "[green]ok[/green]"
            _console().print(f"job {name} checkpoint {checkpoint_id}: {verdict}")
            for problem in problems:
                _console().print(f"  {problem}", markup=False)
    if damaged:
        msg = f"{damaged} checkpoint(s) do not verify; resume=True restores none of them"
        raise click.ClickException(msg)


@main.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("name")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(name: str, args: tuple[str, ...]) -> None:
    """Run benchmarks/NAME.py (feature_window, checkpointing, sinks, dedupe, ...) and print its figures."""
    script = BENCHMARKS / f"{name}.py"
    if not script.exists():
        names = sorted(p.stem for p in BENCHMARKS.glob("*.py") if p.stem not in ("__init__", "common"))
        msg = f"no benchmark {name!r}; choose one of {', '.join(names)}"
        raise click.ClickException(msg)
    completed = subprocess.run([sys.executable, str(script), *args], check=False)  # noqa: S603 - our own script
    if completed.returncode:
        raise SystemExit(completed.returncode)
    result = BENCHMARKS / "results" / f"{name}.json"
    if result.exists():
        _print_figures(name, json.loads(result.read_text()))


def _print_figures(name: str, data: dict[str, Any]) -> None:
    table = Table(title=f"{name} ({data.get('measured_at', '')}, {data.get('machine', {}).get('cpus')} cpus)")
    table.add_column("figure")
    table.add_column("value", justify="right")

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                if key not in ("machine", "runs", "runs_on", "runs_off", "tasks", "checkpoint_history"):
                    walk(f"{prefix}.{key}" if prefix else key, inner)
        elif isinstance(value, list):
            for i, inner in enumerate(value):
                if isinstance(inner, dict):
                    walk(f"{prefix}[{i}]", inner)
        elif isinstance(value, float):
            table.add_row(prefix, f"{value:,.4g}")
        elif isinstance(value, int | str):
            table.add_row(prefix, f"{value:,}" if isinstance(value, int) else value)

    walk("", {k: v for k, v in data.items() if k != "measured_at"})
    _console().print(table)


if __name__ == "__main__":
    main()
