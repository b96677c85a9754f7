"""Metrics reach Ray's Prometheus endpoint (a fresh Ray in a subprocess, with a known metrics port)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent("""
    import socket, tempfile, time, urllib.request
    import ray
    import onceflow as of
    from onceflow.testing.workload import feature_events

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ray.init(address="local", include_dashboard=False, _metrics_export_port=port, logging_level="ERROR")
    flow = of.Dataflow("prom")
    events = flow.source(of.sources.GeneratorSource(feature_events, total=3_000_000, batch_size=50_000,
                                                    max_events_per_s=1_000_000),
                         watermark=of.BoundedOutOfOrderness("event_time"))
    (events.key_by("user_id").window(of.windows.Tumbling(size_ms=10_000)).aggregate(n=of.agg.count())
     .sink(of.sinks.TestingSink()))
    of.run(flow, parallelism=2, checkpoint=of.CheckpointConfig(interval_s=0.5, storage=tempfile.mkdtemp()))
    found = set()
    for _ in range(60):
        time.sleep(1)
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        except OSError:
            continue
        found = {line.split("{")[0] for line in text.splitlines() if "onceflow_" in line and line[0] != "#"}
        if {"ray_onceflow_records_out_total", "ray_onceflow_checkpoints_completed_total"} <= found:
            break
    print(sorted(found))
""")


def test_counters_and_histograms_reach_the_prometheus_endpoint(tmp_path: Path) -> None:
    script = tmp_path / "prom.py"
    script.write_text(SCRIPT)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240, check=True)
    for name in ("ray_onceflow_records_out_total", "ray_onceflow_checkpoints_completed_total",
                 "ray_onceflow_checkpoint_duration_seconds_count", "ray_onceflow_checkpoint_size_bytes"):
        assert name in out.stdout, out.stdout[-2000:]
