"""``onceflow jobs``, ``watch``, ``stop`` and ``cancel`` against a job whose driver is another process on the cluster.

The test session's embedded Ray is a real local cluster: a job script started
in a subprocess joins it through ``RAY_ADDRESS``, as under ``ray job submit``,
and the commands find the job through its monitor actor. ``watch`` runs under
a pseudo-terminal, as in a shell, and its frames are kept in a file.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import textwrap
import threading
from pathlib import Path
from typing import IO

import pyarrow.dataset as ds
import pytest
import ray

from tests.helpers import wait_until

pytestmark = pytest.mark.usefixtures("ray_session")

JOB = textwrap.dedent("""
    import json, sys
    import onceflow as of
    from onceflow.testing.workload import feature_events

    name, out, storage = sys.argv[1:4]
    flow = of.Dataflow(name)
    events = flow.source(of.sources.GeneratorSource(feature_events, total=None, batch_size=2_000,
                                                    max_events_per_s=20_000),
                         watermark=of.BoundedOutOfOrderness("event_time"))
    (events.key_by("user_id").window(of.windows.Tumbling(size_ms=1_000))
     .aggregate(count=of.agg.count()).sink(of.sinks.ParquetSink(out)))
    handle = of.submit(flow, parallelism=2, checkpoint=of.CheckpointConfig(interval_s=0.3, storage=storage),
                       restart=of.RestartStrategy.fixed_delay(attempts=5, delay_s=0.2))
    print("submitted", flush=True)
    try:
        result = handle.wait()
        print("result", json.dumps({k: result.metrics[k] for k in ("events_in", "restarts")}), flush=True)
    except of.JobFailedError as error:
        print("ended", error, flush=True)
""")

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def onceflow(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "onceflow.runtime.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=cli_env(), check=False)


def cli_env() -> dict[str, str]:
    return {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "COLUMNS": "200"}


def start_driver(tmp_path: Path, name: str) -> tuple[subprocess.Popen[str], Path]:
    script = tmp_path / "job.py"
    script.write_text(JOB)
    out = tmp_path / "out"
    driver = subprocess.Popen([sys.executable, str(script), name, str(out), str(tmp_path / "cp")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=cli_env())
    return driver, out


class Terminal:
    """A command running under a pseudo-terminal (200 x 100), everything it writes kept in a file."""

    def __init__(self, args: list[str], log: Path) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 100, 200, 0, 0))
        env = {**cli_env(), "TERM": "xterm-256color"}
        env.pop("COLUMNS")
        self.process = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
        os.close(slave)
        self._master = master
        self.log = log
        log.write_bytes(b"")
        self._thread = threading.Thread(target=self._copy, daemon=True)
        self._thread.start()

    def _copy(self) -> None:
        with self.log.open("ab") as out:
            while True:
                try:
                    data = os.read(self._master, 65536)
                except OSError:  # the command exited and closed the terminal
                    return
                if not data:
                    return
                out.write(data)
                out.flush()

    def text(self) -> str:
        return ANSI.sub("", self.log.read_text(errors="replace"))

    def wait(self, timeout_s: float) -> int:
        code = self.process.wait(timeout=timeout_s)
        self._thread.join(timeout=10)
        os.close(self._master)
        return code


def read_line(stream: IO[str], prefix: str) -> str:
    for line in stream:
        if line.startswith(prefix):
            return line
    msg = f"the driver ended without printing {prefix!r}"
    raise AssertionError(msg)


def test_jobs_watch_and_stop_a_job_driven_from_another_process(tmp_path: Path) -> None:
    driver, out = start_driver(tmp_path, "clijob")
    watcher = None
    try:
        assert driver.stdout is not None
        read_line(driver.stdout, "submitted")
        listed = onceflow("jobs")
        assert listed.returncode == 0, listed.stderr
        row = next(line for line in listed.stdout.splitlines() if "clijob" in line)
        assert "RUNNING" in row, listed.stdout

        watcher = Terminal([sys.executable, "-m", "onceflow.runtime.cli", "watch", "clijob"], tmp_path / "watch.txt")
        wait_until(lambda: "source_0" in watcher.text() and "last checkpoint" in watcher.text(), timeout_s=60,
                   what="the live view to show the operators")
        wait_until(lambda: re.search(r"last checkpoint\s*│\s*\d+ at", watcher.text()), timeout_s=60,
                   what="a completed checkpoint in the view")
        saved = onceflow("savepoint", "clijob")
        assert saved.returncode == 0, saved.stdout + saved.stderr
        savepoint = saved.stdout.strip().rsplit(": ", 1)[1]
        assert Path(savepoint, "_savepoint.json").exists(), saved.stdout
        ray.kill(ray.get_actor("clijob/window_2/1", namespace="onceflow"), no_restart=True)
        wait_until(lambda: "clijob/window_2/1" in watcher.text() and "RESTARTING" in watcher.text(),
                   timeout_s=60, what="the view to show the restart")
        wait_until(lambda: "attempt 2" in watcher.text().rsplit("onceflow job", 1)[-1]
                   and "RUNNING" in watcher.text().rsplit("onceflow job", 1)[-1],
                   timeout_s=60, what="the view to show the job running again")

        stopped = onceflow("stop", "clijob")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert "FINISHED" in stopped.stdout, stopped.stdout
        assert watcher.wait(timeout_s=60) == 0
        result = json.loads(read_line(driver.stdout, "result").split(" ", 1)[1])
        assert driver.wait(timeout=60) == 0
    finally:
        if driver.poll() is None:
            driver.kill()
        if watcher is not None and watcher.process.poll() is None:
            watcher.process.kill()
    assert result["restarts"] == 1
    frames = watcher.text()
    final = frames.rsplit("onceflow job", 1)[-1]
    assert "FINISHED" in final and "events/s (average)" in final
    assert re.search(r"watermark\s*│\s*[\d,]+", frames), "the view shows the watermark"
    assert re.search(r"watermark lag\s*│\s*[\d,.]+ s behind", frames)
    assert re.search(r"clijob/window_2/1.*actor 'clijob/window_2/1' died", frames), "the restart row names it"
    for operator in ("source_0", "window_2", "sink"):
        assert re.search(rf"│ {operator}\w*\s*│", frames), operator
    table = ds.dataset(out, format="parquet").to_table()
    windows = list(zip(table["user_id"].to_pylist(), table["window_start"].to_pylist(), strict=True))
    assert len(windows) == len(set(windows)), "a (user, window) was committed twice"
    assert onceflow("jobs").stdout.count("clijob") == 0
    assert savepoint in onceflow("checkpoints", "list", str(tmp_path / "cp")).stdout
    assert not [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("clijob/")]


def test_cancel_from_another_process_and_unknown_jobs(tmp_path: Path) -> None:
    missing = onceflow("watch", "no-such-job")
    assert missing.returncode != 0 and "no running onceflow job named 'no-such-job'" in missing.stderr
    driver, _ = start_driver(tmp_path, "clicancel")
    try:
        assert driver.stdout is not None
        read_line(driver.stdout, "submitted")
        cancelled = onceflow("cancel", "clicancel")
        assert cancelled.returncode == 0, cancelled.stdout + cancelled.stderr
        assert "CANCELLED" in cancelled.stdout
        assert "was cancelled" in read_line(driver.stdout, "ended")
        assert driver.wait(timeout=60) == 0
    finally:
        if driver.poll() is None:
            driver.kill()
    assert not [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("clicancel/")]
