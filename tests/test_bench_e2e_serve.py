"""End to end: `dsr1 bench` against `dsr1 serve` with the real demo model on 127.0.0.1.

Needs `dsr1 serve` (issue 3 / [3/6]); on a branch without it these tests fail at
server start, by design: they describe the merged behaviour.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jsonschema
import openai
import pytest

from dsr1.bench.report import SCHEMA_PATH
from dsr1.bench.server import free_port, wait_healthy

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def served(demo_model_dir, tmp_path_factory):
    """`python -m dsr1 serve <demo dir> --port P`, as a user starts it; stopped after the module."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "dsr1", "serve", str(demo_model_dir), "--port", str(port)],
                                env=_env(), cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log, timeout=300)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _bench(*args, timeout=600):
    out = subprocess.run([sys.executable, "-m", "dsr1", "bench", *map(str, args), "--json"], env=_env(), cwd=REPO,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def test_sweep_token_counts_match_server_usage(served, demo_model_dir, tmp_path):
    data = _bench("--url", served, "--tokenizer", demo_model_dir, "--concurrency", "1,2", "--requests", 4,
                  "--warmup", 1, "--input-len", 48, "--output-len", 8, "--out", tmp_path / "r", "--no-plots")
    doc = json.loads((tmp_path / "r" / "results.json").read_text())
    jsonschema.validate(doc, json.loads(SCHEMA_PATH.read_text()))
    assert doc["server"]["usage_reported"] is True
    for p in doc["points"]:
        s = p["summary"]
        assert s["completed"] == 4 and s["failed"] == 0, s["errors"]
        assert s["token_source"] == "usage" and s["short_outputs"] == 0  # ignore_eos honoured
        assert s["max_concurrency_observed"] == p["concurrency"]
        for r in p["requests"]:
            assert r["usage_output_tokens"] == r["output_tokens"] == 8
            # the prompt dsr1 built to 48 tokens is 48 tokens to the server too (chat template included)
            assert r["usage_input_tokens"] == r["client_input_tokens"] == 48
            # retokenizing the streamed text can only lose tokens (special tokens generated past EOS are not
            # streamed as text); any difference is what token_check reports
            assert 0 < r["client_output_tokens"] <= r["usage_output_tokens"]
            assert r["ttft"] > 0 and r["e2el"] >= r["ttft"] and r["tpot"] > 0
        assert s["token_check"]["input_mismatched"] == 0
        assert s["token_check"]["mismatched"] == sum(r["client_output_tokens"] != r["usage_output_tokens"]
                                                     for r in p["requests"])
        # the server's own counters over the point count exactly the point's requests: not the warm-up's
        # last one, not one short (the server counts a request before its last event goes out)
        assert p["server_token_counters"]["dsr1_generation_tokens_total"] == s["output_tokens"]
    assert [p["summary"]["output_tokens"] for p in data["points"]] == [32, 32]

    # the official openai client sees the same usage for the same request shape
    cli = openai.OpenAI(base_url=served + "/v1", api_key="unused")
    model = doc["server"]["model"]
    chunks = list(cli.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Name three colours."}], max_tokens=8, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[-1].usage.completion_tokens == 8


def test_server_counters_match_the_window_without_warmup(served, demo_model_dir, tmp_path):
    _bench("--url", served, "--tokenizer", demo_model_dir, "--concurrency", "4", "--requests", 8, "--warmup", 0,
           "--input-len", 32, "--output-len", 16, "--out", tmp_path / "r", "--no-plots")
    (p,) = json.loads((tmp_path / "r" / "results.json").read_text())["points"]
    assert p["summary"]["output_tokens"] == 8 * 16
    assert p["server_token_counters"]["dsr1_generation_tokens_total"] == 8 * 16
    assert p["server_token_counters"]["dsr1_prompt_tokens_total"] == p["summary"]["input_tokens"]


def test_bench_model_starts_and_stops_dsr1_serve(demo_model_dir, tmp_path):
    data = _bench(demo_model_dir, "--concurrency", "1", "--requests", 2, "--warmup", 0, "--input-len", 40,
                  "--output-len", 4, "--out", tmp_path / "r")
    assert data["server"]["started_by_dsr1"] is True
    assert data["points"][0]["summary"]["completed"] == 2
    assert data["points"][0]["summary"]["output_tokens"] == 8
    assert all(Path(p).stat().st_size > 0 for p in data["files"]["plots"])
    port = int(data["server"]["base_url"].rsplit(":", 1)[1])
    # The server is gone: nothing listens on its port any more. (A plain bind() can still fail
    # here because the server's closed connections sit in TIME_WAIT, so ask with connect().)
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.connect(("127.0.0.1", port))
