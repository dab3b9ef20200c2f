"""`dsr1 monitor init`'s files: Prometheus config and rules, Grafana dashboard and provisioning.

Layout of DIR (the compose file in deploy/ mounts it as is):
  prometheus.yml                         scrape config; rule_files relative to it
  rules/dsr1.rules.yml                   recording rules and alerts
  grafana/dashboards/dsr1.json           the dashboard
  grafana/provisioning/datasources/dsr1.yml
  grafana/provisioning/dashboards/dsr1.yml
Each file is written atomically; files of ours are replaced, anything else in DIR is left alone.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from dsr1.errors import UsageError
from dsr1.fsutil import atomic_write_bytes
from dsr1.monitoring import dashboard, prometheus
from dsr1.monitoring.deployment import Deployment

DASHBOARD_FILE = "grafana/dashboards/dsr1.json"


@dataclass
class Options:
    scrape_interval: str = "5s"
    ttft_slo_s: float = 2.0
    api_key_file: Path | None = None
    prometheus_url: str = "http://localhost:9090"  # as Grafana reaches Prometheus
    dashboards_path: str | None = None  # where Grafana finds DIR/grafana/dashboards (None: that folder, absolute)


def check(o: Options) -> None:
    if not re.fullmatch(r"\d+(ms|s|m)", o.scrape_interval) or o.scrape_interval.startswith("0"):
        raise UsageError(f"--scrape-interval {o.scrape_interval!r}", hint="a Prometheus duration, e.g. 5s, 15s or 1m")
    if not o.ttft_slo_s > 0:
        raise UsageError("--ttft-slo must be above 0 seconds", hint="e.g. --ttft-slo 2")
    if o.api_key_file is not None and not o.api_key_file.expanduser().is_file():
        raise UsageError(f"--api-key-file {o.api_key_file} is not a file", hint="pass the file dsr1 serve reads")


def write(out_dir: Path, d: Deployment, o: Options) -> list[Path]:
    """Write every file for deployment `d` under `out_dir`; returns their paths."""
    check(o)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{out_dir} exists and is not a directory", hint="pick another DIR")
    files = {
        "prometheus.yml": prometheus.dump(prometheus.config(d, scrape_interval=o.scrape_interval,
                                                           api_key_file=o.api_key_file)),
        prometheus.RULES_FILE: prometheus.dump(prometheus.rules(d, ttft_slo_s=o.ttft_slo_s)),
        DASHBOARD_FILE: json.dumps(dashboard.build(d), indent=2) + "\n",
        "grafana/provisioning/datasources/dsr1.yml": yaml.safe_dump({"apiVersion": 1, "datasources": [{
            "name": "dsr1 Prometheus", "uid": dashboard.DATASOURCE_UID, "type": "prometheus", "access": "proxy",
            "url": o.prometheus_url, "isDefault": True, "jsonData": {"timeInterval": o.scrape_interval}}]},
            sort_keys=False),
        "grafana/provisioning/dashboards/dsr1.yml": yaml.safe_dump({"apiVersion": 1, "providers": [{
            "name": "dsr1", "type": "file", "folder": "dsr1", "allowUiUpdates": False,
            "options": {"path": o.dashboards_path or str((out_dir / "grafana/dashboards").resolve())}}]},
            sort_keys=False),
    }
    written = []
    for rel, text in files.items():
        path = out_dir / rel
        atomic_write_bytes(path, text.encode())
        written.append(path)
    return written
