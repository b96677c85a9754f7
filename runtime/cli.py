"""The ``onceflow`` command: run jobs with live progress, inspect checkpoints, run benchmarks.

onceflow run JOB.py [ARGS...]             run a job script, showing live progress
onceflow jobs [--address A]                the onceflow jobs running on a Ray cluster
onceflow watch JOB [--address A]           the live view of a job running on the cluster
onceflow stop JOB [--address A]            drain the job, take its final checkpoint, commit and end it
onceflow cancel JOB [--address A]          end the job at once (its sinks keep the last checkpoint's output)
onceflow savepoint JOB [--path P]          take a savepoint of a running job (through its coordinator actor)
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
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from onceflow.checkpoint.storage import CheckpointStorage, CheckpointStorageError, job_names
from onceflow.redaction import redact_uri
from onceflow.runtime import progress
from onceflow.runtime.monitor import find_monitor, list_monitors

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


_ADDRESS = click.option("--address", default=None, metavar="ADDRESS",
                        help='the Ray cluster: "auto", "host:port" or "ray://host:port" '
                             "(default: RAY_ADDRESS, else auto)")
_TIMEOUT_S = 5.0
"""How long a command waits for a monitor actor to answer."""


def _connect(address: str | None) -> None:
    import logging
    import os

    import ray

    if not ray.is_initialized():
        try:
            ray.init(address=address or os.environ.get("RAY_ADDRESS") or "auto", logging_level=logging.ERROR,
                     log_to_driver=False)
        except (ConnectionError, RuntimeError) as error:
            msg = f"cannot connect to a Ray cluster at {address or 'auto'}: {error}; start one or pass --address"
            raise click.ClickException(msg) from error


def _monitor(job: str) -> object:
    monitor = find_monitor(job)
    if monitor is None:
        running = list_monitors()
        msg = (f"no running onceflow job named {job!r} on this cluster"
               + (f"; running: {', '.join(running)}" if running else "; none is running"))
        raise click.ClickException(msg)
    return monitor


def _view(monitor: object, newer_than: int = -1, timeout_s: float = 0.0) -> dict[str, Any] | None:
    """The monitor's view, or ``None`` once the job (and with it the monitor) is gone."""
    import ray

    try:
        view: dict[str, Any] = ray.get(monitor.view.remote(newer_than, timeout_s),  # type: ignore[attr-defined,assignment]
                                       timeout=timeout_s + _TIMEOUT_S)
    except Exception:  # noqa: BLE001 - the job ended and its monitor went with it
        return None
    return view


@main.command("jobs")
@_ADDRESS
def list_jobs(address: str | None) -> None:
    """List the onceflow jobs running on the Ray cluster: status, uptime, last checkpoint, restarts."""
    _connect(address)
    names = list_monitors()
    if not names:
        _console().print("no onceflow job is running on this cluster")
        return
    table = Table(title="onceflow jobs")
    for column in ("job", "status", "attempt", "uptime", "events in", "events/s", "last checkpoint", "restarts",
                   "run"):
        table.add_column(column, justify="left" if column in ("job", "status", "run") else "right")
    for name in names:
        monitor = find_monitor(name)
        view = _view(monitor) if monitor is not None else None
        if view is None:
            continue  # it ended between the listing and the call
        checkpoints = view.get("checkpoints") or {}
        table.add_row(name, view.get("status", "?"), str(view.get("attempt", "-")),
                      f"{view.get('uptime_s', 0.0):,.0f} s", f"{view.get('events_in', 0):,}",
                      f"{view.get('events_per_s', 0.0):,.0f}",
                      "-" if checkpoints.get("latest") is None else str(checkpoints["latest"]),
                      str(len(view.get("restarts") or [])), view.get("run", ""))
    _console().print(table)


@main.command()
@click.argument("job")
@_ADDRESS
def watch(job: str, address: str | None) -> None:
    """Show the live view of JOB, running on the cluster, until it ends (Ctrl-C leaves it running)."""
    from rich.live import Live

    _connect(address)
    monitor = _monitor(job)
    view = _view(monitor)
    if view is None:
        msg = f"job {job!r} ended"
        raise click.ClickException(msg)
    with Live(progress.render_view(view), refresh_per_second=4, console=_console()) as live:
        while not view.get("ended"):
            newer = _view(monitor, view.get("version", -1), timeout_s=1.0)
            if newer is None:
                break
            view = newer
            live.update(progress.render_view(view))
    if not view.get("ended"):
        _console().print(f"job {job!r} ended (its last figures are above)")


def _ask(job: str, kind: str, address: str | None, timeout_s: float) -> None:
    import ray

    _connect(address)
    monitor = _monitor(job)
    ray.get(monitor.request.remote(kind), timeout=_TIMEOUT_S)  # type: ignore[attr-defined]
    _console().print(f"asked job {job!r} to {kind}; waiting for it to end")
    view = _view(monitor)
    deadline = time.monotonic() + timeout_s
    while view is not None and not view.get("ended"):
        if time.monotonic() > deadline:
            msg = f"job {job!r} has not ended {timeout_s:g} s after the {kind} request; it is {view.get('status')}"
            raise click.ClickException(msg)
        last = view
        view = _view(monitor, view.get("version", -1), timeout_s=1.0)
        if view is None:
            view = {**last, "ended": False}
            break
    if view is not None:
        _console().print(progress.render_view(view))
        if not view.get("ended"):
            _console().print(f"job {job!r} ended")


@main.command()
@click.argument("job")
@_ADDRESS
@click.option("--timeout", "timeout_s", default=300.0, show_default=True, help="seconds to wait for the job to end")
def stop(job: str, address: str | None, timeout_s: float) -> None:
    """Stop JOB gracefully: its sources end, it drains, takes a final checkpoint and commits it."""
    _ask(job, "stop", address, timeout_s)


@main.command()
@click.argument("job")
@_ADDRESS
@click.option("--timeout", "timeout_s", default=60.0, show_default=True, help="seconds to wait for the job to end")
def cancel(job: str, address: str | None, timeout_s: float) -> None:
    """Cancel JOB at once: its sinks keep what the last completed checkpoint committed, nothing after it."""
    _ask(job, "cancel", address, timeout_s)


@main.command()
@click.argument("job")
@click.option("--path", default=None, help="the savepoint's directory or pyarrow.fs URI (default: under the "
              "job's checkpoint storage)")
@_ADDRESS
@click.option("--timeout", "timeout_s", default=600.0, show_default=True, help="seconds to wait for it")
def savepoint(job: str, path: str | None, address: str | None, timeout_s: float) -> None:
    """Take a savepoint of JOB, running on the cluster; print where it is (the job goes on)."""
    import ray

    from onceflow.runtime.ray_env import NAMESPACE

    _connect(address)
    try:
        coordinator = ray.get_actor(f"{job}/coordinator", namespace=NAMESPACE)
    except ValueError:
        _monitor(job)  # names the running jobs if there is no such job
        msg = f"job {job!r} takes no checkpoints (it has no coordinator), so it has no savepoints"
        raise click.ClickException(msg) from None
    try:
        taken: dict[str, Any] = ray.get(coordinator.savepoint.remote(path, False), timeout=timeout_s)  # type: ignore[assignment]
    except Exception as error:  # noqa: BLE001 - said to the user, who may try again
        cause = getattr(error, "cause", None) or error
        msg = f"the savepoint of job {job!r} failed: {cause}"
        raise click.ClickException(msg) from None
    _console().print(f"savepoint of checkpoint {taken['checkpoint_id']} of job {job!r}: {taken['path']}",
                     markup=False, soft_wrap=True)


@main.group()
def checkpoints() -> None:
    """Inspect the checkpoints in a storage directory or pyarrow.fs URI."""


def _jobs(storage: str) -> list[str]:
    try:
        return job_names(storage)
    except CheckpointStorageError as error:
        raise click.ClickException(str(error)) from None


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
        _console().print(f"no jobs under {redact_uri(storage)}")
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
        for entry in store.savepoints():
            _console().print(f"  savepoint of checkpoint {entry['checkpoint_id']}: {entry['path']}", markup=False,
                             soft_wrap=True)


@checkpoints.command("show")
@click.argument("storage")
@click.argument("job")
@click.argument("checkpoint_id", type=int, required=False)
def show_checkpoint(storage: str, job: str, checkpoint_id: int | None) -> None:
    """Show one checkpoint of JOB (the newest by default): every subtask's state and timings."""
    store = CheckpointStorage(storage, job)
    manifest = store.manifest(checkpoint_id) if checkpoint_id is not None else store.latest_manifest()
    if manifest is None:
        msg = f"no complete checkpoint {checkpoint_id or ''} of job {job!r} in {redact_uri(storage)}"
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
