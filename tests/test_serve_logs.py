"""`dsr1 serve --log-format json`: every stderr line one JSON object, one per request, no text or keys."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from dsr1.bench.server import free_port, wait_healthy
from dsr1.serve import requestlog

REPO = Path(__file__).resolve().parent.parent
SECRET_PROMPT = "zebra quartz lighthouse"
KEY = "k-log-test-0123456789"


@pytest.mark.slow
def test_json_log_has_one_object_per_line_and_no_prompt_or_key(demo_model_dir, tmp_path):
    port = free_port()
    log = tmp_path / "serve.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "DSR1_HOME": str(tmp_path / "home")}
    env.pop("DSR1_API_KEY", None)
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "dsr1", "serve", str(demo_model_dir), "--port", str(port),
                                 "--api-key", KEY, "--log-format", "json"], env=env, cwd=REPO, stdout=f,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log, timeout=300)
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY)
        model = client.models.list().data[0].id
        client.completions.create(model=model, prompt=SECRET_PROMPT, max_tokens=5)
        list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": SECRET_PROMPT}],
                                            max_tokens=5, stream=True))
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="nope", prompt=SECRET_PROMPT, max_tokens=5)
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    text = log.read_text()
    records = [json.loads(line) for line in text.splitlines() if line.strip()]  # every line parses
    assert any(r.get("event") == "ready" and r["url"] == url for r in records)
    reqs = [r for r in records if r.get("event") == "request"]
    assert [(r["endpoint"], r["status"]) for r in reqs] == [
        ("/v1/completions", 200), ("/v1/chat/completions", 200), ("/v1/completions", 404)]
    ok = reqs[0]
    assert ok["request_id"] and ok["prompt_tokens"] > 0 and ok["completion_tokens"] == 5
    assert ok["finish_reason"] == "length" and 0 < ok["ttft_s"] <= ok["seconds"]
    assert reqs[1]["stream"] is True and reqs[2]["error"] == "model_not_found"
    assert SECRET_PROMPT not in text and KEY not in text


def test_log_content_is_opt_in():
    buf = io.StringIO()
    try:
        for content in (False, True):
            requestlog.configure("json", content=content, stream=buf)
            requestlog.request(request_id="r1", status=200, seconds=0.5, prompt=SECRET_PROMPT, output="out")
        human = io.StringIO()
        requestlog.configure("human", stream=human)
        requestlog.request(request_id="r2", endpoint="/v1/completions", status=429, seconds=0.01, error="overloaded")
    finally:
        for name in ("dsr1.serve", "dsr1.requests"):
            logging.getLogger(name).handlers[:] = []
        requestlog.configure.__globals__["_format"] = "human"
    first, second = (json.loads(line) for line in buf.getvalue().splitlines())
    assert "prompt" not in first and "output" not in first and first["status"] == 200
    assert second["prompt"] == SECRET_PROMPT and second["output"] == "out"
    line = human.getvalue().strip()
    assert "/v1/completions 429" in line and "id=r2" in line and "overloaded" in line
