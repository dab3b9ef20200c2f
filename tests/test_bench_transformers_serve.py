"""`dsr1 bench` against a real third-party OpenAI-compatible server: `transformers serve` with the demo model.

This is the "any OpenAI-compatible server" path, on a server dsr1 did not write. transformers serve
rejects the vLLM `ignore_eos` extension (HTTP 422), so the run also shows that clear error and the
`--no-ignore-eos` way round it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsr1.bench.server import free_port, wait_healthy

REPO = Path(__file__).resolve().parent.parent
TRANSFORMERS_CLI = Path(sys.executable).parent / "transformers"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not TRANSFORMERS_CLI.exists(), reason="no `transformers` CLI next to this python")]


def test_bench_against_transformers_serve(demo_model_dir, tmp_path):
    port = free_port()
    log = tmp_path / "tserve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    with open(log, "wb") as f:
        proc = subprocess.Popen([str(TRANSFORMERS_CLI), "serve", str(demo_model_dir), "--host", "127.0.0.1",
                                 "--port", str(port), "--device", "cpu"], env=env, stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log, timeout=240)
        base = [sys.executable, "-m", "dsr1", "bench", "--url", url, "--tokenizer", str(demo_model_dir),
                "--concurrency", "1", "--requests", "2", "--warmup", "0", "--input-len", "40", "--output-len", "4",
                "--out", str(tmp_path / "r"), "--no-plots"]
        strict = subprocess.run(base, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert strict.returncode == 6 and "--no-ignore-eos" in strict.stderr
        ok = subprocess.run(base + ["--no-ignore-eos", "--json"], env=env, cwd=REPO, capture_output=True, text=True,
                            timeout=300)
        assert ok.returncode == 0, ok.stderr[-2000:]
    finally:
        proc.terminate()
        proc.wait(30)
    doc = json.loads((tmp_path / "r" / "results.json").read_text())
    assert doc["server"]["usage_reported"] is True
    s = doc["points"][0]["summary"]
    assert s["completed"] == 2 and s["token_source"] == "usage"
    for r in doc["points"][0]["requests"]:
        assert r["usage_input_tokens"] == r["client_input_tokens"] == 40  # exact prompt length, template included
        assert 1 <= r["usage_output_tokens"] <= 4
        assert abs(r["client_output_tokens"] - r["usage_output_tokens"]) <= 1
        assert r["ttft"] > 0 and r["e2el"] >= r["ttft"]
