"""End to end: a real `dsr1 serve` process on 127.0.0.1 with the real demo model, driven
by the official `openai` client (streaming and not), plus raw HTTP for the error cases."""

from __future__ import annotations

import concurrent.futures as cf
import json

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.serve_util import ServerProc

pytestmark = pytest.mark.slow

MAX_LEN = 512
PROMPTS = [f"Write one sentence about a {animal} named {name}." for animal, name in
           zip(["cat", "dog", "fox", "owl", "bee", "cow", "elk", "yak"] * 4,
               ["Ann", "Bob", "Cy", "Di", "Ed", "Flo", "Gus", "Hal"] * 4)]


@pytest.fixture(scope="module")
def demo_server(demo_model_dir, tmp_path_factory):
    home = tmp_path_factory.mktemp("serve-home")
    # fp32: greedy equality alone vs batched is a within-dtype property (bf16 kernels differ by batch shape).
    srv = ServerProc([str(demo_model_dir), "--dtype", "fp32", "--max-concurrent", "32", "--max-queue", "8",
                      "--max-model-len", str(MAX_LEN), "--served-model-name", "demo", "--threads", "2",
                      "--audit-log", str(home / "audit.jsonl")], home)
    srv.home = home
    yield srv
    assert srv.stop() == 0, "".join(srv.lines[-20:])


@pytest.fixture(scope="module")
def client(demo_server):
    return openai.OpenAI(base_url=demo_server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def _chat(client, prompt, max_tokens=12, **kw):
    return client.chat.completions.create(model="demo", messages=[{"role": "user", "content": prompt}],
                                          max_tokens=max_tokens, temperature=0, **kw)


def _stream_text(client, prompt, max_tokens=12):
    text, usage, finish = "", None, None
    stream = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": prompt}],
                                            max_tokens=max_tokens, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            text += ch.delta.content or ""
            finish = ch.finish_reason or finish
    return text, usage, finish


def test_models_and_health(demo_server, client):
    assert [m.id for m in client.models.list().data] == ["demo"]
    h = httpx.get(demo_server.url + "/health").json()
    assert h["status"] == "ok" and h["model"] == "demo"


def test_chat_non_stream_usage_and_stream_agree(client):
    r = _chat(client, PROMPTS[0])
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    text, usage, _ = _stream_text(client, PROMPTS[0])
    assert text == r.choices[0].message.content
    assert usage.completion_tokens == r.usage.completion_tokens and usage.prompt_tokens == r.usage.prompt_tokens


def test_32_concurrent_streams_match_solo_greedy(client):
    solo = {i: _stream_text(client, PROMPTS[i])[0] for i in (0, 5, 13)}
    with cf.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda p: _stream_text(client, p), PROMPTS))
    assert len(results) == 32
    for text, usage, finish in results:
        assert finish in ("stop", "length")
        assert usage is not None and 1 <= usage.completion_tokens <= 12
        if finish == "length":
            assert usage.completion_tokens == 12
    for i, text in solo.items():
        assert results[i][0] == text, f"prompt {i} differs alone vs in a batch of 32"


def test_completions_stop_seed_and_echo(client):
    r = client.completions.create(model="demo", prompt="1, 2, 3, 4,", max_tokens=20, temperature=0, stop=[" 7"])
    assert r.choices[0].finish_reason == "stop" and " 7" not in r.choices[0].text
    assert "5" in r.choices[0].text
    a = client.completions.create(model="demo", prompt="Once upon a time", max_tokens=8, temperature=1.0, seed=7)
    b = client.completions.create(model="demo", prompt="Once upon a time", max_tokens=8, temperature=1.0, seed=7)
    assert a.choices[0].text == b.choices[0].text
    e = client.completions.create(model="demo", prompt="Hello", max_tokens=2, temperature=0, echo=True)
    assert e.choices[0].text.startswith("Hello")


def test_ignore_eos_and_max_tokens_capped_by_context(client):
    r = client.completions.create(model="demo", prompt="x " * 490, max_tokens=10_000, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.prompt_tokens + r.usage.completion_tokens == MAX_LEN
    assert r.choices[0].finish_reason == "length"


def _post(server, path, body=None, raw=None, headers=None):
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(server.url + path, content=content, headers={"content-type": "application/json", **(headers or {})},
                      timeout=60)


@pytest.mark.parametrize("path,body,status,param", [
    ("/v1/chat/completions", {"model": "demo", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
     400, "temperature"),
    ("/v1/chat/completions", {"model": "demo", "messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    ("/v1/completions", {"model": "demo", "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": "demo", "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"model": "demo", "prompt": [10**9]}, 400, "prompt"),
])
def test_bad_inputs_get_openai_errors(demo_server, path, body, status, param):
    r = _post(demo_server, path, body)
    assert r.status_code == status
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"]


def test_malformed_json_oversized_body_and_long_prompt(demo_server, client):
    r = _post(demo_server, "/v1/chat/completions", raw=b'{"model": "demo", "messages": [')
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = _post(demo_server, "/v1/completions", raw=b'{"model": "demo", "prompt": "' + b"a" * (5 * 2**20) + b'"}')
    assert r.status_code == 413
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="demo", prompt="word " * 2000, max_tokens=5)
    msg = e.value.body["message"]
    assert str(MAX_LEN) in msg and "context length" in msg
    assert e.value.body["code"] == "context_length_exceeded"


def test_metrics_parse_and_count(demo_server):
    text = httpx.get(demo_server.url + "/metrics").text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("dsr1_requests", "dsr1_num_requests_running", "dsr1_num_requests_waiting",
                 "dsr1_time_to_first_token_seconds", "dsr1_time_per_output_token_seconds",
                 "dsr1_e2e_request_latency_seconds", "dsr1_prompt_tokens", "dsr1_generation_tokens",
                 "dsr1_kv_cache_usage_ratio"):
        assert name in fams, name
    ok = sum(s.value for s in fams["dsr1_requests"].samples
             if s.name == "dsr1_requests_total" and s.labels["status"] == "200")
    assert ok >= 1
    assert any(s.value > 0 for s in fams["dsr1_generation_tokens"].samples)


def test_audit_log_has_counts_not_text_or_keys(demo_server, client):
    _chat(client, "audit me please", max_tokens=2)
    lines = [json.loads(x) for x in (demo_server.home / "audit.jsonl").read_text().splitlines()]
    assert lines and all("prompt" not in x and "output" not in x for x in lines)
    rec = lines[-1]
    assert rec["status"] == 200 and rec["completion_tokens"] >= 1 and rec["model"] == "demo" and rec["client"]
