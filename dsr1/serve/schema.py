"""Request parsing and response shapes of the OpenAI-compatible API.

Bodies are validated by hand into small dataclasses so every failure becomes an
OpenAI-style error naming the parameter (`{"error": {"message", "type", "param",
"code"}}`) with status 400, rather than a framework's own 422 format.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

# DeepSeek's recommended sampling for R1 (model card, "Usage Recommendations").
DEFAULT_TEMPERATURE = 0.6
DEFAULT_TOP_P = 0.95
MAX_STOP = 4


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass
class Common:
    """Parameters shared by chat and text completions."""

    model: str
    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool
    ignore_eos: bool
    options: list[str] = field(default_factory=list)  # optional parameters used (CAPABILITIES), forwarded
    n: int = 1


@dataclass
class ChatRequest(Common):
    messages: list[dict[str, str]] = field(default_factory=list)


@dataclass
class CompletionRequest(Common):
    prompt: str | list[int] = ""
    echo: bool = False


def _num(body: dict, name: str, lo: float, hi: float, default: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise bad(name, f"'{name}' must be a number, got {type(v).__name__}", "invalid_type")
    if not lo <= v <= hi:
        raise bad(name, f"'{name}' must be between {lo} and {hi}, got {v}")
    return float(v)


def _int(body: dict, name: str, lo: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(name, f"'{name}' must be an integer, got {type(v).__name__}", "invalid_type")
    if lo is not None and v < lo:
        raise bad(name, f"'{name}' must be at least {lo}, got {v}")
    return v


def _bool(body: dict, name: str) -> bool:
    v = body.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise bad(name, f"'{name}' must be a boolean, got {type(v).__name__}", "invalid_type")
    return v


# What a backend may honour beyond the core parameters, by capability (dsr1.serve.backend): a
# parameter whose capability the engine behind the front lacks is refused with one error shape.
CAPABILITIES = {
    "n": ("n",),
    "logprobs": ("logprobs", "top_logprobs"),
    "tools": ("tools", "tool_choice", "parallel_tool_calls"),
    "response_format": ("response_format",),
    "penalties": ("presence_penalty", "frequency_penalty", "repetition_penalty"),
    "logit_bias": ("logit_bias",),
}
ALL_CAPABILITIES = frozenset(CAPABILITIES)


def _absent(name: str, v: Any) -> bool:
    """A parameter sent at its no-op value asks nothing of the engine."""
    if v is None or v is False or v in ([], {}):
        return True
    if name == "n":
        return v == 1
    if name in ("presence_penalty", "frequency_penalty", "top_logprobs"):
        return v == 0
    if name == "repetition_penalty":
        return v == 1
    if name == "response_format":
        return isinstance(v, dict) and v.get("type") == "text"
    if name == "logprobs":
        return v == 0
    if name == "tool_choice":
        return v == "none"
    return False


def _check_passthrough(body: dict, *, chat: bool) -> None:
    """The shapes OpenAI's API (and vLLM's validation) demand of the optional parameters; what the
    engine checks beyond shapes (a tool's JSON schema, a grammar) it answers itself."""
    n = _int(body, "n", 1)
    if n is not None and n > 128:
        raise bad("n", f"'n' must be at most 128, got {n}")
    if chat:
        if body.get("logprobs") is not None and not isinstance(body.get("logprobs"), bool):
            raise bad("logprobs", "'logprobs' must be a boolean", "invalid_type")
        top = _int(body, "top_logprobs", 0)
        if top is not None and top > 20:
            raise bad("top_logprobs", f"'top_logprobs' must be at most 20, got {top}")
        if top and not body.get("logprobs"):
            raise bad("top_logprobs", "'top_logprobs' needs 'logprobs': true")
    else:
        lp = _int(body, "logprobs", 0)
        if lp is not None and lp > 20:
            raise bad("logprobs", f"'logprobs' must be at most 20, got {lp}")
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list) or not all(
                isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict)
                and isinstance(t["function"].get("name"), str) and t["function"]["name"]
                and isinstance(t["function"].get("parameters", {}), dict) for t in tools):
            raise bad("tools", "'tools' must be a list of {\"type\": \"function\", \"function\": {\"name\": ..., "
                               "\"parameters\": {...}}}", "invalid_type")
    choice = body.get("tool_choice")
    if choice is not None:
        named = isinstance(choice, dict) and choice.get("type") == "function" and \
            isinstance(choice.get("function"), dict) and isinstance(choice["function"].get("name"), str)
        if choice not in ("none", "auto", "required") and not named:
            raise bad("tool_choice", "'tool_choice' must be none, auto, required or {\"type\": \"function\", "
                                     "\"function\": {\"name\": ...}}")
        if choice != "none" and not tools:
            raise bad("tool_choice", "'tool_choice' needs 'tools'")
        if named and choice["function"]["name"] not in {t["function"]["name"] for t in tools}:
            raise bad("tool_choice", f"'tool_choice' names {choice['function']['name']!r}, which is not in 'tools'")
    rf = body.get("response_format")
    if rf is not None:
        kind = rf.get("type") if isinstance(rf, dict) else None
        if kind not in ("text", "json_object", "json_schema"):
            raise bad("response_format", "'response_format' must be {\"type\": \"text\" | \"json_object\" | "
                                         "\"json_schema\"}")
        if kind == "json_schema" and not (isinstance(rf.get("json_schema"), dict)
                                          and isinstance(rf["json_schema"].get("schema", {}), dict)):
            raise bad("response_format", "'response_format' json_schema needs 'json_schema': {\"name\": ..., "
                                         "\"schema\": {...}}")
    for name in ("presence_penalty", "frequency_penalty"):
        _num(body, name, -2.0, 2.0, 0.0)
    _num(body, "repetition_penalty", 0.01, 10.0, 1.0)
    lb = body.get("logit_bias")
    if lb is not None and not (isinstance(lb, dict) and all(
            str(k).lstrip("-").isdigit() and isinstance(v, (int, float)) and not isinstance(v, bool)
            and -100 <= v <= 100 for k, v in lb.items())):
        raise bad("logit_bias", "'logit_bias' maps token ids to numbers between -100 and 100", "invalid_type")
    if body.get("parallel_tool_calls") is not None:
        _bool(body, "parallel_tool_calls")


def _unsupported(body: dict, supports: frozenset[str], engine: str) -> list[str]:
    """Refuse what no engine here serves and what the engine behind the front lacks; returns the
    optional parameters the request uses (forwarded to the engine)."""
    for name in ("functions", "function_call", "suffix"):
        if body.get(name) not in (None, [], ""):
            raise bad(name, f"'{name}' is not supported by this server"
                            + (" (use 'tools')" if name.startswith("function") else ""), "unsupported_parameter")
    if body.get("best_of") not in (None, 1):
        raise bad("best_of", "'best_of' is not supported by this server (use 'n')", "unsupported_parameter")
    used = []
    for cap, names in CAPABILITIES.items():
        for name in names:
            v = body.get(name)
            if _absent(name, v):
                continue
            if cap not in supports:
                hint = "; the vllm and sglang engines serve it (--engine vllm)" if engine in ("embedded", "llamacpp") \
                    else ""
                raise bad(name, f"'{name}' is not supported by the {engine} engine behind this server{hint}",
                          "unsupported_parameter")
            used.append(name)
    return used


def _common(body: Any, supports: frozenset[str], engine: str, chat: bool) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_json")
    _check_passthrough(body, chat=chat)
    used = _unsupported(body, supports, engine)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "'model' is required and must be a string", "missing_required_parameter")
    max_tokens = _int(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", 1)
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise bad("stop", "'stop' must be a string or a list of strings", "invalid_type")
    if len(stops) > MAX_STOP or any(s == "" for s in stops):
        raise bad("stop", f"'stop' takes at most {MAX_STOP} non-empty strings")
    stream = _bool(body, "stream")
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not stream:
            raise bad("stream_options", "'stream_options' is only allowed when 'stream' is true")
        if not isinstance(opts, dict):
            raise bad("stream_options", "'stream_options' must be an object", "invalid_type")
        include_usage = _bool(opts, "include_usage")
    seed = _int(body, "seed")
    return dict(model=model, max_tokens=max_tokens, temperature=_num(body, "temperature", 0.0, 2.0, DEFAULT_TEMPERATURE),
                top_p=_num(body, "top_p", 1e-9, 1.0, DEFAULT_TOP_P), seed=seed, stop=stops, stream=stream,
                include_usage=include_usage, ignore_eos=_bool(body, "ignore_eos"), options=used,
                n=body.get("n") or 1)


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise bad(where, f"'{where}' parts must be {{\"type\": \"text\", \"text\": ...}}; other types are not supported",
                          "unsupported_value")
            parts.append(part["text"])
        return "".join(parts)
    raise bad(where, f"'{where}' must be a string or a list of text parts", "invalid_type")


def parse_chat(body: Any, supports: frozenset[str] = ALL_CAPABILITIES, engine: str = "engine") -> ChatRequest:
    """`supports`: the capabilities of the engine behind the front (dsr1.serve.backend)."""
    common = _common(body, supports, engine, chat=True)
    tools = "tools" in supports
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages", "'messages' must be a non-empty list", "invalid_type")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(where, f"'{where}' must be an object", "invalid_type")
        role = m.get("role")
        roles = ("system", "developer", "user", "assistant") + (("tool",) if tools else ())
        if role not in roles:
            raise bad(f"{where}.role", f"'{where}.role' must be {', '.join(roles)}, got {role!r}")
        if m.get("tool_calls") and not (tools and role == "assistant" and isinstance(m["tool_calls"], list)):
            raise bad(f"{where}.tool_calls", f"'{where}.tool_calls' is only allowed on assistant messages of an "
                                             "engine that serves tools", "unsupported_parameter")
        if role == "tool" and not isinstance(m.get("tool_call_id"), str):
            raise bad(f"{where}.tool_call_id", f"'{where}.tool_call_id' is required for a tool message",
                      "missing_required_parameter")
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        # reasoning_content sent back by clients is dropped: R1 never sees earlier reasoning (DeepSeek API docs).
        out.append({"role": "system" if role == "developer" else role, "content": _text(content, f"{where}.content")})
    return ChatRequest(**common, messages=out)


def parse_completion(body: Any, supports: frozenset[str] = ALL_CAPABILITIES,
                     engine: str = "engine") -> CompletionRequest:
    common = _common(body, supports, engine, chat=False)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        pass
    elif not isinstance(prompt, str) or prompt == "":
        raise bad("prompt", "'prompt' must be a non-empty string, a list with one string, or a list of token ids",
                  "invalid_type")
    return CompletionRequest(**common, prompt=prompt, echo=_bool(body, "echo"))


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def now() -> int:
    return int(time.time())
