"""prometheus.yml and the alert rules for one deployment (dsr1.monitoring.signals has the queries)."""

from __future__ import annotations

from pathlib import Path

import yaml

from dsr1.monitoring import signals
from dsr1.monitoring.deployment import Deployment

RULES_FILE = "rules/dsr1.rules.yml"


def config(d: Deployment, *, scrape_interval: str, api_key_file: Path | None) -> dict:
    """The scrape configuration: dsr1's front (its /metrics carries the engine's own series too)
    and, on multi-node, every node's agent."""
    front = {"job_name": "dsr1", "metrics_path": "/metrics", "scheme": d.scheme,
             "static_configs": [{"targets": [d.target], "labels": {"model": d.model, "engine": d.engine}}]}
    if api_key_file is not None:
        # Prometheus reads the key from the same file the server does; it is never copied here.
        front["authorization"] = {"type": "Bearer", "credentials_file": str(api_key_file.expanduser().resolve())}
    jobs = [front]
    if d.nodes:
        jobs.append({"job_name": "dsr1-nodes", "metrics_path": "/metrics",
                     "static_configs": [{"targets": [n["address"]], "labels": {"node_rank": str(n["rank"])}}
                                        for n in sorted(d.nodes, key=lambda n: n["rank"])]})
    return {"global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
            "rule_files": [RULES_FILE], "scrape_configs": jobs}


def rules(d: Deployment, *, ttft_slo_s: float) -> dict:
    recs = [{"record": r.record, "expr": r.expr} for r in signals.recordings(d)]
    alerts = [{"alert": a.name, "expr": a.expr, "for": a.for_, "labels": {"severity": a.severity},
               "annotations": {"summary": a.summary}} for a in signals.alerts(d, ttft_slo_s=ttft_slo_s)]
    return {"groups": [{"name": "dsr1-recorded", "rules": recs}, {"name": "dsr1-alerts", "rules": alerts}]}


def dump(obj: dict) -> str:
    return yaml.safe_dump(obj, sort_keys=False, default_flow_style=False, width=120)
