"""A real S3-compatible server on loopback for the tests: moto in server mode, started and stopped by them.

moto answers the S3 REST API over HTTP (``python -m moto.server``), so
``pyarrow.fs.S3FileSystem`` talks to it exactly as to S3: signed requests,
multipart uploads, listings by prefix. It keeps its objects in memory: a
server stopped and started again (:meth:`S3Server.stop`, :meth:`S3Server.start`)
comes back empty, and :meth:`S3Server.start` creates the bucket again.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.helpers import stop_process_group

__all__ = ["S3Server"]

ACCESS_KEY = "onceflow-test-key"
SECRET_KEY = "onceflow-test-secret/+never-logged"
"""moto accepts any credentials; this one has ``/`` and ``+`` so that its encoding in a URI is exercised."""
REGION = "us-east-1"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class S3Server:
    """One throw-away moto S3 server on ``127.0.0.1`` with one bucket.

    Args:
        bucket: the bucket :meth:`start` creates.
    """

    def __init__(self, bucket: str = "onceflow-checkpoints") -> None:
        self.bucket = bucket
        self.root = Path(tempfile.mkdtemp(prefix="onceflow-s3-"))
        self.port = _free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        """The server's URL (``AWS_ENDPOINT_URL``)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def environment(self) -> dict[str, str]:
        """The environment variables that point an AWS client (and ``pyarrow.fs``) at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint_url, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true"}

    def uri(self, prefix: str) -> str:
        """``s3://<bucket>/<prefix>`` with the endpoint in the query (no credentials: the environment has them)."""
        return f"s3://{self.bucket}/{prefix}?endpoint_override=127.0.0.1:{self.port}&scheme=http&region={REGION}"

    def client(self) -> Any:
        """A boto3 S3 client of this server (to look at the bucket as S3 sees it)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name=REGION)

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key in the bucket under ``prefix``."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def start(self, timeout_s: float = 60.0) -> S3Server:
        """Start the server on :attr:`port` in its own process group, wait until it answers, create the bucket."""
        log = (self.root / "server.log").open("ab")
        self._process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.root)
        deadline = time.monotonic() + timeout_s
        while True:
            if self._process.poll() is not None:
                msg = f"the moto server exited at start: {(self.root / 'server.log').read_text()[-2000:]}"
                raise RuntimeError(msg)
            with (contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError),
                  urllib.request.urlopen(f"{self.endpoint_url}/moto-api/", timeout=1)):
                break
            if time.monotonic() > deadline:
                msg = f"the moto server did not answer within {timeout_s} s"
                raise RuntimeError(msg)
            time.sleep(0.1)
        self.client().create_bucket(Bucket=self.bucket)
        return self

    def stop(self, timeout_s: float = 20.0) -> None:
        """Stop the server: its whole process group, and return once no member is left (the port is closed)."""
        if self._process is None:
            return
        stop_process_group(self._process, timeout_s)
        self._process = None

    def destroy(self) -> None:
        """Stop the server if it runs and delete its files."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
