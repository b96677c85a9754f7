"""A real PostgreSQL server on loopback for the tests, started and stopped by them.

``initdb`` refuses to run as root, so as root the cluster is created and run
as the ``postgres`` user (created by Debian's ``postgresql`` package, which
``scripts/test`` installs when it is missing).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

__all__ = ["PostgresServer", "find_bin_dir"]


def find_bin_dir() -> Path:
    """Return the directory of ``initdb``/``pg_ctl``: Debian's layout first, then PATH."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    if candidates:
        return Path(candidates[0]).parent
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    msg = "PostgreSQL's initdb was not found; install Debian's postgresql package (scripts/test does)"
    raise RuntimeError(msg)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PostgresServer:
    """One throw-away PostgreSQL cluster.

    Args:
        max_prepared_transactions: the server setting (0 disables two-phase commit).
    """

    def __init__(self, max_prepared_transactions: int = 64) -> None:
        self.bin = find_bin_dir()
        self.root = Path(tempfile.mkdtemp(prefix="onceflow-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.max_prepared_transactions = max_prepared_transactions
        self._as_postgres = os.geteuid() == 0

    @property
    def dsn(self) -> str:
        """A libpq connection string for the ``postgres`` database."""
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres connect_timeout=5"

    def _run(self, *args: str) -> None:
        command = [str(self.bin / args[0]), *args[1:]]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def start(self) -> PostgresServer:
        """Create the cluster (first time) and start the server; wait until it accepts connections."""
        if self._as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
        if not self.data.exists():
            self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync")
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
                   f"-c max_prepared_transactions={self.max_prepared_transactions} -c max_connections=100 "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "server.log"), "-w",
                  "-t", "60", "start")
        return self

    def stop(self) -> None:
        """Stop the server (fast shutdown); prepared transactions survive."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def restart(self) -> None:
        """Stop and start again, as a database restart in production would."""
        self.stop()
        self.start()

    def destroy(self) -> None:
        """Stop the server if it runs and delete its files."""
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
