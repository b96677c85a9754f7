"""Checkpoints on S3 through ``pyarrow.fs``, against a real S3-compatible server (moto) on loopback.

The jobs run on the session's embedded Ray, started before the S3 settings are in the driver's
environment: the coordinator and subtasks get them only through the storage URI the driver hands them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from urllib.parse import quote

import pyarrow as pa
import pytest
from click.testing import CliRunner

import onceflow as of
from onceflow.checkpoint.s3 import with_s3_environment
from onceflow.checkpoint.storage import CheckpointStorage, CheckpointStorageError
from onceflow.testing.workload import feature_events
from tests.helpers import assert_feature_reference, run_killing_a_subtask, wait_until
from tests.s3_server import ACCESS_KEY, SECRET_KEY, S3Server

pytestmark = pytest.mark.usefixtures("ray_session")

OUTAGE_S = 8.0


@pytest.fixture
def s3_environment(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """The driver's environment points AWS clients at the test server (as a deployment's would)."""
    for name, value in s3.environment.items():
        monkeypatch.setenv(name, value)
    yield s3


class FailsOnceACheckpointCompleted:
    """A ``map_batches`` function that raises once ``job`` has a complete checkpoint in ``storage`` (``None``: never).

    It looks the storage up from the subtask's process, so a URI that carries all its settings is needed.
    """

    def __init__(self, storage: str | None = None, job: str = "") -> None:
        self._storage, self._job = storage, job
        self._store: CheckpointStorage | None = None

    def __call__(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        if self._storage is not None:
            self._store = self._store or CheckpointStorage(self._storage, self._job)
            if self._store.completed_ids():
                msg = "the network blinked"
                raise ConnectionError(msg)
        return batch


def feature_flow(name: str, total: int, sink: of.sinks.TestingSink, rate: int = 20_000,
                 fail_after: FailsOnceACheckpointCompleted | None = None) -> of.Dataflow:
    flow = of.Dataflow(name)
    events = flow.source(of.sources.GeneratorSource(feature_events, total=total, batch_size=2_000,
                                                    max_events_per_s=rate),
                         watermark=of.BoundedOutOfOrderness("event_time"))
    events = events.map_batches(fail_after or FailsOnceACheckpointCompleted(), name="flaky")
    (events.key_by("user_id").window(of.windows.Tumbling(size_ms=10_000))
     .aggregate(count=of.agg.count(), total=of.agg.sum("amount")).sink(sink))
    return flow


def test_the_driver_environment_goes_into_the_uri_and_the_uri_wins() -> None:
    env = {"AWS_ENDPOINT_URL": "http://a:1", "AWS_ENDPOINT_URL_S3": "https://b:2", "AWS_DEFAULT_REGION": "r1",
           "AWS_REGION": "r2", "AWS_ACCESS_KEY_ID": "K", "AWS_SECRET_ACCESS_KEY": "S"}
    assert with_s3_environment("s3://bkt/p", env) == "s3://K:S@bkt/p?endpoint_override=b%3A2&scheme=https&region=r2"
    assert (with_s3_environment("s3://k:s@bkt/p?endpoint_override=c:3&scheme=http&region=r3", env)
            == "s3://k:s@bkt/p?endpoint_override=c%3A3&scheme=http&region=r3")
    temporary = with_s3_environment("s3://bkt/p", {**env, "AWS_SESSION_TOKEN": "T"})
    assert "@" not in temporary, "temporary credentials cannot travel without their token"
    assert with_s3_environment("gs://bkt/p", env) == "gs://bkt/p"


def test_a_killed_subtask_restores_from_checkpoints_on_s3(s3_environment: S3Server,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    s3, job, total = s3_environment, "s3-kill", 60_000
    sink = of.sinks.TestingSink()
    store = CheckpointStorage(f"s3://{s3.bucket}/kill", job)
    with caplog.at_level(logging.INFO, logger="onceflow"):
        result, killed, lease = run_killing_a_subtask(
            feature_flow(job, total, sink), f"s3://{s3.bucket}/kill", before_kill=store.read_lease,
            pick=lambda names: next(n for n in names if n.startswith(f"{job}/window")))
    assert killed.startswith(f"{job}/window")
    assert_feature_reference(sink.table(), total)
    assert lease is not None and lease.epoch >= 1, "the running job held no lease on s3"
    keys = s3.keys(f"kill/{job}/")
    assert f"kill/{job}/_lease.json" not in keys, "the ended job kept its lease"
    manifests = [k for k in keys if k.endswith("/_manifest.json")]
    assert manifests and any(k.endswith(".arrow") for k in keys), keys
    assert f"kill/{job}/checkpoint-history.jsonl" in keys and f"kill/{job}/events.jsonl" in keys
    assert not [k for k in keys if k.endswith(".tmp")], "a temporary object was left behind"
    assert store.completed_ids() == [int(k.split("/")[-2][4:]) for k in manifests]
    assert all(not store.verify(c) for c in store.completed_ids())
    assert {h["checkpoint_id"] for h in store.history()} >= set(store.completed_ids())
    assert result.metrics["restored_from"][0] in {h["checkpoint_id"] for h in store.history()}
    assert SECRET_KEY not in caplog.text and quote(SECRET_KEY, safe="") not in caplog.text


def test_resume_from_s3_after_the_job_failed_for_good_and_the_cli_verifies_it(s3: S3Server,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Everything in the URI this time: the endpoint in the query, the credentials as its user info."""
    from onceflow.runtime.cli import main

    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    job, total = "s3-resume", 60_000
    storage = s3.uri("resume").replace("s3://", f"s3://{ACCESS_KEY}:{quote(SECRET_KEY, safe='')}@")
    sink = of.sinks.TestingSink()
    config = of.CheckpointConfig(interval_s=0.2, storage=storage)
    with pytest.raises(of.JobFailedError, match="resume=True") as failed:
        of.run(feature_flow(job, total, sink, rate=10_000, fail_after=FailsOnceACheckpointCompleted(storage, job)),
               parallelism=2, checkpoint=config,
               restart=of.RestartStrategy.no_restart(), timeout_s=60)
    assert quote(SECRET_KEY, safe="") not in str(failed.value) and SECRET_KEY not in str(failed.value)
    store = CheckpointStorage(storage, job)
    assert SECRET_KEY not in repr(store) and quote(SECRET_KEY, safe="") not in repr(store)
    newest = store.completed_ids()[-1]
    result = of.run(feature_flow(job, total, sink), parallelism=2, checkpoint=config, resume=True, timeout_s=60)
    assert result.metrics["restored_from"][0] == newest
    assert_feature_reference(sink.table(), total)

    ids = store.completed_ids()
    runner = CliRunner()
    listed = runner.invoke(main, ["checkpoints", "list", storage], env={"COLUMNS": "200"})
    assert listed.exit_code == 0, listed.output
    assert f"job {job}: retained {ids}" in listed.output
    verified = runner.invoke(main, ["checkpoints", "verify", storage, job], env={"COLUMNS": "300"})
    assert verified.exit_code == 0, verified.output
    assert f"job {job} checkpoint {ids[-1]}: ok" in verified.output
    manifest = store.manifest(ids[-1])
    assert manifest is not None
    path = next(iter(next(iter(manifest["tasks"].values()))["states"].values()))["path"]
    bucket, _, key = path.partition("/")
    s3.client().put_object(Bucket=bucket, Key=key, Body=b"not the state")
    damaged = runner.invoke(main, ["checkpoints", "verify", storage, job], env={"COLUMNS": "300"})
    assert damaged.exit_code == 1 and path in damaged.output, damaged.output
    for output in (listed.output, verified.output, damaged.output):
        assert SECRET_KEY not in output and quote(SECRET_KEY, safe="") not in output
    with pytest.raises(CheckpointStorageError) as error:
        CheckpointStorage(storage.replace(s3.bucket, "no-such-bucket"), job)
    assert quote(SECRET_KEY, safe="") not in str(error.value) and SECRET_KEY not in str(error.value)


def test_an_s3_outage_costs_checkpoints_not_the_job(s3_environment: S3Server) -> None:
    """moto keeps its objects in memory: the server comes back empty (but for the bucket), harsher than S3."""
    s3, job, total = s3_environment, "s3-outage", 120_000
    storage = f"s3://{s3.bucket}/outage"
    sink = of.sinks.TestingSink()
    handle = of.submit(feature_flow(job, total, sink, rate=10_000), parallelism=2,
                       checkpoint=of.CheckpointConfig(interval_s=0.2, storage=storage, tolerable_failures=1_000))
    store = CheckpointStorage(storage, job)
    try:
        wait_until(lambda: len(store.completed_ids()) >= 2, timeout_s=60, what="two checkpoints")
        back = max(store.completed_ids())
        s3.stop()
        away = time.monotonic()
        # The outage under test lasts this long, whatever the job does meanwhile: longer than the S3 client's
        # retries of one request (about 6 s against a closed port), so that checkpoints fail.
        time.sleep(OUTAGE_S)
        s3.start()
        assert handle.phase is of.JobPhase.RUNNING, f"the outage ended the run: {handle.phase}"
        wait_until(lambda: max(store.completed_ids(), default=0) > back, timeout_s=30,
                   what="a checkpoint after the outage")
        outage_s = time.monotonic() - away
    finally:
        result = handle.wait(timeout_s=120)
    assert outage_s >= OUTAGE_S
    assert result.metrics["restarts"] == 0, "the outage restarted the job"
    assert result.metrics["checkpoints_failed"] >= 1, "no checkpoint failed: the store was not away"
    assert_feature_reference(sink.table(), total)
