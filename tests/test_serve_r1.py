"""R1 behaviour end to end, on a tiny Qwen2 carrying R1's special tokens and chat template.

The tiny model is rigged (tests/serve_util.build_tiny_r1) to answer every chat
with "<think>\\nLet me think</think>The answer", so the reasoning split, the API
key, overload, disconnects and SIGTERM draining can be checked exactly and fast.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from tests.serve_util import REPO, ServerProc, build_tiny_r1

pytestmark = pytest.mark.slow
KEY = "sk-test-0123456789"
MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def r1_models(tiny_model_factory, tmp_path_factory):
    src = tiny_model_factory("qwen2")
    d = tmp_path_factory.mktemp("tiny-r1")
    return {True: build_tiny_r1(src, d / "forced", forced_think=True),
            False: build_tiny_r1(src, d / "plain", forced_think=False)}


@pytest.fixture(scope="module")
def forced(r1_models, tmp_path_factory):
    home = tmp_path_factory.mktemp("home-forced")
    srv = ServerProc([str(r1_models[True]), "--served-model-name", "r1", "--max-concurrent", "2", "--max-queue", "1",
                      "--max-model-len", "2048", "--dtype", "fp32", "--threads", "1"], home,
                     env={"DSR1_API_KEY": KEY})
    yield srv
    assert srv.stop() == 0, "".join(srv.lines[-20:])


@pytest.fixture(scope="module")
def client(forced):
    return openai.OpenAI(base_url=forced.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _split(client, model="r1", **kw):
    r = client.chat.completions.create(model=model, messages=MSG, **kw)
    m = r.choices[0].message
    return m.model_extra.get("reasoning_content"), m.model_extra.get("reasoning"), m.content, r


def _split_stream(client, **kw):
    reasoning = content = ""
    finish = None
    for chunk in client.chat.completions.create(model="r1", messages=MSG, stream=True, **kw):
        for ch in chunk.choices:
            reasoning += (ch.delta.model_extra or {}).get("reasoning_content") or ""
            content += ch.delta.content or ""
            finish = ch.finish_reason or finish
    return reasoning, content, finish


def test_reasoning_split_with_forced_think(client):
    rc, r, content, resp = _split(client)  # DeepSeek's default sampling (0.6 / 0.95): the rigged model still follows
    assert (rc, r, content) == ("Let me think", "Let me think", "The answer")
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage.completion_tokens == 6  # Let, me, think, </think>, The, answer (EOS not counted)
    assert _split_stream(client, temperature=0) == ("Let me think", "The answer", "stop")


def test_reasoning_never_closed_stays_reasoning(client):
    rc, _, content, resp = _split(client, max_tokens=2, temperature=0)
    assert (rc, content, resp.choices[0].finish_reason) == ("Let me", "", "length")
    assert _split_stream(client, max_tokens=2, temperature=0) == ("Let me", "", "length")


def test_reasoning_split_without_forced_think(r1_models, tmp_path):
    srv = ServerProc([str(r1_models[False]), "--served-model-name", "r1", "--max-model-len", "256",
                      "--reasoning-field", "reasoning", "--threads", "1"], tmp_path)
    try:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        rc, r, content, _ = _split(c, temperature=0)
        assert (rc, r, content) == (None, "Let me think", "The answer")  # <think> came from the model itself
        reasoning = ""
        for chunk in c.chat.completions.create(model="r1", messages=MSG, stream=True, temperature=0):
            for ch in chunk.choices:
                reasoning += (ch.delta.model_extra or {}).get("reasoning") or ""
        assert reasoning == "Let me think"
    finally:
        assert srv.stop() == 0


def test_api_key_required_except_health(forced):
    assert httpx.get(forced.url + "/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.get(forced.url + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(forced.url + "/metrics").status_code == 401
    ok = httpx.get(forced.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200 and ok.json()["data"][0]["id"] == "r1"


def _long_stream(url, started: threading.Event | None = None, max_tokens=2000):
    """Open a long streaming request; returns the httpx response (caller closes it)."""
    c = httpx.Client(timeout=60)
    body = {"model": "r1", "messages": MSG, "stream": True, "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0}
    req = c.build_request("POST", url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    resp = c.send(req, stream=True)
    return c, resp


def _running(url) -> tuple[int, int]:
    h = httpx.get(url + "/health").json()
    return h["running"], h["waiting"]


def _wait(cond, timeout=10.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return time.monotonic() - t0
        time.sleep(0.01)
    raise AssertionError("condition not met in time")


def test_overload_gives_429_then_recovers(forced, client):
    opened = []
    try:
        for _ in range(2):  # 2 running
            c, resp = _long_stream(forced.url)
            assert resp.status_code == 200
            opened.append((c, resp))
        # + 1 queued fills the server; its answer (and its headers) waits for a turn
        third = threading.Thread(target=lambda: opened.append(_long_stream(forced.url)), daemon=True)
        third.start()
        _wait(lambda: _running(forced.url) == (2, 1))
        with pytest.raises(openai.RateLimitError) as e:
            client.chat.completions.create(model="r1", messages=MSG, max_tokens=3)
        assert e.value.response.headers["retry-after"] == "1"
    finally:
        for c, resp in opened[:2]:
            resp.close()
            c.close()
        third.join(30)
        for c, resp in opened[2:]:
            resp.close()
            c.close()
    _wait(lambda: _running(forced.url) == (0, 0))
    assert _split(client, temperature=0)[2] == "The answer"


def test_disconnect_frees_slot_within_a_step(forced):
    c, resp = _long_stream(forced.url, max_tokens=2000)
    lines = resp.iter_lines()
    assert next(lines).startswith("data: ")
    _wait(lambda: _running(forced.url) == (1, 0))
    resp.close()
    c.close()
    # A decode step of this model takes about a millisecond; the slot must be free well within polling time.
    elapsed = _wait(lambda: _running(forced.url) == (0, 0), timeout=2.0)
    assert elapsed < 1.0
    text = httpx.get(forced.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert 'dsr1_request_finished_total{reason="abort"}' in text


def test_non_streaming_disconnect_frees_slot(forced):
    import socket
    from urllib.parse import urlparse

    u = urlparse(forced.url)
    body = json.dumps({"model": "r1", "messages": MSG, "max_tokens": 2000, "ignore_eos": True}).encode()
    sock = socket.create_connection((u.hostname, u.port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: " + str(len(body)).encode()
                 + b"\r\n\r\n" + body)
    _wait(lambda: _running(forced.url) == (1, 0))
    sock.close()
    # non-streaming requests poll for a disconnect every 0.25 s
    assert _wait(lambda: _running(forced.url) == (0, 0), timeout=3.0) < 2.0


def test_sigterm_drains_running_requests_then_exits_0(r1_models, tmp_path):
    # transformers' forward: the fast path decodes this 2-layer model so quickly that 2,000 tokens
    # would finish inside the grace period, and the cancel half of the test would not happen
    srv = ServerProc([str(r1_models[True]), "--served-model-name", "r1", "--max-model-len", "2048", "--grace", "1",
                      "--max-concurrent", "4", "--threads", "1", "--no-fast-path"], tmp_path)
    results: dict[str, list[str]] = {"short": [], "long": []}

    def consume(name, max_tokens):
        body = {"model": "r1", "messages": MSG, "stream": True, "max_tokens": max_tokens, "ignore_eos": True,
                "temperature": 0, "stream_options": {"include_usage": True}}
        try:
            with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line:
                        results[name].append(line)
                        if name == "short" and len(results[name]) == 2:
                            time.sleep(0.5)  # keep it in flight when the signal arrives
        except httpx.HTTPError:
            results[name].append("<cut>")

    # "short" finishes within the grace period; "long" cannot, and is cancelled
    threads = [threading.Thread(target=consume, args=("short", 200)),
               threading.Thread(target=consume, args=("long", 2000 - 20))]
    for t in threads:
        t.start()
    _wait(lambda: len(results["short"]) >= 2 and len(results["long"]) >= 2)
    t0 = time.monotonic()
    code = srv.stop(signal.SIGTERM)
    for t in threads:
        t.join(30)
    assert code == 0, "".join(srv.lines[-20:])
    assert time.monotonic() - t0 < 20
    # ~2000 tokens at a few ms each outlast the 1 s grace period (200 do not): cancelled, so no [DONE]
    assert results["long"][-1] != "data: [DONE]"
    assert results["short"][-1] == "data: [DONE]"
    usage = json.loads(results["short"][-2][6:])["usage"]
    assert usage["completion_tokens"] == 200
    # new connections are refused once draining started
    with pytest.raises(httpx.HTTPError):
        httpx.get(srv.url + "/health", timeout=2)


def test_chat_command_keeps_answers_not_reasoning(forced):
    from dsr1.chat import ChatSession

    s = ChatSession(forced.url, api_key=KEY)
    assert s.connect() == "r1"
    parts = list(s.send("hi"))
    assert ("reasoning", "Let me think") in parts or "".join(p for k, p in parts if k == "reasoning") == "Let me think"
    assert s.history == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "The answer"}]
    assert s.last.completion_tokens == 6 and s.last.tokens_per_second > 0
    list(s.send("again"))
    assert len(s.history) == 4

    env = {"PYTHONPATH": str(REPO), "DSR1_API_KEY": KEY, "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "dsr1", "chat", "--url", forced.url], input="hello\n/exit\n",
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert "Let me think" in out.stdout and "The answer" in out.stdout and "tok/s" in out.stdout


def test_chat_model_starts_its_own_server_with_the_environment_key(r1_models, tmp_path):
    # `dsr1 chat MODEL` runs `dsr1 serve` as a child, which inherits DSR1_API_KEY and then requires it.
    # (DSR1_COMPILE=off as every test's servers: on an AMX CPU --compile auto would compile the step, ~60 s)
    env = {"PYTHONPATH": str(REPO), "DSR1_API_KEY": KEY, "PATH": "/usr/bin:/bin", "DSR1_HOME": str(tmp_path),
           "DSR1_COMPILE": "off"}
    out = subprocess.run([sys.executable, "-m", "dsr1", "chat", str(r1_models[True]), "--max-tokens", "8"],
                         input="hello\n/exit\n", capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Let me think" in out.stdout and "tok/s" in out.stdout


def test_busy_port_is_a_server_error_that_names_the_port(r1_models, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "dsr1", "serve", str(r1_models[True]), "--port", str(port),
                              "--dtype", "fp32"], capture_output=True, text=True, timeout=300,
                             env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "DSR1_HOME": str(tmp_path)})
    assert out.returncode == 10, out.stderr  # ServerError, not uvicorn's own exit code 3 (dsr1's config error)
    assert f"port {port} on 127.0.0.1 is not free" in out.stderr and "--port" in out.stderr
    assert "loading" not in out.stderr, out.stderr  # checked first: nothing is loaded for a busy port


def test_chat_needs_model_or_url():
    out = subprocess.run([sys.executable, "-m", "dsr1", "chat"], capture_output=True, text=True, timeout=60,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 2 and "--url" in out.stderr
