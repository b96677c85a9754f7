"""The onceflow command: run with progress, checkpoints list/show, bench."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

import onceflow as of
from onceflow.runtime.cli import main
from onceflow.testing.workload import feature_events

pytestmark = pytest.mark.usefixtures("ray_session")


def checkpointed_job(storage: Path) -> of.JobResult:
    flow = of.Dataflow("cli-job")
    events = flow.source(of.sources.GeneratorSource(feature_events, total=100_000, batch_size=5_000,
                                                    max_events_per_s=100_000),
                         watermark=of.BoundedOutOfOrderness("event_time"))
    (events.key_by("user_id").window(of.windows.Tumbling(size_ms=10_000)).aggregate(n=of.agg.count())
     .sink(of.sinks.TestingSink()))
    return of.run(flow, parallelism=2, checkpoint=of.CheckpointConfig(interval_s=0.2, storage=str(storage)))


def test_checkpoints_list_and_show(tmp_path: Path) -> None:
    result = checkpointed_job(tmp_path)
    latest = result.metrics["latest_checkpoint"]
    runner = CliRunner()
    listed = runner.invoke(main, ["checkpoints", "list", str(tmp_path)], env={"COLUMNS": "200"})
    assert listed.exit_code == 0, listed.output
    assert "job cli-job" in listed.output and f"{latest} " in listed.output
    shown = runner.invoke(main, ["checkpoints", "show", str(tmp_path), "cli-job"], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    assert f"checkpoint {latest}" in shown.output
    for task in ("source_0/0", "source_0/1", "window_2/0", "window_2/1"):
        assert task in shown.output
    missing = runner.invoke(main, ["checkpoints", "show", str(tmp_path), "no-such-job"])
    assert missing.exit_code != 0 and "no complete checkpoint" in missing.output
    verified = runner.invoke(main, ["checkpoints", "verify", str(tmp_path)], env={"COLUMNS": "200"})
    assert verified.exit_code == 0, verified.output
    assert f"job cli-job checkpoint {latest}: ok" in verified.output
    state = next((tmp_path / "cli-job" / f"chk-{latest:08d}").glob("window_2-0.*.arrow"))
    state.write_bytes(state.read_bytes()[:-1] + b"?")  # one byte changed, the size kept
    damaged = runner.invoke(main, ["checkpoints", "verify", str(tmp_path), "cli-job"], env={"COLUMNS": "400"})
    assert damaged.exit_code == 1 and f"checkpoint {latest}: damaged" in damaged.output
    assert str(state) in damaged.output and "CRC-32" in damaged.output


def test_run_shows_live_progress(tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent("""
        import sys
        import onceflow as of
        from onceflow.testing.workload import feature_events

        flow = of.Dataflow("cli-run")
        events = flow.source(of.sources.GeneratorSource(feature_events, total=int(sys.argv[1]), batch_size=5_000,
                                                        max_events_per_s=50_000))
        events.sink(of.sinks.TestingSink())
        print("events in:", of.run(flow).metrics["events_in"])
    """))
    outcome = CliRunner().invoke(main, ["run", str(script), "60000"], env={"COLUMNS": "200"})
    assert outcome.exit_code == 0, outcome.output
    assert "onceflow job 'cli-run'" in outcome.output
    assert "events in: 60000" in outcome.output


def test_bench_names_the_benchmarks() -> None:
    outcome = CliRunner().invoke(main, ["bench", "nope"])
    assert outcome.exit_code != 0
    assert "feature_window" in outcome.output and "checkpointing" in outcome.output
