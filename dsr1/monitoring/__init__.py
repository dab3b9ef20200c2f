"""Monitoring for a running deployment: what `dsr1 monitor init` writes (Prometheus config and
alert rules, a Grafana dashboard and its provisioning) and the per-node agent of a multi-node
deployment (GPU metrics and latency toward the head)."""
