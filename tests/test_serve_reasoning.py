"""Streaming and non-streaming responses split R1 reasoning identically, end to end.

One tiny Qwen2 (tests/serve_util.build_scripted_r1) plays every case: its chat template
ends the prompt with "<｜Assistant｜>" followed by the last user message verbatim, so the
message picks the script the model writes (the last prompt token is the script's trigger).
Each case is requested streaming and not, through the official `openai` client, with
several --stream-interval and --reasoning-field settings, at every max_tokens up to the
full output; the reasoning and content must be the same strings both ways.
"""

from __future__ import annotations

import subprocess
import sys

import openai
import pytest

from tests.serve_util import R1_SPECIAL, REPO, ServerProc, build_scripted_r1

pytestmark = pytest.mark.slow
EOS = R1_SPECIAL[1]
FIELDS = ("reasoning_content", "reasoning")

# Each script starts with its trigger, the last prompt token: "\n" for the message "<think>\n",
# "<｜Assistant｜>" for "", else the message itself. Scripts merge into FORCED's tail (a token
# has one successor), so "</think>", "\n\n" and "The answer" are shared.
FORCED = ["\n", "Let", " me", " think", "</think>", "\n\n", "The", " answer", EOS]
SCRIPTS = [
    FORCED,  # after "<think>\n" from the prompt, as DeepSeek's current template ends it
    ["<｜Assistant｜>", "<think>", "\n"],  # the model opens <think> itself (older template)
    ["late", "Okay", " so", "</think>"],  # never opens <think>, closes it later (old R1-Distill, GGUF templates)
    ["split", "Step", " one", "</", "think", ">", "\n\n"],  # </think> written as three ordinary tokens
    ["Alpha", " <", "th", "ink", ">"],  # " <think>" as ordinary tokens, never closed
    ["plain", "Hello", " world", EOS],  # no tags at all
]
# message -> (raw output, reasoning, content) for a full, unlimited answer
CASES = {
    "<think>\n": ("Let me think</think>\n\nThe answer", "Let me think", "The answer"),
    "": ("<think>\nLet me think</think>\n\nThe answer", "Let me think", "The answer"),
    "late": ("Okay so</think>\n\nThe answer", "Okay so", "The answer"),
    "split": ("Step one</think>\n\nThe answer", "Step one", "The answer"),
    "Alpha": (" <think>\n\nThe answer", "The answer", ""),
    "plain": ("Hello world", "Hello world", ""),
}
ANSWER_TOKENS = {"<think>\n": 7, "": 9, "late": 6, "split": 8, "Alpha": 7, "plain": 2}  # before EOS
# (message, max_tokens) -> (reasoning, content) when max_tokens ends the answer early
TRUNCATED = {
    ("<think>\n", 2): ("Let me", ""),
    ("split", 3): ("Step one</", ""),  # a partial tag held back while streaming is flushed at the end
    ("split", 4): ("Step one</think", ""),
    ("split", 5): ("Step one", ""),
    ("Alpha", 3): ("<think", ""),  # not (yet) a tag: reasoning text
    ("Alpha", 4): ("", ""),  # " <think>": whitespace and tag dropped
}


@pytest.fixture(scope="module")
def scripted_model(tiny_model_factory, tmp_path_factory):
    from dsr1.serve.engine import R1_CHAT_TEMPLATE

    prompt_end = "{{ '<｜Assistant｜><think>\\n' }}"
    assert prompt_end in R1_CHAT_TEMPLATE
    template = R1_CHAT_TEMPLATE.replace(prompt_end, "{{ '<｜Assistant｜>' + messages[-1]['content'] }}")
    return build_scripted_r1(tiny_model_factory("qwen2"), tmp_path_factory.mktemp("scripted-r1") / "m", SCRIPTS,
                             chat_template=template)


def _serve(model, home, *args):
    return ServerProc([str(model), "--served-model-name", "r1", "--max-model-len", "256", "--max-concurrent", "2",
                       "--dtype", "fp32", "--threads", "1", *args], home)


# (stream interval, --reasoning-field, --reasoning-parser or None for the default)
@pytest.fixture(scope="module", params=[(1, "both", None), (3, "reasoning_content", "deepseek_r1"),
                                        (2, "reasoning", "auto")],
                ids=["interval1-both-default", "interval3-reasoning_content-deepseek_r1", "interval2-reasoning-auto"])
def split_server(request, scripted_model, tmp_path_factory):
    interval, field, parser = request.param
    args = ["--stream-interval", str(interval), "--reasoning-field", field]
    srv = _serve(scripted_model, tmp_path_factory.mktemp("home"), *args,
                 *(["--reasoning-parser", parser] if parser else []))
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
    yield srv, client, FIELDS if field == "both" else (field,)
    assert srv.stop() == 0, "".join(srv.lines[-20:])


def _whole(client, message, **kw):
    """Non-streaming: ({reasoning field: text}, content, finish_reason)."""
    r = client.chat.completions.create(model="r1", messages=[{"role": "user", "content": message}],
                                       temperature=0, **kw)
    m = r.choices[0].message
    extra = m.model_extra or {}
    return {f: extra[f] for f in FIELDS if f in extra}, m.content, r.choices[0].finish_reason


def _streamed(client, message, **kw):
    """Streaming: the same triple, each field the concatenation of its deltas ("" when a field never came)."""
    fields: dict[str, str] = {}
    content, finish = "", None
    for chunk in client.chat.completions.create(model="r1", messages=[{"role": "user", "content": message}],
                                                temperature=0, stream=True, **kw):
        for ch in chunk.choices:
            extra = ch.delta.model_extra or {}
            for f in FIELDS:
                if f in extra:
                    fields[f] = fields.get(f, "") + extra[f]
            content += ch.delta.content or ""
            finish = ch.finish_reason or finish
    return fields, content, finish


def _check(srv_fields, message, whole, streamed):
    fields, content, finish = whole
    assert set(fields) == set(srv_fields), (message, fields)  # present even when empty
    assert len(set(fields.values())) == 1, fields  # with `both`, the two fields carry the same text
    s_fields, s_content, s_finish = streamed
    assert set(s_fields) <= set(srv_fields)
    assert {f: s_fields.get(f, "") for f in srv_fields} == fields, message
    assert (s_content, s_finish) == (content, finish), message
    return next(iter(fields.values())), content, finish


@pytest.mark.parametrize("message", list(CASES), ids=[repr(m) for m in CASES])
def test_stream_and_whole_agree_on_full_answers(split_server, message):
    srv, client, fields = split_server
    got = _check(fields, message, _whole(client, message), _streamed(client, message))
    assert got == (*CASES[message][1:], "stop")


@pytest.mark.parametrize("message", list(CASES), ids=[repr(m) for m in CASES])
def test_stream_and_whole_agree_at_every_max_tokens(split_server, message):
    srv, client, fields = split_server
    raw, tokens = CASES[message][0], ANSWER_TOKENS[message]
    for max_tokens in range(1, tokens + 2):
        reasoning, content, finish = _check(fields, message, _whole(client, message, max_tokens=max_tokens),
                                            _streamed(client, message, max_tokens=max_tokens))
        assert finish == ("length" if max_tokens <= tokens else "stop")
        assert len(reasoning) + len(content) <= len(raw)
        if (message, max_tokens) in TRUNCATED:
            assert (reasoning, content) == TRUNCATED[message, max_tokens]
    assert (reasoning, content) == CASES[message][1:]


@pytest.fixture(scope="module")
def unsplit_server(scripted_model, tmp_path_factory):
    srv = _serve(scripted_model, tmp_path_factory.mktemp("home"), "--stream-interval", "2",
                 "--reasoning-parser", "none")
    yield srv, openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
    assert srv.stop() == 0, "".join(srv.lines[-20:])


@pytest.mark.parametrize("message", list(CASES), ids=[repr(m) for m in CASES])
def test_reasoning_parser_none_serves_the_raw_output(unsplit_server, message):
    srv, client = unsplit_server
    whole, streamed = _whole(client, message), _streamed(client, message)
    assert whole == streamed == ({}, CASES[message][0], "stop")


def test_startup_line_names_the_parser(split_server, unsplit_server):
    srv, _, fields = split_server
    line = next(x for x in srv.lines if x.startswith("reasoning "))
    assert "deepseek_r1" in line and fields[-1] in line, line
    line = next(x for x in unsplit_server[0].lines if x.startswith("reasoning "))
    assert "off" in line and "--reasoning-parser none" in line, line


def _serve_fails(*args, home):
    return subprocess.run([sys.executable, "-m", "dsr1", "serve", *args, "--port", "0", "--dtype", "fp32"],
                          capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "DSR1_HOME": str(home)})


def test_reasoning_parser_values_are_checked(scripted_model, tiny_model_factory, tmp_path):
    out = _serve_fails(str(scripted_model), "--reasoning-parser", "qwen3", home=tmp_path)
    assert out.returncode == 2 and "--reasoning-parser" in out.stderr and "deepseek_r1" in out.stderr, out.stderr
    # a model whose tokenizer has no </think> cannot be split: say so, and how to serve it
    out = _serve_fails(str(tiny_model_factory("qwen2")), "--reasoning-parser", "deepseek_r1", home=tmp_path)
    assert out.returncode == 2, out.stderr
    assert "</think>" in out.stderr and "--reasoning-parser auto" in out.stderr, out.stderr
