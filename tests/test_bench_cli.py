"""`dsr1 bench` from the command line against a real HTTP server on 127.0.0.1: files, schema, plots,
compare, clear errors, Ctrl-C."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
from typer.testing import CliRunner

from dsr1.bench.loopback import Behaviour, LoopbackServer
from dsr1.bench.report import SCHEMA_PATH
from dsr1.cli import build_app
from tests import interrupt

REPO = Path(__file__).resolve().parent.parent
SCHEMA = json.loads(SCHEMA_PATH.read_text())
PNG = b"\x89PNG\r\n\x1a\n"


def invoke(*args):
    return CliRunner().invoke(build_app(only="bench"), ["bench", *map(str, args)])


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory, demo_model_dir):
    """One closed-loop sweep with reasoning output, SLOs and the demo tokenizer; shared by several tests."""
    out = tmp_path_factory.mktemp("sweep")
    b = Behaviour(model="demo", reasoning_tokens=2, token_delay_s=0.001)
    with LoopbackServer(behaviour=b) as srv:
        res = invoke("--url", srv.url, "--model", "demo", "--tokenizer", demo_model_dir, "--concurrency", "1,3",
                     "--requests", 12, "--input-len", 48, "--output-len", 6, "--slo", "ttft=1000,tpot=100",
                     "--out", out)
    assert res.exit_code == 0, res.output
    return out, res.output


def test_sweep_results_match_schema(sweep_dir):
    out, text = sweep_dir
    doc = json.loads((out / "results.json").read_text())
    jsonschema.validate(doc, SCHEMA)
    assert [p["concurrency"] for p in doc["points"]] == [1, 3]
    assert doc["server"]["model"] == "demo" and doc["server"]["started_by_dsr1"] is False
    assert doc["config"]["api_key_set"] is False and "api_key" not in doc["config"]
    for p in doc["points"]:
        s = p["summary"]
        assert s["completed"] == 12 and s["failed"] == 0
        assert s["max_concurrency_observed"] == p["concurrency"]
        assert s["output_tokens"] == 12 * 6 and s["token_source"] == "usage"
        assert s["reasoning_tokens"] > 0 and s["answer_tokens"] > 0
        assert s["reasoning_tokens"] + s["answer_tokens"] == s["output_tokens"]
        assert s["goodput"] is not None and s["short_outputs"] == 0
        # loopback usage counts words, the demo tokenizer counts sub-words: the disagreement is reported
        assert s["token_check"]["mismatched"] == 12
        assert s["ttft_answer_ms"]["p50"] > s["ttft_ms"]["p50"]
        # the server's own /metrics counter moved by exactly the measured tokens (warm-up excluded)
        assert p["server_token_counters"] == {"loopback_generation_tokens_total": s["output_tokens"]}
        for r in p["requests"]:
            assert r["client_input_tokens"] == 48  # the prompt is exactly as long as asked
            assert len(r["itl"]) == 5 and r["tpot"] > 0
    assert "throughput" in text and "TTFT" in text and "disagrees with server usage" in text


def test_csv_files(sweep_dir):
    out, _ = sweep_dir
    rows = list(csv.DictReader((out / "points.csv").open()))
    assert [r["point"] for r in rows] == ["c=1", "c=3"]
    for r in rows:
        assert int(r["completed"]) == 12 and float(r["request_throughput"]) > 0
        assert float(r["ttft_p99_ms"]) >= float(r["ttft_p50_ms"]) > 0
        assert r["errors"] == ""
    reqs = list(csv.DictReader((out / "requests.csv").open()))
    assert len(reqs) == 24 and {r["ok"] for r in reqs} == {"True"}
    assert all(float(r["e2el"]) >= float(r["ttft"]) for r in reqs)


def test_plots_are_nonempty_pngs(sweep_dir):
    out, _ = sweep_dir
    for name in ("throughput_latency.png", "ttft_distribution.png", "tpot_distribution.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG and len(data) > 10_000, name


def test_compare_side_by_side(sweep_dir, tmp_path):
    out, _ = sweep_dir
    with LoopbackServer(behaviour=Behaviour(model="demo", token_delay_s=0.004)) as srv:
        res = invoke("--url", srv.url, "--dataset", _sharegpt(tmp_path), "--output-len", 6, "--concurrency", "1,3",
                     "--requests", 8, "--no-plots", "--out", tmp_path / "slow", "-q")
    assert res.exit_code == 0, res.output
    assert not list((tmp_path / "slow").glob("*.png"))
    a, b = out / "results.json", tmp_path / "slow" / "results.json"
    res = invoke("compare", a, b, "--json")
    assert res.exit_code == 0, res.output
    cmp = json.loads(res.output)
    tpot = next(r for r in cmp["rows"] if r["point"] == "c=1" and r["metric"] == "tpot_p50_ms")
    assert tpot["ratios_to_first"][0] > 1.5  # 4 ms per token against 1 ms
    assert tpot["values"][1] == pytest.approx(tpot["values"][0] * tpot["ratios_to_first"][0])
    res = invoke("compare", a, b)
    assert res.exit_code == 0 and "TPOT p50 ms" in res.output and "c=3" in res.output
    res = invoke("compare", a)
    assert res.exit_code == 2 and "two results files" in res.output
    (tmp_path / "x.json").write_text("{}")
    assert invoke("compare", a, tmp_path / "x.json").exit_code == 3


def _sharegpt(tmp_path) -> Path:
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps([{"conversations": [{"from": "human", "value": f"question number {i}"},
                                                   {"from": "gpt", "value": "an answer"}]} for i in range(5)]))
    return path


def test_open_loop_json_output_and_server_errors_counted(tmp_path):
    with LoopbackServer(behaviour=Behaviour(fail_every=4)) as srv:
        res = invoke("--url", srv.url, "--dataset", _sharegpt(tmp_path), "--output-len", "3-5", "--rate", "200,inf",
                     "--requests", 16, "--warmup", 0, "--no-plots", "--out", tmp_path / "o", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert [p["rate"] for p in data["points"]] == [200.0, None]
    for p in data["points"]:
        s = p["summary"]
        assert s["requests"] == 16 and s["errors"] == {"http_500": 4} and s["completed"] == 12
        assert s["client_lag_ms"] is not None
        assert s["token_source"] == "usage"
    assert Path(data["files"]["json"]).is_file()


@pytest.mark.parametrize("case,code,needle", [
    ("unreachable", 6, "--url"), ("bad-key", 9, "--api-key"), ("wrong-model", 4, "--model"),
    ("no-target", 2, "--url"), ("both-loads", 2, "--rate"), ("bad-slo", 2, "--slo"),
])
def test_clear_errors_before_the_run(case, code, needle, tmp_path):
    with LoopbackServer(behaviour=Behaviour(model="m", api_key="k")) as srv:
        args = {"unreachable": ["--url", "http://127.0.0.1:9"],
                "bad-key": ["--url", srv.url, "--api-key", "nope"],
                "wrong-model": ["--url", srv.url, "--api-key", "k", "--model", "other"],
                "no-target": [],
                "both-loads": ["--url", srv.url, "--concurrency", "1", "--rate", "2"],
                "bad-slo": ["--url", srv.url, "--slo", "speed=3"]}[case]
        res = invoke(*args, "--out", tmp_path / "r")
        assert srv.stats.requests <= 1  # at most the preflight probe: nothing was benchmarked
    assert res.exit_code == code, res.output
    assert "error:" in res.output and needle in res.output
    assert not (tmp_path / "r" / "results.json").exists()


def test_api_key_from_dsr1_api_key_environment(tmp_path, monkeypatch, demo_model_dir):
    """The key `dsr1 serve` reads from DSR1_API_KEY is the one bench sends when --api-key is absent."""
    monkeypatch.setenv("DSR1_API_KEY", "k")
    with LoopbackServer(behaviour=Behaviour(model="m", api_key="k")) as srv:
        res = invoke("--url", srv.url, "--tokenizer", demo_model_dir, "--concurrency", "1", "--requests", 2,
                     "--warmup", 0, "--input-len", 40,
                     "--output-len", 2, "--no-plots", "--out", tmp_path / "r", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["points"][0]["summary"]["completed"] == 2
    monkeypatch.setenv("DSR1_API_KEY", "wrong")
    with LoopbackServer(behaviour=Behaviour(model="m", api_key="k")) as srv:
        res = invoke("--url", srv.url, "--out", tmp_path / "s")
    assert res.exit_code == 9 and "--api-key" in res.output


def test_ctrl_c_keeps_finished_points(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with LoopbackServer(behaviour=Behaviour(token_delay_s=0.01)) as srv:
        proc = interrupt.popen([sys.executable, "-m", "dsr1", "bench", "--url", srv.url, "--dataset",
                                 str(_sharegpt(tmp_path)), "--output-len", "4", "--concurrency", "2,2,2", "--duration", "1.5",
                                 "--out", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not (out / "results.json").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)  # during the second point
        stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    doc = json.loads((out / "results.json").read_text())
    jsonschema.validate(doc, SCHEMA)
    assert doc["interrupted"] is True and len(doc["points"]) == 1
    assert doc["points"][0]["summary"]["completed"] > 0
    assert (out / "throughput_latency.png").read_bytes()[:8] == PNG
    assert "interrupted" in stderr


def test_ctrl_c_before_any_point_leaves_an_earlier_run_alone(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "dsr1", "bench", "--dataset", str(_sharegpt(tmp_path)), "--output-len", "4",
           "--warmup", "0", "--no-plots", "--out", str(out)]
    with LoopbackServer(behaviour=Behaviour(token_delay_s=0.01)) as srv:
        subprocess.run(cmd + ["--url", srv.url, "--concurrency", "1,2", "--requests", "4"], env=env, check=True,
                       capture_output=True, timeout=120)
        earlier = (out / "results.json").read_bytes()
        proc = interrupt.popen(cmd + ["--url", srv.url, "--concurrency", "1", "--duration", "30"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        seen = srv.stats.requests
        deadline = time.monotonic() + 60
        while srv.stats.requests <= seen + 2 and time.monotonic() < deadline:  # preflight done, the point running
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert (out / "results.json").read_bytes() == earlier  # not re-read, re-plotted or reported as this run's
    assert "finished point(s) kept" not in stderr


def test_bench_model_mode_reports_a_server_that_fails_to_start(tmp_path):
    # `dsr1 bench MODEL` runs `python -m dsr1 serve MODEL`; a model that does not exist makes it exit early,
    # which must surface as a server error with the log's tail, not a hang.
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "dsr1", "bench", str(tmp_path / "no-such-model"), "--requests", "1",
                           "--server-timeout", "120", "--out", str(tmp_path / "r")], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 10, proc.stderr
    assert "dsr1 serve exited" in proc.stderr and "fix:" in proc.stderr
    assert (tmp_path / "r" / "server.log").is_file()
    assert time.monotonic() - t < 120
