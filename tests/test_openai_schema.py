"""Every response shape `dsr1 serve` emits, validated against OpenAI's own OpenAPI document.

The document is vendored in tests/openai_openapi/ (see SOURCE.md there for the commit).
Bodies are captured raw over HTTP (each `data: ...` line of a stream parsed on its own),
so what is validated is exactly what the server sent; one request per endpoint also goes
through the official `openai` client to show it parses.

Two servers: the real demo model (SmolLM2-135M, no reasoning) without a key, and the tiny
rigged R1 model (tests/serve_util.build_tiny_r1) behind DSR1_API_KEY, which answers every
chat with reasoning, so `reasoning_content`/`reasoning` ride along as extra fields.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
import yaml
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from tests.serve_util import ServerProc, build_tiny_r1

pytestmark = pytest.mark.slow

SPEC = Path(__file__).parent / "openai_openapi" / "openapi.yaml"
SPEC_URI = "urn:openai-openapi"
KEY = "sk-test-0123456789"
MAX_LEN = 256
HI = [{"role": "user", "content": "Say hi."}]


# -- the validator ---------------------------------------------------------------------------------

def _to_json_schema(node: Any) -> Any:
    """Rewrite the OpenAPI 3.0 leftovers of this 3.1 document into JSON Schema 2020-12.

    The document declares `openapi: 3.1.0` (so schemas are 2020-12) yet still carries
    3.0's `nullable: true` (109 places, e.g. a stream chunk's `finish_reason` and `usage`;
    openai/openai-openapi#483) and boolean `exclusiveMinimum`. A 2020-12 validator ignores
    `nullable`, which would reject the nulls OpenAI itself sends, so it becomes
    `anyOf: [schema, {type: null}]`, exactly what 3.0 meant by it; nothing else is relaxed.
    """
    if isinstance(node, list):
        return [_to_json_schema(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _to_json_schema(v) for k, v in node.items()}
    if out.get("exclusiveMinimum") is True:
        out["exclusiveMinimum"] = out.pop("minimum")
    if out.get("exclusiveMaximum") is True:
        out["exclusiveMaximum"] = out.pop("maximum")
    nullable = out.pop("nullable", False)
    if nullable is True:
        return {"anyOf": [out, {"type": "null"}]}
    return out


@lru_cache(maxsize=1)
def _registry() -> Registry:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when built in: ~1 s for these 3 MB
    with open(SPEC, encoding="utf-8") as f:
        doc = yaml.load(f, Loader=loader)
    assert doc["openapi"].startswith("3.1"), "the nullable rewrite above assumes a 3.1 document"
    return Registry().with_resource(SPEC_URI, DRAFT202012.create_resource(_to_json_schema(doc)))


def _absolute_refs(node: Any) -> Any:
    if isinstance(node, list):
        return [_absolute_refs(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _absolute_refs(v) for k, v in node.items()}
    if isinstance(out.get("$ref"), str) and out["$ref"].startswith("#"):
        out["$ref"] = SPEC_URI + out["$ref"]
    return out


def component(name: str) -> dict:
    """A copy of `#/components/schemas/NAME` whose $refs still point into the document."""
    return _absolute_refs(_registry().contents(SPEC_URI)["components"]["schemas"][name])


def validator(schema: str | dict) -> jsonschema.Draft202012Validator:
    """Validate against a component by name, or a derived schema, resolving $refs in the document."""
    if isinstance(schema, str):
        schema = {"$ref": f"{SPEC_URI}#/components/schemas/{schema}"}
    return jsonschema.Draft202012Validator({"$id": "urn:dsr1-check", **schema}, registry=_registry())


def check(schema: str | dict, body: Any) -> None:
    errors = sorted(validator(schema).iter_errors(body), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
                                 for e in errors) + f"\nbody: {json.dumps(body)[:2000]}"


def completion_chunk_schema() -> dict:
    """CreateCompletionResponse as a stream chunk: the document says streamed and non-streamed
    completions share that one shape, yet two of its own statements make a chunk differ:
    - `finish_reason` is null until the last chunk, as OpenAI's own stream sends it
      (openai/openai-openapi#100, closed unmerged);
    - with `stream_options.include_usage` "all other chunks will also include a `usage`
      field, but with a null value" (ChatCompletionStreamOptions, which
      CreateCompletionRequest.stream_options refers to).
    Only those two fields gain null; chunks that carry neither null are also checked against
    the document as published."""
    s = component("CreateCompletionResponse")
    props = s["properties"]
    props["usage"] = {"anyOf": [props["usage"], {"type": "null"}]}
    choice = props["choices"]["items"]["properties"]
    choice["finish_reason"] = {"anyOf": [choice["finish_reason"], {"type": "null"}]}
    return s


# -- servers and raw capture -----------------------------------------------------------------------

# The suite runs once per engine behind dsr1's front: the embedded engine, vLLM's CPU build and
# llama-server (tests/test_serve_engines.py's _need: skipped without DSR1_TEST_ENGINES_HOME, failed
# when it is set and the engine is missing). Whatever runs behind, clients get the same shapes.
ENGINES = ["embedded", "vllm", "llamacpp"]


@pytest.fixture(scope="module", params=ENGINES)
def engine(request) -> str:
    return request.param


def _start(engine: str, model: Path, args: list[str], home: Path, key: str | None) -> ServerProc:
    if engine == "embedded":
        return ServerProc([str(model), *args, "--dtype", "fp32", "--threads", "1"], home,
                          env={"DSR1_API_KEY": key} if key else None)
    from tests.test_serve_engines import _need, _serve

    extra = ["--engine", engine] + (["--dtype", "fp32"] if engine == "vllm" else [])
    return _serve([str(model), *args, *extra], home, _need(engine), key=key)


@pytest.fixture(scope="module")
def demo(engine, demo_model_dir, demo_gguf, tmp_path_factory):
    model = demo_gguf if engine == "llamacpp" else demo_model_dir
    srv = _start(engine, model, ["--served-model-name", "demo", "--max-model-len", str(MAX_LEN), "--max-concurrent",
                                 "2"], tmp_path_factory.mktemp(f"home-demo-{engine}"), None)
    srv.engine = engine
    yield srv
    assert srv.stop() == 0, "".join(srv.lines[-20:])


@pytest.fixture(scope="module")
def r1(engine, tiny_model_factory, demo_model_dir, tmp_path_factory):
    """The scripted R1 model: "Let me think" reasoning, "The answer" content. The embedded engine's has the
    template's forced "<think>\\n" (6 tokens out; it does not count the end token); vLLM's and
    llama-server's write "<think>\\n" themselves on a base their attention takes, and count the end token
    (9)."""
    d = tmp_path_factory.mktemp(f"tiny-r1-{engine}")
    if engine == "embedded":
        model, tokens = build_tiny_r1(tiny_model_factory("qwen2"), d / "m", forced_think=True), 6
    elif engine == "vllm":
        from tests.serve_util import build_r1_for_vllm

        model, tokens = build_r1_for_vllm(demo_model_dir, d), 9
    else:
        from tests.conftest import CACHE
        from tests.gguf_util import build_tiny_gguf, r1_qwen_metadata
        from tests.test_serve_engines import R1_SCRIPT

        model, tokens = build_tiny_gguf(r1_qwen_metadata(CACHE), d / "r1.gguf", script=R1_SCRIPT), 9
    srv = _start(engine, model, ["--served-model-name", "r1", "--max-model-len", "512", "--max-concurrent", "2"],
                 tmp_path_factory.mktemp(f"home-r1-{engine}"), KEY)
    srv.tokens = tokens
    yield srv
    assert srv.stop() == 0, "".join(srv.lines[-20:])


def _headers(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def post(srv, path: str, body: Any = None, *, raw: bytes | None = None, key: str | None = None) -> httpx.Response:
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(srv.url + path, content=content, timeout=120,
                      headers={"content-type": "application/json", **_headers(key)})


def stream(srv, path: str, body: dict, key: str | None = None) -> list[dict]:
    """POST with stream=true; every SSE `data:` payload parsed as JSON, checking the `[DONE]` end."""
    events: list[str] = []
    with httpx.stream("POST", srv.url + path, json={**body, "stream": True}, headers=_headers(key),
                      timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line:
                assert line.startswith("data: "), line
                events.append(line[len("data: "):])
    assert events and events[-1] == "[DONE]" and "[DONE]" not in events[:-1], events
    return [json.loads(e) for e in events[:-1]]


# -- the validator itself must be able to say no ---------------------------------------------------

def test_validator_rejects_what_openai_would_not_send():
    ok_msg = {"role": "assistant", "content": "hi", "refusal": None}
    chat = {"id": "c", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "message": ok_msg, "finish_reason": "stop", "logprobs": None}]}
    check("CreateChatCompletionResponse", chat)
    bad = [
        {**chat, "choices": [{**chat["choices"][0], "message": {"role": "assistant", "content": "hi"}}]},
        {**chat, "choices": [{**chat["choices"][0], "finish_reason": "eos"}]},
        {**chat, "created": 1.5},
        {**chat, "object": "chat.completion.chunk"},
    ]
    for body in bad:
        assert not validator("CreateChatCompletionResponse").is_valid(body), body
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m", "usage": None,
             "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None, "logprobs": None}]}
    check("CreateChatCompletionStreamResponse", chunk)  # nullable finish_reason/usage/logprobs accepted
    assert not validator("CreateChatCompletionStreamResponse").is_valid(
        {**chunk, "choices": [{**chunk["choices"][0], "finish_reason": "eos"}]})
    assert not validator("CreateChatCompletionStreamResponse").is_valid({**chunk, "usage": {"prompt_tokens": 1}})
    assert not validator("ErrorResponse").is_valid({"error": {"message": "m", "type": "t", "param": 3, "code": None}})
    assert not validator("ErrorResponse").is_valid({"error": {"message": "m", "type": "t", "code": None}})
    cmpl_final = {"id": "c", "object": "text_completion", "created": 1, "model": "m",
                  "choices": [{"index": 0, "text": "x", "finish_reason": None, "logprobs": None}]}
    cmpl_usage_null = {**cmpl_final, "choices": [{**cmpl_final["choices"][0], "finish_reason": "stop"}], "usage": None}
    for body in (cmpl_final, cmpl_usage_null):
        assert not validator("CreateCompletionResponse").is_valid(body)  # the published shape is strict
        check(completion_chunk_schema(), body)
    assert not validator(completion_chunk_schema()).is_valid({**cmpl_final, "usage": {"prompt_tokens": 1}})
    assert not validator(completion_chunk_schema()).is_valid(
        {**cmpl_final, "choices": [{**cmpl_final["choices"][0], "finish_reason": "eos"}]})
    assert not validator("ListModelsResponse").is_valid({"object": "list", "data": [{"id": "m", "object": "model"}]})


# -- success shapes --------------------------------------------------------------------------------

def test_chat_completion(demo):
    r = post(demo, "/v1/chat/completions", {"model": "demo", "messages": HI, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200
    body = r.json()
    check("CreateChatCompletionResponse", body)
    assert body["choices"][0]["message"]["refusal"] is None


def test_chat_completion_reasoning(r1):
    r = post(r1, "/v1/chat/completions", {"model": "r1", "messages": HI, "temperature": 0}, key=KEY)
    assert r.status_code == 200
    body = r.json()
    check("CreateChatCompletionResponse", body)
    msg = body["choices"][0]["message"]
    assert (msg["reasoning_content"], msg["reasoning"], msg["content"]) == ("Let me think", "Let me think", "The answer")


def test_n_choices_non_streamed_and_streamed(demo):
    """`n`: n rows of one batch, each its own choice (seeded: seed, seed + 1, ...); the prompt counts once."""
    if demo.engine != "embedded":
        pytest.skip("n as rows seeded seed + i is the embedded engine's; vLLM's n and llama-server's refusal: "
                    "tests/test_front_engines.py")
    body = {"model": "demo", "messages": HI, "max_tokens": 6, "temperature": 1.0, "seed": 7, "n": 3, "ignore_eos": True}
    r = post(demo, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    whole = r.json()
    check("CreateChatCompletionResponse", whole)
    assert [c["index"] for c in whole["choices"]] == [0, 1, 2]
    single = post(demo, "/v1/chat/completions", {**body, "n": 1}).json()
    assert whole["usage"]["prompt_tokens"] == single["usage"]["prompt_tokens"]
    assert whole["usage"]["completion_tokens"] == 3 * 6
    assert whole["choices"][0]["message"]["content"] == single["choices"][0]["message"]["content"]  # same seed
    texts: dict[int, str] = {}
    finished = set()
    for c in stream(demo, "/v1/chat/completions", body):
        check("CreateChatCompletionStreamResponse", c)
        for ch in c["choices"]:
            texts[ch["index"]] = texts.get(ch["index"], "") + (ch["delta"].get("content") or "")
            if ch["finish_reason"]:
                finished.add(ch["index"])
    assert finished == {0, 1, 2}
    assert [texts[i] for i in range(3)] == [c["message"]["content"] for c in whole["choices"]]


@pytest.mark.parametrize("include_usage", [True, False])
def test_chat_stream_chunks(demo, include_usage):
    body = {"model": "demo", "messages": HI, "max_tokens": 4, "temperature": 0}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    chunks = stream(demo, "/v1/chat/completions", body)
    for c in chunks:
        check("CreateChatCompletionStreamResponse", c)
    assert len({(c["id"], c["created"]) for c in chunks}) == 1, "one id and timestamp per stream"
    if include_usage:
        *body_chunks, last = chunks
        assert last["choices"] == [] and last["usage"]["completion_tokens"] >= 1
        assert all("usage" in c and c["usage"] is None for c in body_chunks)  # null on all but the last
    else:
        body_chunks = chunks
        assert all("usage" not in c for c in chunks)
    assert body_chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert body_chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c["choices"][0]["finish_reason"] is None for c in body_chunks[:-1])


def test_chat_stream_chunks_reasoning(r1):
    chunks = stream(r1, "/v1/chat/completions", {"model": "r1", "messages": HI, "temperature": 0,
                                                 "stream_options": {"include_usage": True}}, key=KEY)
    for c in chunks:
        check("CreateChatCompletionStreamResponse", c)
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "Let me think"
    assert "".join(d.get("content") or "" for d in deltas) == "The answer"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == r1.tokens


def test_completion(demo):
    r = post(demo, "/v1/completions", {"model": "demo", "prompt": "1, 2, 3,", "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200
    check("CreateCompletionResponse", r.json())
    echo = post(demo, "/v1/completions", {"model": "demo", "prompt": [1, 2, 3], "max_tokens": 2, "echo": True})
    check("CreateCompletionResponse", echo.json())


@pytest.mark.parametrize("include_usage", [True, False])
def test_completion_stream_chunks(demo, include_usage):
    body = {"model": "demo", "prompt": "1, 2, 3,", "max_tokens": 4, "temperature": 0, "echo": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    chunks = stream(demo, "/v1/completions", body)
    finals = [c for c in chunks if any(ch["finish_reason"] for ch in c["choices"])]
    assert len(finals) == 1
    strict = 0
    for c in chunks:
        check(completion_chunk_schema(), c)  # see its docstring
        has_null = ("usage" in c and c["usage"] is None) or any(ch["finish_reason"] is None for ch in c["choices"])
        if not has_null:
            check("CreateCompletionResponse", c)
            strict += 1
    assert strict == 1  # the usage chunk, or without include_usage the finish_reason chunk
    if include_usage:
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1
        assert all("usage" in c and c["usage"] is None for c in chunks[:-1])
    else:
        assert all("usage" not in c for c in chunks)
    assert chunks[0]["choices"][0]["text"] == "1, 2, 3,"  # echo


def test_models_list(demo, r1):
    check("ListModelsResponse", httpx.get(demo.url + "/v1/models").json())
    r = httpx.get(r1.url + "/v1/models", headers=_headers(KEY))
    check("ListModelsResponse", r.json())
    assert [m["id"] for m in r.json()["data"]] == ["r1"]


# -- error shapes ----------------------------------------------------------------------------------

MSG = [{"role": "user", "content": "x"}]


@pytest.mark.parametrize("path,body,status,code", [
    ("/v1/chat/completions", {"model": "gpt-9", "messages": MSG}, 404, "model_not_found"),
    ("/v1/completions", {"model": "gpt-9", "prompt": "x"}, 404, "model_not_found"),
    ("/v1/chat/completions", {"model": "demo", "messages": MSG, "temperature": "hot"}, 400, "invalid_type"),
    ("/v1/chat/completions", {"model": "demo", "messages": MSG, "suffix": "x"}, 400, "unsupported_parameter"),
    ("/v1/chat/completions", {"messages": MSG}, 400, "missing_required_parameter"),
    ("/v1/chat/completions", [1, 2], 400, "invalid_json"),
    ("/v1/completions", {"model": "demo", "prompt": "word " * (2 * MAX_LEN)}, 400, "context_length_exceeded"),
    ("/v1/completions", {"model": "demo", "prompt": "x", "max_tokens": 0}, 400, "invalid_value"),
])
def test_error_bodies(demo, path, body, status, code):
    r = post(demo, path, body)
    assert r.status_code == status
    check("ErrorResponse", r.json())
    assert r.json()["error"]["code"] == code


def test_error_bodies_raw(demo, r1):
    cases = [
        (post(demo, "/v1/chat/completions", raw=b'{"model": "demo", "messages": ['), 400),
        (post(demo, "/v1/completions", raw=b'{"model": "demo", "prompt": "' + b"a" * (4 * 2**20) + b'"}'), 413),
        (post(r1, "/v1/chat/completions", {"model": "r1", "messages": MSG}), 401),
        (post(r1, "/v1/chat/completions", {"model": "r1", "messages": MSG}, key="sk-wrong"), 401),
        (httpx.get(r1.url + "/v1/models"), 401),
    ]
    for r, status in cases:
        assert r.status_code == status, r.text
        check("ErrorResponse", r.json())


# -- the official client parses the same bodies ----------------------------------------------------

def test_openai_client_parses(demo, r1):
    c = openai.OpenAI(base_url=demo.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    r = c.chat.completions.create(model="demo", messages=HI, max_tokens=4, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.refusal is None
    assert r.choices[0].message.role == "assistant" and r.usage.total_tokens > 0
    cm = c.completions.create(model="demo", prompt="1, 2, 3,", max_tokens=2, temperature=0)
    assert cm.choices[0].finish_reason in ("stop", "length")
    chunks = list(c.completions.create(model="demo", prompt="1, 2,", max_tokens=2, stream=True,
                                       stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens >= 1
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="gpt-9", messages=HI)
    assert e.value.code == "model_not_found" and e.value.param == "model"
    assert [m.id for m in c.models.list().data] == ["demo"]

    rc = openai.OpenAI(base_url=r1.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    r = rc.chat.completions.create(model="r1", messages=HI, temperature=0)
    assert r.choices[0].message.model_extra["reasoning_content"] == "Let me think"
    s = list(rc.chat.completions.create(model="r1", messages=HI, temperature=0, stream=True,
                                        stream_options={"include_usage": True}))
    assert s[-1].usage.completion_tokens == r1.tokens and s[-2].choices[0].finish_reason == "stop"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=r1.url + "/v1", api_key="sk-wrong", max_retries=0).models.list()
