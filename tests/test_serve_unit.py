"""Pure-logic tests of serve's pieces: reasoning parser choice, sampling, request validation, sizing.

The reasoning split itself: tests/test_reasoning.py.
"""

from __future__ import annotations

import pytest

from dsr1.errors import HardwareError, NotFoundError
from dsr1.serve import schema


def test_reasoning_parser_choice():
    from dsr1.errors import UsageError
    from dsr1.serve.server import choose_reasoning_parser

    assert choose_reasoning_parser("auto", has_think=True)[0] == "deepseek_r1"
    assert choose_reasoning_parser("auto", has_think=False)[0] == "none"
    assert choose_reasoning_parser("none", has_think=True)[0] == "none"
    assert choose_reasoning_parser("deepseek_r1", has_think=True)[0] == "deepseek_r1"
    with pytest.raises(UsageError) as e:
        choose_reasoning_parser("deepseek_r1", has_think=False)
    assert "</think>" in str(e.value) and "--reasoning-parser auto" in e.value.hint


def test_sampling_seed_is_per_request_and_top_p_exact():
    import torch

    from dsr1.serve.sampling import SamplingParams, make_generator, sample

    torch.manual_seed(0)
    logits = torch.randn(3, 5000)
    p = SamplingParams(max_tokens=5, temperature=0.7, top_p=0.9, seed=123)
    a = sample(logits, [p, p, p], [make_generator(123) for _ in range(3)])
    b = sample(logits[:1], [p], [make_generator(123)])
    assert a[0] == b[0]
    greedy = SamplingParams(max_tokens=5, temperature=0.0)
    assert sample(logits, [greedy] * 3, [None] * 3) == logits.argmax(-1).tolist()
    # top_p keeps exactly the smallest prefix reaching p: a peaked row samples only from its top tokens
    row = torch.full((5000,), -20.0)
    row[7], row[9] = 5.0, 4.0
    hot = SamplingParams(max_tokens=5, temperature=1.0, top_p=0.5)
    assert {sample(row[None], [hot], [make_generator(s)])[0] for s in range(30)} == {7}
    wide = SamplingParams(max_tokens=5, temperature=1.0, top_p=0.9)
    assert {sample(row[None], [wide], [make_generator(s)])[0] for s in range(60)} == {7, 9}
    flat = torch.zeros(1, 5000)  # the top-k shortcut does not reach top_p: draws from the whole row
    drawn = {sample(flat, [wide], [make_generator(s)])[0] for s in range(20)}
    assert len(drawn) > 15 and all(0 <= t < 5000 for t in drawn)
    # a wide top_p set (hundreds of tokens) is respected exactly: nothing outside it is drawn, and
    # draws follow the renormalized probabilities inside it
    slope = torch.linspace(2.0, -2.0, 1000)[None]
    probs = torch.softmax(slope[0], -1)
    kept = int(torch.searchsorted(probs.cumsum(0), torch.tensor(0.6))) + 1  # sorted already (descending)
    half = SamplingParams(max_tokens=5, temperature=1.0, top_p=0.6)
    draws = torch.tensor([sample(slope, [half], [make_generator(s)])[0] for s in range(600)])
    assert 64 < kept < 1000 and int(draws.max()) < kept
    want_low = float(probs[: kept // 2].sum() / probs[:kept].sum())  # share of the set's upper half
    assert abs(float((draws < kept // 2).float().mean()) - want_low) < 0.07
    full = SamplingParams(max_tokens=5, temperature=1.0, top_p=1.0)
    assert max(sample(slope, [full], [make_generator(s)])[0] for s in range(300)) >= kept


@pytest.mark.parametrize("body,param", [
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1.5}, "max_tokens"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": [1]}, "stop"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 5}, "stop"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": True}},
     "stream_options"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "logprobs": True}, "logprobs"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "seed": "1"}, "seed"),
    ({"model": "m", "messages": []}, "messages"),
    ({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x"}]}, "model"),
])
def test_chat_validation_names_the_parameter(body, param):
    with pytest.raises(schema.ApiError) as e:
        schema.parse_chat(body, frozenset(), "embedded")  # the embedded engine: no n, logprobs, tools
    assert e.value.status == 400 and e.value.param == param
    assert e.value.body()["error"]["param"] == param


_MSG = [{"role": "user", "content": "x"}]
_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


@pytest.mark.parametrize("extra,param", [
    ({"n": 0}, "n"), ({"n": 500}, "n"),
    ({"logprobs": "yes"}, "logprobs"), ({"top_logprobs": 3}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"tools": [{"type": "function"}]}, "tools"), ({"tools": {"name": "x"}}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"), ({"tools": [_TOOL], "tool_choice": "always"}, "tool_choice"),
    ({"tools": [_TOOL], "tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"presence_penalty": 3}, "presence_penalty"), ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"functions": [{"name": "f"}]}, "functions"), ({"best_of": 2}, "best_of"),
])
def test_options_an_engine_serves_are_checked_for_shape_before_it_sees_them(extra, param):
    with pytest.raises(schema.ApiError) as e:
        schema.parse_chat({"model": "m", "messages": _MSG, **extra}, schema.ALL_CAPABILITIES, "vllm")
    assert e.value.status == 400 and e.value.param == param, e.value.message


def test_options_pass_to_an_engine_that_serves_them_and_are_refused_by_one_that_does_not():
    from dsr1.serve.proxy import SUPPORTS

    body = {"model": "m", "messages": _MSG, "tools": [_TOOL], "tool_choice": "auto", "logprobs": True,
            "top_logprobs": 2, "n": 2, "response_format": {"type": "json_object"}, "presence_penalty": 0.5}
    c = schema.parse_chat(body, SUPPORTS["vllm"], "vllm")
    assert set(c.options) == {"tools", "tool_choice", "logprobs", "top_logprobs", "n", "response_format",
                              "presence_penalty"} and c.n == 2
    with pytest.raises(schema.ApiError) as e:  # llama-server: "Only one completion choice is allowed"
        schema.parse_chat(body, SUPPORTS["llamacpp"], "llamacpp")
    assert e.value.param == "n" and e.value.code == "unsupported_parameter" and "llamacpp" in e.value.message
    with pytest.raises(schema.ApiError) as e:
        schema.parse_chat(body, frozenset(), "embedded")
    assert e.value.code == "unsupported_parameter" and "--engine vllm" in e.value.message
    # no-op values ask nothing of the engine
    c = schema.parse_chat({"model": "m", "messages": _MSG, "n": 1, "logprobs": False, "presence_penalty": 0,
                           "response_format": {"type": "text"}, "tool_choice": "none"}, frozenset(), "embedded")
    assert c.options == []
    # a tool round trip's messages pass only where tools are served
    msgs = _MSG + [{"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
                                                                          "function": {"name": "f", "arguments": "{}"}}]},
                   {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    assert len(schema.parse_chat({"model": "m", "messages": msgs}, SUPPORTS["vllm"], "vllm").messages) == 3
    with pytest.raises(schema.ApiError) as e:
        schema.parse_chat({"model": "m", "messages": msgs}, frozenset(), "embedded")
    assert e.value.param == "messages[1].tool_calls"


def test_chat_defaults_follow_deepseek():
    c = schema.parse_chat({"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}],
                           "max_completion_tokens": 7})
    assert (c.temperature, c.top_p, c.max_tokens, c.messages[0]["content"]) == (0.6, 0.95, 7, "x")


def test_size_context_bounds_memory():
    from dsr1.serve.server import size_context

    per = 1000
    # default context shrinks to what the budget allows for all slots
    assert size_context(slots=4, per_token=per, wanted=None, model_max=8192, default=8192, budget=4 * 1000 * 2000) == 2000
    assert size_context(slots=4, per_token=per, wanted=None, model_max=1024, default=8192, budget=10**12) == 1024
    with pytest.raises(HardwareError, match="max-model-len"):
        size_context(slots=4, per_token=per, wanted=4096, model_max=8192, default=8192, budget=4 * 1000 * 2000)
    with pytest.raises(HardwareError):
        size_context(slots=64, per_token=per, wanted=None, model_max=8192, default=8192, budget=64 * 1000 * 100)


def test_dtype_choice_by_hardware_and_batch():
    from dsr1.serve.server import choose_dtype

    assert choose_dtype("auto", cuda=False, bf16_cpu=True, batch=16, measure=lambda: ("fp32", "timed"))[0] == "fp32"
    assert choose_dtype("auto", cuda=False, bf16_cpu=True, batch=16)[0] == "bf16"  # nothing measured: the rule
    assert choose_dtype("auto", cuda=False, bf16_cpu=True, batch=1)[0] == "fp32"
    assert choose_dtype("auto", cuda=False, bf16_cpu=False, batch=16)[0] == "fp32"
    assert choose_dtype("fp16", cuda=False, bf16_cpu=True, batch=16) == ("fp16", "flag")


def test_resolve_model_names(tmp_path, isolated_home):
    from dsr1.serve.server import resolve_model_dir

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    assert resolve_model_dir(str(tmp_path / "m")) == tmp_path / "m"
    # A catalog name that is not stored is pulled first: tests/test_serve_autopull.py.
    with pytest.raises(NotFoundError):
        resolve_model_dir("no-such-model-anywhere")


def test_serve_and_chat_commands_import_no_torch():
    import subprocess
    import sys

    from tests.serve_util import REPO

    code = ("import sys, dsr1.cli, dsr1.commands.serve, dsr1.commands.chat; "
            "print(','.join(m for m in ('torch', 'transformers', 'accelerate') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": str(REPO)},
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_dtype_calibration_times_both_dtypes_once_per_machine(tmp_path):
    """The real measurement on this CPU, with the demo model's shapes (576 x 1536): both dtypes timed,
    kept in the cache file, and the second call reads it instead of timing again."""
    import json

    from dsr1.serve import calibrate

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"hidden_size": 576, "intermediate_size": 1536}))
    first = calibrate.measure(576, 1536, (1, 4), tmp_path / "cache")
    assert not first["cached"] and all(first[d][b] > 0 for d in ("bf16", "fp32") for b in (1, 4))
    again = calibrate.measure(576, 1536, (1, 4), tmp_path / "cache")
    assert again["cached"] and again["fp32"] == first["fp32"]
    dtype, why = calibrate.choose(model, 4, tmp_path / "cache")
    faster = "bf16" if first["bf16"][4] <= first["fp32"][4] else "fp32"
    assert dtype == faster and "cached measurement" in why and "batch 4" in why


def test_compile_auto_is_timed_at_start_on_a_cpu(monkeypatch):
    """auto on a CPU (bf16 or fp32, whatever its flags) leaves the choice to a timing at start
    (dsr1.serve.compileprobe) when a compiler is there and RAM has room for the packed copy of the
    weights; off on a GPU, without room, and for a model that cannot take the fast path. The plan
    decides this much before the model is loaded (dsr1.serve.decide)."""
    from dsr1.serve.decide import COMPILE_AT_START, compile_choice

    monkeypatch.delenv("DSR1_COMPILE", raising=False)
    w = 4 * 2**20

    def choose(req, dtype="bf16", device="cpu", spare=8 * 2**30, fast=None, weights=None):
        return compile_choice(req, fast_reason=fast, device=device, dtype=dtype, weights_bytes=w, spare_bytes=spare,
                              weights=weights)

    assert choose("auto") == (False, COMPILE_AT_START)  # the CPU's flags (AMX or not) no longer decide
    assert choose("auto", dtype="fp32") == (False, COMPILE_AT_START)
    on, why = choose("auto", device="cuda")
    assert not on and why != COMPILE_AT_START
    on, why = choose("auto", spare=2**30)
    assert not on and "second, packed copy" in why
    assert choose("on") == (True, "compile on")
    assert choose("off") == (False, "compile off")
    on, why = choose("auto", fast="architecture 'gpt2'")
    assert not on and "gpt2" in why
    # weight-only int4 compiles (plain tensors, inductor's int4 template); int8's fbgemm packing cannot.
    # (Where int4 takes dsr1's VNNI kernel instead, auto leaves it eager: tests/test_int4vnni.py.)
    monkeypatch.setenv("DSR1_INT4_VNNI", "off")
    assert choose("auto", weights="int4") == (False, COMPILE_AT_START)
    assert choose("on", weights="int4") == (True, "compile on")
    on, why = choose("auto", weights="int8")
    assert not on and "fbgemm" in why
    from dsr1.errors import ConfigError

    with pytest.raises(ConfigError, match="does not take weight-only int8"):
        choose("on", weights="int8")


def test_the_server_harness_deadline_holds_when_the_child_prints_nothing(tmp_path):
    """tests/serve_util.ServerProc: a child that hangs silently fails the test at its deadline (a
    sitecustomize that sleeps before dsr1 starts stands in for a silent hang)."""
    import time

    from tests.serve_util import REPO, ServerProc

    (tmp_path / "sitecustomize.py").write_text("import time\ntime.sleep(60)\n")
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="no ready line within 2s"):
        ServerProc(["unused"], tmp_path / "home", env={"PYTHONPATH": f"{tmp_path}:{REPO}"}, timeout=2)
    assert time.monotonic() - t0 < 10
