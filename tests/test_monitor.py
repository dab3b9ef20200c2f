"""`dsr1 monitor init` against real components: a real `dsr1 serve`, real Prometheus (the
Debian package, which .ci/run installs) scraping it while `dsr1 bench` loads it, promtool on
the generated files, and Grafana's SDK reading the dashboard back.

The one test double is NVML (tests/fake_nvml.py, the seam doctor's tests use): no GPU here.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client import generate_latest

from dsr1.bench.server import free_port, wait_healthy
from dsr1.monitoring import dashboard, prometheus, setup, signals
from dsr1.monitoring.deployment import Deployment
from dsr1.serve.gpustats import GpuCollector
from dsr1.serve.metrics import Metrics
from tests.fake_nvml import FakeNvml, load_snapshot

REPO = Path(__file__).resolve().parent.parent


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} not found: install the Debian package `prometheus` (scripts/setup.sh does as root)"
    return path


def _env(home: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "DSR1_HOME": str(home)}
    env.pop("DSR1_API_KEY", None)
    return env


# -- NVML through the seam ------------------------------------------------------------------------

def _nvml(snapshot: str, utilization: int | None = 37) -> FakeNvml:
    snap = load_snapshot(snapshot)
    for g in snap["nvml"].get("gpus", []):
        if utilization is not None:
            g["utilization"] = utilization
    return FakeNvml(snap)


def _samples(m: Metrics) -> dict[tuple[str, str], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, s.labels.get("gpu", "")): s.value
            for f in text_string_to_metric_families(m.render().decode()) for s in f.samples}


def test_gpu_metrics_come_from_nvml_per_gpu():
    snap = load_snapshot("h100x8-ib")
    m = Metrics("m", nvml=_nvml("h100x8-ib"))
    got = _samples(m)
    for i, g in enumerate(snap["nvml"]["gpus"]):
        assert got[("dsr1_gpu_utilization_ratio", str(i))] == 0.37
        assert got[("dsr1_gpu_memory_total_bytes", str(i))] == g["memory_total"]
        assert got[("dsr1_gpu_memory_used_bytes", str(i))] == g["memory_total"] - g["memory_free"]
        assert got[("dsr1_gpu_temperature_celsius", str(i))] == g["temperature"]
    assert sum(k[0] == "dsr1_gpu_temperature_celsius" for k in got) == 8
    assert f'uuid="{snap["nvml"]["gpus"][0]["uuid"]}"' in m.render().decode()
    assert m.features()["gpus"] == 8


def test_no_gpu_means_no_gpu_series_not_zeros():
    m = Metrics("m", nvml=_nvml("driver-missing"))
    assert "dsr1_gpu_" not in m.render().decode()
    assert m.features()["gpus"] == 0
    d = Deployment("http://127.0.0.1:8000", "m", "embedded", gpus=0)
    assert not any("gpu" in q for q in signals.all_queries(d))
    assert "Dsr1GpuMemoryHigh" not in [a.name for a in signals.alerts(d, ttft_slo_s=2)]


def test_an_unsupported_nvml_query_drops_that_series_only():
    class NoUtil(FakeNvml):
        def nvmlDeviceGetUtilizationRates(self, h):
            self._unsupported()

    c = GpuCollector(NoUtil(load_snapshot("rtx4090")))
    names = {f.name: len(f.samples) for f in c.collect()}
    assert names["dsr1_gpu_utilization_ratio"] == 0 and names["dsr1_gpu_temperature_celsius"] == 1


# -- the generated files ------------------------------------------------------------------------

def _full() -> Deployment:
    return Deployment("http://10.0.0.1:8000", "r1", "vllm", gpus=8, prefix_cache=True, speculative=True,
                      nodes=[{"rank": 0, "address": "10.0.0.1:8101"}, {"rank": 1, "address": "10.0.0.2:8101"}])


@pytest.mark.parametrize("engine", ["embedded", "vllm", "sglang", "llamacpp"])
def test_promtool_accepts_config_and_rules_and_grafana_sdk_reads_the_dashboard(tmp_path, engine):
    d = _full()
    d.engine = engine
    key = tmp_path / "key"
    key.write_text("secret\n")
    setup.write(tmp_path / "mon", d, setup.Options(api_key_file=key))
    promtool = _tool("promtool")
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", prometheus.RULES_FILE]):
        r = subprocess.run([promtool, *args], cwd=tmp_path / "mon", capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
    cfg = yaml.safe_load((tmp_path / "mon/prometheus.yml").read_text())
    front, nodes = cfg["scrape_configs"]
    assert front["static_configs"][0]["targets"] == ["10.0.0.1:8000"]
    assert front["authorization"]["credentials_file"] == str(key.resolve())
    assert "secret" not in (tmp_path / "mon/prometheus.yml").read_text()
    assert [c["targets"] for c in nodes["static_configs"]] == [["10.0.0.1:8101"], ["10.0.0.2:8101"]]
    dash = json.loads((tmp_path / "mon" / setup.DASHBOARD_FILE).read_text())
    assert dashboard.validate(dash) == []
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert exprs == signals.all_queries(d)
    if engine != "embedded":
        assert any(f"{engine}:" in e for e in exprs)  # the engine's own names have panels
    prov = yaml.safe_load((tmp_path / "mon/grafana/provisioning/datasources/dsr1.yml").read_text())
    # panels read the datasource variable; its default is the provisioned datasource
    assert dash["panels"][1]["datasource"]["uid"] == "${datasource}"
    (var,) = dash["templating"]["list"]
    assert (var["type"], var["query"]) == ("datasource", "prometheus")
    assert prov["datasources"][0]["uid"] == dashboard.DATASOURCE_UID == var["current"]["value"]
    board = yaml.safe_load((tmp_path / "mon/grafana/provisioning/dashboards/dsr1.yml").read_text())
    assert board["providers"][0]["options"]["path"] == str((tmp_path / "mon/grafana/dashboards").resolve())


@pytest.mark.parametrize("model,profile,engine,gpus", [("r1", "enterprise", "sglang", 8),
                                                       ("r1-distill-qwen-7b", "pro", "vllm", 4),
                                                       ("r1-distill-qwen-1.5b", "cpu", "embedded", 0)])
def test_monitor_init_from_the_plan_needs_no_server(tmp_path, model, profile, engine, gpus):
    """`dsr1 monitor init DIR --model MODEL`: the files for what `dsr1 serve MODEL` will run, written before
    it runs (nothing listens on the URL), with the engine's own metric names, and promtool accepts them."""
    out = tmp_path / "mon"
    r = subprocess.run([sys.executable, "-m", "dsr1", "monitor", "init", str(out), "--model", model, "--profile",
                        profile, "--url", "http://127.0.0.1:9", "--json"], capture_output=True, text=True,
                       env=_env(tmp_path / "home"), timeout=120)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)["deployment"]
    assert (d["engine"], d["gpus"], d["url"]) == (engine, gpus, "http://127.0.0.1:9")
    promtool = _tool("promtool")
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", prometheus.RULES_FILE]):
        c = subprocess.run([promtool, *args], cwd=out, capture_output=True, text=True)
        assert c.returncode == 0, c.stdout + c.stderr
    dash = json.loads((out / setup.DASHBOARD_FILE).read_text())
    assert dashboard.validate(dash) == []
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p.get("targets", []))
    if engine != "embedded":
        assert f"{engine}:" in exprs
    assert ("DCGM" in exprs or "gpu" in exprs.lower()) == (gpus > 0)


def test_dashboard_validation_catches_a_broken_file():
    dash = dashboard.build(_full())
    dash["panels"][1]["gridPos"]["w"] = 30
    dash["panels"][2]["targets"] = []
    dash["uid"] = "x"
    problems = dashboard.validate(dash)
    assert len(problems) == 3, problems


def fired(at: str, name: str, labels: dict, summary: str) -> dict:
    return {"eval_time": at, "alertname": name,
            "exp_alerts": [{"exp_labels": labels, "exp_annotations": {"summary": summary}}]}


def test_alerts_fire_on_the_series_they_watch(tmp_path):
    """promtool's rule unit tests: each alert fires when its signal crosses the line, and not before."""
    d = _full()
    d.engine = "embedded"
    mon = tmp_path / "mon"
    setup.write(mon, d, setup.Options(ttft_slo_s=2.0))
    tests = {"rule_files": [str(mon / prometheus.RULES_FILE)], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [
            {"series": 'up{job="dsr1",instance="a:8000"}', "values": "1 1 0 0 0"},
            {"series": 'dsr1_requests_total{endpoint="/v1/completions",status="200",instance="a:8000"}',
             "values": "0+60x15"},
            {"series": 'dsr1_requests_total{endpoint="/v1/completions",status="429",instance="a:8000"}',
             "values": "0+30x15"},
            {"series": 'dsr1_time_to_first_token_seconds_bucket{le="2.5",instance="a:8000"}', "values": "0+10x15"},
            {"series": 'dsr1_time_to_first_token_seconds_bucket{le="5.0",instance="a:8000"}', "values": "0+60x15"},
            {"series": 'dsr1_time_to_first_token_seconds_bucket{le="+Inf",instance="a:8000"}', "values": "0+60x15"},
            {"series": 'dsr1_kv_cache_usage_ratio{instance="a:8000"}', "values": "0.5 0.99x15"},
            {"series": 'dsr1_gpu_memory_used_bytes{gpu="0",instance="a:8000"}', "values": "79x15"},
            {"series": 'dsr1_gpu_memory_total_bytes{gpu="0",instance="a:8000"}', "values": "80x15"},
            {"series": 'up{job="dsr1-nodes",instance="b:8101"}', "values": "1 1 1 0 0"},
            {"series": 'dsr1_node_head_reachable{node_rank="1",instance="b:8101"}', "values": "1 0 0 0 0"},
        ],
        "alert_rule_test": [
            {"eval_time": "1m", "alertname": "Dsr1ServerDown", "exp_alerts": []},
            fired("4m", "Dsr1ServerDown", {"severity": "critical", "job": "dsr1", "instance": "a:8000"},
                  "dsr1 at a:8000 does not answer /metrics"),
            # 30 429s a minute against 60 answered: a third refused
            fired("12m", "Dsr1Rejecting", {"severity": "warning"},
                  "33.33% of requests get 429: raise --max-concurrent/--max-queue or add capacity"),
            fired("12m", "Dsr1TtftOverSlo", {"severity": "warning"}, "TTFT p99 is 4.97s, over the 2 s objective"),
            {"eval_time": "5m", "alertname": "Dsr1KvCacheFull", "exp_alerts": []},  # full, but not for 10m yet
            fired("13m", "Dsr1KvCacheFull", {"severity": "warning"},
                  "KV cache 99% full: requests queue; lower context or add memory"),
            fired("13m", "Dsr1GpuMemoryHigh", {"severity": "warning", "gpu": "0", "instance": "a:8000"},
                  "GPU 0 on a:8000 is 98.75% full"),
            fired("4m", "Dsr1NodeDown", {"severity": "critical", "job": "dsr1-nodes", "instance": "b:8101"},
                  "the node agent on b:8101 does not answer: the node is down"),
            fired("3m", "Dsr1NodeUnreachable", {"severity": "critical", "node_rank": "1", "instance": "b:8101"},
                  "node 1 cannot reach the head on the NCCL interface"),
        ],
    }]}
    (tmp_path / "t.yml").write_text(yaml.safe_dump(tests, sort_keys=False))
    r = subprocess.run([_tool("promtool"), "test", "rules", str(tmp_path / "t.yml")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# -- end to end: serve, monitor init, Prometheus, bench ---------------------------------------------

class Prometheus:
    def __init__(self, config: Path, data: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = data.parent / "prometheus.log"
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen([_tool("prometheus"), f"--config.file={config}",
                                          f"--storage.tsdb.path={data}", f"--web.listen-address=127.0.0.1:{self.port}"],
                                         stdout=f, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError("prometheus did not start:\n" + self.log.read_text()[-2000:])

    def query(self, expr: str) -> list[dict]:
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10).json()
        assert r["status"] == "success", (expr, r)
        return r["data"]["result"]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def _serve(model_dir: Path, home: Path, *args: str):
    port = free_port()
    log = home / "serve.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "dsr1", "serve", str(model_dir), "--port", str(port), *args],
                                env=_env(home), cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc, log, timeout=300)
    return proc, url


def _monitor(*args, home: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsr1", "monitor", "init", *map(str, args)], env=_env(home),
                          cwd=REPO, capture_output=True, text=True, timeout=60)


@pytest.mark.slow
def test_every_panel_and_alert_query_returns_data_while_bench_runs(demo_model_dir, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    key = tmp_path / "api-key"
    key.write_text("k-monitor-test\n")
    proc, url = _serve(demo_model_dir, home, "--speculative", "ngram", "--max-concurrent", "4",
                       "--api-key-file", str(key))
    prom = None
    try:
        r = _monitor(tmp_path / "mon", "--url", url, home=home)
        assert r.returncode == 9 and "--api-key-file" in r.stderr, r.stderr  # a keyed server, no key given
        r = _monitor(tmp_path / "mon", "--url", url, "--api-key-file", key, "--scrape-interval", "1s", "--json",
                     home=home)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["deployment"]["engine"] == "embedded" and out["deployment"]["speculative"] is True
        mon = tmp_path / "mon"
        promtool = _tool("promtool")
        for args in (["check", "config", "prometheus.yml"], ["check", "rules", prometheus.RULES_FILE]):
            c = subprocess.run([promtool, *args], cwd=mon, capture_output=True, text=True)
            assert c.returncode == 0, c.stdout + c.stderr
        prom = Prometheus(mon / "prometheus.yml", tmp_path / "tsdb")
        bench = subprocess.Popen(
            [sys.executable, "-m", "dsr1", "bench", "--url", url, "--api-key", "k-monitor-test", "--tokenizer",
             str(demo_model_dir), "--concurrency", "4", "--duration", "25", "--input-len", "64", "--output-len",
             "24", "--out", str(tmp_path / "bench"), "--no-plots", "--json"],
            env=_env(home), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # bench's random-token prompts give prompt lookup nothing to draft from; text that repeats does
        stop = threading.Event()

        def repeat_prompts() -> None:
            import openai

            client = openai.OpenAI(base_url=url + "/v1", api_key="k-monitor-test")
            text = "one two three four five six seven eight nine ten " * 6
            while not stop.is_set():
                client.completions.create(model=out["deployment"]["model"], prompt=text, max_tokens=24,
                                          temperature=0)

        repeater = threading.Thread(target=repeat_prompts, daemon=True)
        repeater.start()
        time.sleep(18)  # a few rate windows' worth of 1 s scrapes under load
        dash = json.loads((mon / setup.DASHBOARD_FILE).read_text())
        panels = {p["title"]: p for p in dash["panels"] if p["type"] != "row"}
        assert "Speculative acceptance rate" in panels and "Prefix-cache hit rate" in panels
        assert not any("GPU" in t for t in panels)  # CPU: absent, not zero
        rules = yaml.safe_load((mon / prometheus.RULES_FILE).read_text())
        checks = [(p["title"], p["fieldConfig"]["defaults"]["unit"], t["expr"])
                  for p in panels.values() for t in p["targets"]]
        checks += [("rule " + r["record"], "", r["expr"]) for r in rules["groups"][0]["rules"]]
        # an alert's expression is empty while it does not fire; what it compares must have data
        checks += [("alert " + a["alert"], "", a["expr"].rsplit(" ", 2)[0]) for a in rules["groups"][1]["rules"]]
        empty, implausible = [], []
        for title, unit, expr in checks:
            result = prom.query(expr)
            if not result:
                empty.append(f"{title}: {expr}")
                continue
            for s in result:
                v = float(s["value"][1])
                ok = math.isfinite(v) and v >= 0 and (v <= 1 if unit == "percentunit" else True)
                if not ok:
                    implausible.append(f"{title}: {expr} = {v}")
        stop.set()
        repeater.join(60)
        bench_out, bench_err = bench.communicate(timeout=120)
        assert bench.returncode == 0, bench_err[-2000:]
        assert not empty, "queries without data:\n" + "\n".join(empty)
        assert not implausible, "\n".join(implausible)
        # the numbers mean what they say: requests went through and tokens came out
        assert float(prom.query(panels["Output tokens per second"]["targets"][0]["expr"])[0]["value"][1]) > 1
        assert float(prom.query('up{job="dsr1"}')[0]["value"][1]) == 1
        assert float(prom.query("dsr1:request_rate:5m")[0]["value"][1]) > 0
    finally:
        if prom:
            prom.stop()
        proc.terminate()
        proc.wait(30)


def test_monitor_init_without_a_server_says_how_to_fix_it(tmp_path):
    r = _monitor(tmp_path / "mon", "--url", f"http://127.0.0.1:{free_port()}", home=tmp_path)
    assert r.returncode == 6 and "dsr1 serve" in r.stderr, r.stderr
    assert not (tmp_path / "mon").exists()  # nothing half-written
    r = _monitor(tmp_path / "mon", "--scrape-interval", "often", home=tmp_path)
    assert r.returncode == 2 and "--scrape-interval" in r.stderr


# -- multi-node: node agents on one machine -----------------------------------------------------------

def test_node_agents_report_latency_and_prometheus_scrapes_every_node(tmp_path):
    """Rank 0's agent and a worker's, both real HTTP servers on 127.0.0.1: the worker measures its
    round trip to the head and announces itself; the head lists both; Prometheus, configured by
    monitor init from that list, gets data for every node panel and node alert."""
    from dsr1.monitoring.nodeagent import NodeAgent

    head = NodeAgent(0, bind="127.0.0.1", port=0, nvml=_nvml("h100x8-ib")).start()
    worker = NodeAgent(1, bind="127.0.0.1", port=0, head=("127.0.0.1", head.port), source="127.0.0.1",
                       interval=0.5, nvml=_nvml("h100x8-ib")).start()
    prom = None
    try:
        deadline = time.monotonic() + 10
        while len(head.nodes()) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [n["rank"] for n in head.nodes()] == [0, 1]
        assert head.nodes()[1]["address"] == f"127.0.0.1:{worker.port}"
        rtt = worker.probe()
        assert rtt is not None and 0 < rtt < 1
        d = Deployment("http://127.0.0.1:1", "r1", "vllm", gpus=8, nodes=head.nodes())
        setup.write(tmp_path / "mon", d, setup.Options(scrape_interval="1s"))
        prom = Prometheus(tmp_path / "mon/prometheus.yml", tmp_path / "tsdb")
        node_row = next(r for r in signals.rows(d) if r.title == "Nodes")
        gpu_row = next(r for r in signals.rows(d) if r.title == "GPUs")
        exprs = [q.expr for r in (node_row, gpu_row) for p in r.panels for q in p.queries]
        exprs += [a.quantity for a in signals.alerts(d, ttft_slo_s=2) if a.name.startswith("Dsr1Node")]
        deadline = time.monotonic() + 30
        empty = exprs
        while empty and time.monotonic() < deadline:
            time.sleep(1)
            empty = [e for e in exprs if not prom.query(e)]
        assert not empty, empty
        while float(prom.query('sum(up{job="dsr1-nodes"})')[0]["value"][1]) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)  # each target's first scrape lands on its own schedule
        assert float(prom.query('sum(up{job="dsr1-nodes"})')[0]["value"][1]) == 2
        assert 0 < float(prom.query("dsr1_node_head_rtt_seconds")[0]["value"][1]) < 1
        # the head going away is seen by the worker
        head.stop()
        head = None
        assert worker.probe() is None
        assert 'dsr1_node_head_reachable{node_rank="1"} 0.0' in generate_latest(worker.registry).decode()
    finally:
        if prom:
            prom.stop()
        worker.stop()
        if head is not None:
            head.stop()
