"""The streaming client against a real HTTP server on 127.0.0.1 (dsr1's loopback server).

The loopback server stands in for a model server at one seam: it lets a test choose
what the server does (reasoning fields, errors, keys) on a machine without a GPU.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading

import pytest

from dsr1.bench.client import Client, RequestSpec, normalize_url
from dsr1.bench.loopback import Behaviour, LoopbackServer
from dsr1.errors import AuthError, NetworkError, NotFoundError


def run(coro_fn):
    return asyncio.run(coro_fn())


def send_one(url, spec, **kw):
    async def go():
        async with Client(url, kw.pop("model", "loopback"), **kw) as c:
            return await c.send(spec)

    return run(go)


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_reasoning_then_answer_ttft_both_ways(field):
    b = Behaviour(reasoning_tokens=5, reasoning_field=field, token_delay_s=0.01, ttft_s=0.03)
    with LoopbackServer(behaviour=b, keep_bodies=True) as srv:
        r = send_one(srv.url, RequestSpec("hello", 8))
    assert r.ok, r.detail
    assert (r.reasoning_chunks, r.answer_chunks) == (5, 3)
    assert r.reasoning_text.startswith("tok0 ") and r.answer_text.startswith("tok5 ")
    # the role-only first chunk arrives at once; TTFT waits for the first real token (vllm #3759)
    assert r.ttft >= 0.03
    assert r.ttft_answer - r.ttft >= 5 * 0.01 * 0.9
    assert len(r.chunk_times) == 8 and r.chunk_times == sorted(r.chunk_times)
    assert r.e2e >= r.chunk_times[-1]
    assert r.usage == {"prompt_tokens": 1, "completion_tokens": 8, "total_tokens": 9}
    body = srv.stats.bodies[0]
    assert body["ignore_eos"] is True and body["stream"] is True and body["max_tokens"] == 8
    assert body["stream_options"] == {"include_usage": True}
    assert body["messages"] == [{"role": "user", "content": "hello"}]


def test_completions_endpoint_and_multi_token_chunks():
    with LoopbackServer(behaviour=Behaviour(tokens_per_chunk=3), keep_bodies=True) as srv:
        r = send_one(srv.url, RequestSpec("the prompt", 7), endpoint="completions", ignore_eos=False)
    assert r.ok and len(r.chunk_times) == 3 and r.answer_text.count("tok") == 7
    assert srv.stats.bodies[0]["prompt"] == "the prompt" and "ignore_eos" not in srv.stats.bodies[0]


def test_server_errors_are_recorded_not_raised():
    with LoopbackServer(behaviour=Behaviour(fail_every=2)) as srv:
        async def go():
            async with Client(srv.url, "loopback") as c:
                return [await c.send(RequestSpec("x", 3)) for _ in range(4)]

        results = run(go)
    assert [r.ok for r in results] == [True, False, True, False]
    assert results[1].error == "http_500" and "injected failure" in results[1].detail


def _broken_server(payload: bytes, accepted: list | None = None):
    """A socket server that answers each connection's first request with `payload` then hangs up (a
    stream cut mid-response; a keep-alive connection closed by the server), each connection on its
    own thread and appended to `accepted`."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)

    def answer(conn):
        with conn:
            conn.recv(65536)
            conn.sendall(payload)

    def serve():
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            if accepted is not None:
                accepted.append(conn)
            threading.Thread(target=answer, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return sock, f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_stream_cut_mid_response_is_a_read_error():
    event = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    sock, url = _broken_server(head + b"%x\r\n%s\r\n" % (len(event), event))
    try:
        r = send_one(url, RequestSpec("x", 4))
    finally:
        sock.close()
    assert not r.ok and r.error == "read" and len(r.chunk_times) == 1


def test_error_event_inside_stream():
    event = b'data: {"error": {"message": "out of memory", "code": 500}}\n\n'
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n" % len(event)
    sock, url = _broken_server(head + event)
    try:
        r = send_one(url, RequestSpec("x", 4))
    finally:
        sock.close()
    assert not r.ok and r.error == "stream_error" and "out of memory" in r.detail


def test_timeout_is_counted():
    with LoopbackServer(behaviour=Behaviour(ttft_s=2.0)) as srv:
        r = send_one(srv.url, RequestSpec("x", 2), timeout=0.2)
    assert not r.ok and r.error == "timeout"


def preflight(url, model="loopback", **kw):
    async def go():
        async with Client(url, model, **kw) as c:
            return await c.preflight()

    return run(go)


def test_preflight_reports_server_facts():
    with LoopbackServer(behaviour=Behaviour(model="m1", api_key="sekrit")) as srv:
        info = preflight(srv.url + "/v1", model=None, api_key="sekrit")
    assert info.model == "m1" and info.models == ["m1"] and info.usage_reported
    assert info.server_header == "dsr1-loopback" and info.ignore_eos_honoured is True
    assert info.reasoning_seen is False
    with LoopbackServer(behaviour=Behaviour(reasoning_tokens=2, reasoning_field="reasoning")) as srv:
        assert preflight(srv.url).reasoning_seen is True


def test_preflight_takes_tokens_without_text_when_usage_counts_them():
    """A random-weight model can sample ids its tokenizer has no text for: the stream carries no text,
    usage counts the tokens, and the endpoint works. Without usage nothing shows it generated at all."""
    with LoopbackServer(behaviour=Behaviour(textless=True)) as srv:
        assert preflight(srv.url).usage_reported
    with LoopbackServer(behaviour=Behaviour(textless=True, report_usage=False)) as srv:
        with pytest.raises(NetworkError, match="without any token"):
            preflight(srv.url)


def test_preflight_clear_errors_before_the_run():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(NetworkError, match="cannot reach") as e:
        preflight(dead)
    assert "--url" in e.value.hint
    with LoopbackServer(behaviour=Behaviour(model="m1", api_key="sekrit")) as srv:
        with pytest.raises(AuthError) as e:
            preflight(srv.url, model="m1", api_key="wrong")
        assert "--api-key" in e.value.hint
        with pytest.raises(NotFoundError) as e:
            preflight(srv.url, model="m2", api_key="sekrit")
        assert "m1" in e.value.hint and "--model" in e.value.hint


def test_normalize_url():
    assert normalize_url("http://h:1/v1/") == "http://h:1"
    assert normalize_url("http://h:1/v1/chat/completions") == "http://h:1"
    assert normalize_url("https://h/proxy/v1") == "https://h/proxy"


def test_keepalive_connections_are_reused():
    with LoopbackServer() as srv:
        async def go():
            async with Client(srv.url, "loopback") as c:
                for _ in range(20):
                    assert (await c.send(RequestSpec("x", 2))).ok
                return len(c.pool._idle)

        assert run(go) == 1


def test_idle_connections_the_server_closed_are_not_reused():
    # Every pooled connection is stale after a pause between sweep points (the server's keep-alive
    # timeout); a request must not fail because it retried on a second stale one. This server answers
    # one request per connection, keep-alive by its headers, then hangs up, as a timeout would.
    event = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\ndata: [DONE]\n\n'
    reply = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n%s" % (len(event), event)
    accepted: list = []
    sock, url = _broken_server(reply, accepted)

    async def go():
        async with Client(url, "m") as c:
            first = await asyncio.gather(*(c.send(RequestSpec("x", 1)) for _ in range(3)))
            pooled = len(c.pool._idle)
            await asyncio.sleep(0.3)  # the server has closed all three by now
            later = [await c.send(RequestSpec("x", 1)) for _ in range(3)]
            return first, pooled, later

    try:
        first, pooled, later = run(go)
    finally:
        sock.close()
    assert all(r.ok for r in first) and pooled == 3
    assert all(r.ok for r in later), [(r.error, r.detail) for r in later]
    assert len(accepted) == 6  # each later request on a new connection, none sent down a closed one


def test_loopback_non_streaming_is_valid_json():
    # the loopback server also answers plain requests, so the openai client can talk to it
    import openai

    with LoopbackServer() as srv:
        cli = openai.OpenAI(base_url=srv.url + "/v1", api_key="none")
        out = cli.chat.completions.create(model="loopback", messages=[{"role": "user", "content": "a b"}], max_tokens=3)
        stream = cli.chat.completions.create(model="loopback", messages=[{"role": "user", "content": "a b"}],
                                             max_tokens=3, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
    assert out.usage.completion_tokens == 3 and out.choices[0].message.content == "tok0 tok1 tok2 "
    assert chunks[-1].usage.completion_tokens == 3
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "tok0 tok1 tok2 "
    json.dumps(out.model_dump())


def test_think_tags_split_reasoning_from_answer_in_content():
    # R1 without a reasoning parser: thoughts arrive as content, closed by </think> (split across chunks here)
    parts = ["Let me think", " about it</th", "ink>\n\nThe answer", " is 4"]
    events = b"".join(b'data: {"choices":[{"index":0,"delta":{"content":%s}}]}\n\n' % json.dumps(p).encode()
                      for p in parts) + b"data: [DONE]\n\n"
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n" % len(events)
    sock, url = _broken_server(head + events)
    try:
        tagged = send_one(url, RequestSpec("x", 4), think_tags=True)
        plain = send_one(url, RequestSpec("x", 4))
    finally:
        sock.close()
    assert tagged.ok and tagged.reasoning_text == "Let me think about it</think>"
    assert tagged.answer_text == "The answer is 4"
    assert (tagged.reasoning_chunks, tagged.answer_chunks) == (3, 2)
    assert tagged.ttft_answer == tagged.chunk_times[2] >= tagged.ttft == tagged.chunk_times[0]
    assert plain.reasoning_chunks == 0 and plain.answer_text == "".join(parts)


def test_token_counters_from_prometheus_text():
    text = (b"# HELP vllm:generation_tokens_total Number of generation tokens processed.\n"
            b"# TYPE vllm:generation_tokens_total counter\n"
            b'vllm:generation_tokens_total{model_name="r1",engine="0"} 120.0\n'
            b'vllm:generation_tokens_total{model_name="r1",engine="1"} 30.0\n'
            b'vllm:prompt_tokens_total{model_name="r1"} 512.0 1700000000000\n'
            b'vllm:request_success_total{model_name="r1"} 9.0\n'
            b'vllm:time_to_first_token_seconds_sum{model_name="r1"} 1.5\n')
    sock, url = _broken_server(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(text) + text)
    try:
        async def go():
            async with Client(url, "m") as c:
                return await c.token_counters()

        counters = run(go)
    finally:
        sock.close()
    assert counters == {"vllm:generation_tokens_total": 150.0, "vllm:prompt_tokens_total": 512.0}


def test_think_tag_split_into_one_character_chunks():
    c = Client("http://127.0.0.1:1", "m", think_tags=True)
    res = __import__("dsr1.bench.client", fromlist=["RequestResult"]).RequestResult(ok=False, sent=0.0)
    pieces = ["hmm"] * 50 + list("</think>") + ["\n\n", "Yes", "."]
    for i, p in enumerate(pieces):
        c._event(json.dumps({"choices": [{"index": 0, "delta": {"content": p}}]}).encode(), i * 0.001, res)
    assert res.reasoning_text == "hmm" * 50 + "</think>\n\n" and res.answer_text == "Yes."
    assert res.ttft_answer == pytest.approx(59 * 0.001)  # "\n\n" alone is not an answer token
