"""Metrics reach Ray's Prometheus endpoint, every one the Grafana dashboard queries (a fresh Ray in a subprocess)."""

from __future__ import annotations

import importlib.resources
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

METRIC = re.compile(r"ray_onceflow_\w+")
HISTOGRAM_SERIES = ("_bucket", "_count", "_sum")
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

# The job checkpoints every 0.3 s. Its one-subtask map_batches step stalls once for 3 s on its tenth batch:
# the sources upstream wait for credits (back pressure), the checkpoint in flight expires after 1.5 s, and
# with no failed checkpoint tolerated the job restarts from the last completed one; the flag file keeps
# the restored attempt from stalling again. Then the script scrapes the endpoint until every name in
# argv[1] (a JSON list) is there (a histogram's base name: its series), or a deadline passes, and prints
# the names it found as JSON.
SCRIPT = textwrap.dedent("""
    import json, os, socket, sys, tempfile, time, urllib.request
    import ray
    import onceflow as of
    from onceflow.testing.workload import feature_events

    wanted = set(json.loads(sys.argv[1]))
    flag = os.path.join(tempfile.mkdtemp(), "stalled")
    seen = [0]

    def stall_once(batch):
        seen[0] += 1
        if seen[0] == 10 and not os.path.exists(flag):
            open(flag, "w").close()
            time.sleep(3.0)
        return batch

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ray.init(address="local", include_dashboard=False, _metrics_export_port=port, logging_level="ERROR")
    flow = of.Dataflow("prom")
    events = flow.source(of.sources.GeneratorSource(feature_events, total=2_000_000, batch_size=50_000,
                                                    max_events_per_s=1_000_000),
                         watermark=of.BoundedOutOfOrderness("event_time"))
    (events.map_batches(stall_once, name="stall", parallelism=1)
     .key_by("user_id").window(of.windows.Tumbling(size_ms=10_000)).aggregate(n=of.agg.count())
     .sink(of.sinks.TestingSink()))
    result = of.run(flow, parallelism=2,
                    checkpoint=of.CheckpointConfig(interval_s=0.3, timeout_s=1.5, tolerable_failures=0,
                                                   storage=tempfile.mkdtemp()),
                    restart=of.RestartStrategy.fixed_delay(attempts=3, delay_s=0.1))
    print("restarts", result.metrics["restarts"], "checkpoints_failed", result.metrics["checkpoints_failed"],
          file=sys.stderr)
    found = set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        except OSError:
            text = ""
        found = {line.split("{")[0] for line in text.splitlines() if line.startswith("ray_onceflow_")}
        if all(n in found or all(n + s in found for s in ("_bucket", "_count", "_sum")) for n in wanted):
            break
        time.sleep(0.5)
    print(json.dumps(sorted(found)))
""")


def load_dashboard() -> dict[str, Any]:
    """The dashboard as installed: package data of onceflow.runtime."""
    resource = importlib.resources.files("onceflow.runtime") / "grafana" / "onceflow.json"
    dashboard: dict[str, Any] = json.loads(resource.read_text())
    return dashboard


def queried_metrics(dashboard: dict[str, Any]) -> set[str]:
    """Every ``ray_onceflow_*`` name a panel's query reads."""
    return {name for panel in dashboard["panels"] for target in panel["targets"]
            for name in METRIC.findall(target["expr"])}


def present(name: str, found: set[str]) -> bool:
    """Whether ``name`` is on the endpoint (a histogram's base name: its series are)."""
    return name in found or all(name + suffix in found for suffix in HISTOGRAM_SERIES)


def test_the_dashboard_queries_onceflow_metrics_of_the_chosen_jobs_from_the_chosen_datasource() -> None:
    dashboard = load_dashboard()
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["job"]["datasource"] == DATASOURCE
    assert variables["job"]["query"]["query"] == "label_values(ray_onceflow_records_out_total, job)"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["title"], panel
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
            expr = target["expr"]
            names = METRIC.findall(expr)
            assert names, (panel["title"], expr)
            # Every metric read is narrowed to the jobs chosen: name{job=~"$job"}.
            assert expr.count('{job=~"$job"}') == len(names), (panel["title"], expr)
    titles = " ".join(panel["title"].lower() for panel in dashboard["panels"])
    for topic in ("records in", "records out", "back pressure", "watermark lag", "checkpoint duration",
                  "checkpoint alignment", "checkpoint size", "checkpoints completed and failed", "restarts"):
        assert topic in titles, topic


def test_every_metric_the_dashboard_queries_reaches_the_prometheus_endpoint(tmp_path: Path) -> None:
    wanted = queried_metrics(load_dashboard())
    # The ones the dashboard must read, whatever else it does (a panel dropped by mistake shows here).
    assert {"ray_onceflow_records_in_total", "ray_onceflow_records_out_total",
            "ray_onceflow_backpressure_seconds_total", "ray_onceflow_watermark_milliseconds",
            "ray_onceflow_checkpoint_duration_seconds_bucket", "ray_onceflow_checkpoint_alignment_seconds_bucket",
            "ray_onceflow_checkpoint_size_bytes", "ray_onceflow_checkpoints_completed_total",
            "ray_onceflow_checkpoints_failed_total", "ray_onceflow_restarts_total"} <= wanted
    script = tmp_path / "prom.py"
    script.write_text(SCRIPT)
    out = subprocess.run([sys.executable, str(script), json.dumps(sorted(wanted))], capture_output=True, text=True,
                         timeout=240, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    found = set(json.loads(out.stdout.strip().splitlines()[-1]))
    missing = sorted(name for name in wanted if not present(name, found))
    assert not missing, (missing, sorted(found), out.stderr[-2000:])
