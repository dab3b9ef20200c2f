"""dsr1's one front over every engine: the same tests, parametrized over the embedded engine, vLLM's CPU
build and llama-server, one server per engine for the whole module.

Each server runs a tiny scripted model (tests/serve_util.build_tool_model, and its GGUF twin
tests/gguf_util.build_tool_gguf): offered tools, its greedy answer is a Hermes/Qwen2.5
`<tool_call>` (the format of the R1-Qwen distills' base) that the engine's own parser must read
(vLLM --tool-call-parser hermes, which dsr1's plan picks from the chat template; llama-server's
--jinja format detection); otherwise it answers "The weather in Paris is sunny". Every server has
the same guard policy, plugin and rotating audit log, so the guard tests check the front's guards
with each engine behind it (the tool call's arguments carry an address the PII mask must catch:
guards see tool calls too). The embedded engine does not serve tools: it must refuse them with the
error shape an engine lacking them gets.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from tests.serve_util import REPO, ServerProc
from tests.test_openai_schema import check

pytestmark = pytest.mark.slow
EMAIL = "alice.smith@example.org"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": {"type": "object", "required": ["city"], "properties": {
                                               "city": {"type": "string"}, "notify": {"type": "string"}}}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
ANSWER = "The weather in Paris is sunny"
POLICY = """
[pii]
mode = "mask"
where = "both"

[[rules]]
name = "topic"
where = "input"
keywords = ["forbidden"]

[[rules]]
name = "city-claim"
where = "output"
keywords = ["Paris is"]

[plugin]
timeout_s = 0.5
on_error = "block"
"""
PLUGIN = "import time\ndef check(text, where):\n    if 'HANG' in text:\n        time.sleep(5)\n    return True\n"


@pytest.fixture(scope="module")
def tool_models(demo_model_dir, demo_gguf, tmp_path_factory):
    from tests.gguf_util import build_tool_gguf
    from tests.serve_util import build_tool_model

    d = tmp_path_factory.mktemp("tool-model")
    return {"hf": build_tool_model(demo_model_dir, d), "gguf": build_tool_gguf(demo_gguf, d / "tool.gguf")}


@pytest.fixture(scope="module", params=["embedded", "vllm", "llamacpp"])
def served(request, tool_models, tmp_path_factory):
    """(engine, server, audit log path): one server per engine, shared by every test of the module."""
    from tests.test_serve_engines import _need, _serve

    engine = request.param
    tmp = tmp_path_factory.mktemp(f"front-{engine}")
    (tmp / "policy.toml").write_text(POLICY)
    (tmp / "tplugin.py").write_text(PLUGIN)
    audit = tmp / "audit.jsonl"
    args = ["--engine", engine, "--served-model-name", "t", "--max-model-len", "512", "--guard",
            str(tmp / "policy.toml"), "--guard-plugin", "tplugin:check", "--audit-log", str(audit), "--audit-content",
            "--audit-max-mb", "0.02", "--audit-backups", "50", "--max-concurrent", "8", "--max-queue", "400"]
    env = {"PYTHONPATH": f"{tmp}:{REPO}"}
    if engine == "embedded":
        srv = ServerProc([str(tool_models["hf"]), *args, "--dtype", "fp32"], tmp / "home", env=env)
    else:
        installed = _need(engine)
        model = tool_models["gguf"] if engine == "llamacpp" else tool_models["hf"]
        extra = ["--dtype", "fp32"] if engine == "vllm" else []
        srv = _serve([str(model), *args, *extra], tmp / "home", installed, key=None, extra_env=env)
    yield engine, srv, audit
    srv.stop()


def _client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def _audit(audit: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(audit.parent.glob(audit.name + "*")) for line in f.read_text().splitlines()]


def _stream(c: openai.OpenAI, **kw) -> tuple[str, str | None, dict]:
    text, finish, calls = "", None, {}
    for chunk in c.chat.completions.create(model="t", stream=True, temperature=0, max_tokens=40, **kw):
        check("CreateChatCompletionStreamResponse", chunk.model_dump(exclude_unset=True))
        for ch in chunk.choices:
            text += ch.delta.content or ""
            finish = ch.finish_reason or finish
            for tc in ch.delta.tool_calls or []:
                d = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                d["name"] += tc.function.name or ""
                d["arguments"] += tc.function.arguments or ""
    return text, finish, calls


def test_tool_calls_come_back_through_the_engines_own_parser(served):
    engine, srv, _ = served
    c = _client(srv)
    if engine == "embedded":
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="t", messages=ASK, tools=TOOLS, max_tokens=40)
        assert e.value.code == "unsupported_parameter" and e.value.param == "tools"
        assert "embedded engine" in e.value.message and "--engine vllm" in e.value.message
        return
    r = c.chat.completions.create(model="t", messages=ASK, tools=TOOLS, temperature=0, max_tokens=40)
    check("CreateChatCompletionResponse", r.model_dump(exclude_unset=True))
    (call,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    # the guard saw the arguments: the address the model wrote into them is masked (PII, where = both)
    assert json.loads(call.function.arguments) == {"city": "Paris", "notify": "[EMAIL]"} and call.id
    # streamed: the calls are held while the output guard runs, then sent whole
    text, finish, calls = _stream(c, messages=ASK, tools=TOOLS)
    assert (text, finish) == ("", "tool_calls") and calls[0]["name"] == "get_weather"
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris", "notify": "[EMAIL]"}
    # the round trip: the call and its result go back; the model answers in text
    back = ASK + [r.choices[0].message.model_dump(exclude_none=True),
                  {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    r2 = c.chat.completions.create(model="t", messages=back, temperature=0, max_tokens=40)
    assert r2.choices[0].message.content.startswith("The weather in ")


def test_options_the_engine_serves_pass_and_the_rest_are_refused_alike(served):
    engine, srv, _ = served
    c = _client(srv)
    if engine == "embedded":  # n choices are rows of its batch; logprobs it does not compute
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="t", messages=ASK, max_tokens=4, logprobs=True)
        assert e.value.code == "unsupported_parameter" and e.value.param == "logprobs"
        r = c.chat.completions.create(model="t", messages=ASK, max_tokens=3, temperature=0.6, seed=1, n=2)
        assert [ch.message.content for ch in r.choices] == ["The weather in"] * 2
        return
    r = c.chat.completions.create(model="t", messages=ASK, max_tokens=3, temperature=0, logprobs=True, top_logprobs=2)
    assert [t.token for t in r.choices[0].logprobs.content] == ["The", " weather", " in"]
    assert all(len(t.top_logprobs) == 2 for t in r.choices[0].logprobs.content)
    if engine == "llamacpp":  # llama-server: "Only one completion choice is allowed"
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="t", messages=ASK, max_tokens=3, n=2)
        assert e.value.code == "unsupported_parameter" and e.value.param == "n"
    else:
        r = c.chat.completions.create(model="t", messages=ASK, max_tokens=3, temperature=0.6, seed=1, n=2)  # vLLM: greedy takes n=1
        assert [ch.message.content for ch in r.choices] == ["The weather in"] * 2


def test_input_rules_block_before_the_engine(served):
    engine, srv, audit = served
    c = _client(srv)
    for call in (lambda: c.completions.create(model="t", prompt="tell me about forbidden things", max_tokens=4),
                 lambda: c.chat.completions.create(model="t", max_tokens=4,
                                                   messages=[{"role": "user", "content": "forbidden?"}])):
        with pytest.raises(openai.BadRequestError) as e:
            call()
        assert e.value.code == "content_filter" and "'topic'" in e.value.message
    assert any(a.get("rule") == "topic" and a["action"] == "block" for a in _audit(audit))


def test_input_pii_is_masked_before_the_engine_sees_it(served):
    _, srv, audit = served
    _client(srv).chat.completions.create(model="t", max_tokens=2, temperature=0,
                                         messages=[{"role": "user", "content": f"Mail {EMAIL} please"}])
    lines = _audit(audit)
    req = [a for a in lines if "prompt" in a and "Mail " in json.dumps(a["prompt"])][-1]
    assert "Mail [EMAIL] please" in json.dumps(req["prompt"]) and EMAIL not in json.dumps(lines)


def test_output_rule_stops_stream_and_response_without_the_match(served):
    _, srv, _ = served
    c = _client(srv)
    r = c.chat.completions.create(model="t", messages=ASK, temperature=0, max_tokens=40)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("The weather in ", "content_filter")
    text, finish, _ = _stream(c, messages=ASK)  # "Paris" was held back until the rule could be checked
    assert (text, finish) == ("The weather in ", "content_filter")


def test_a_plugin_that_hangs_fails_closed_within_its_timeout(served):
    _, srv, audit = served
    t0 = time.monotonic()
    with pytest.raises(openai.BadRequestError) as e:
        _client(srv).completions.create(model="t", prompt="HANG on", max_tokens=2)
    assert "plugin:timeout" in e.value.message and time.monotonic() - t0 < 5
    assert any(a.get("rule") == "plugin:timeout" for a in _audit(audit))


def test_200_concurrent_requests_lose_no_audit_line_across_rotations(served):
    _, srv, audit = served
    before = len(_audit(audit))
    c = _client(srv)

    def one(i: int) -> None:
        try:
            c.completions.create(model="t", prompt=f"forbidden {i}" if i % 4 == 0 else f"Item {i}:\n", max_tokens=2)
        except openai.BadRequestError:
            pass

    with ThreadPoolExecutor(64) as pool:
        list(pool.map(one, range(200)))
    assert len(_audit(audit)) - before == 200 + 50  # a line per request; each blocked one its guard line too
    assert len(list(audit.parent.glob(audit.name + ".*"))) >= 2  # it rotated while being written


def test_health_models_and_errors_have_one_shape(served):
    engine, srv, _ = served
    h = httpx.get(srv.url + "/health").json()
    assert h["status"] == "ok" and h["engine"] == engine
    check("ListModelsResponse", httpx.get(srv.url + "/v1/models").json())
    r = httpx.post(srv.url + "/v1/chat/completions", json={"model": "nope", "messages": ASK})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    check("ErrorResponse", r.json())
    r = httpx.post(srv.url + "/v1/chat/completions", json={"model": "t", "messages": ASK, "top_logprobs": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
