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


def _unsupported(body: dict) -> None:
    n = body.get("n")
    if n not in (None, 1):
        raise bad("n", "only n=1 is supported", "unsupported_value")
    for name in ("logprobs", "top_logprobs", "tools", "functions", "logit_bias", "best_of", "suffix"):
        v = body.get(name)
        if v not in (None, False, [], {}, 0) and not (name == "best_of" and v == 1):
            raise bad(name, f"'{name}' is not supported by this server", "unsupported_parameter")
    for name in ("presence_penalty", "frequency_penalty"):
        v = body.get(name)
        if v not in (None, 0, 0.0):
            raise bad(name, f"'{name}' is not supported by this server (only 0)", "unsupported_value")
    rf = body.get("response_format")
    if rf not in (None, {}) and not (isinstance(rf, dict) and rf.get("type") == "text"):
        raise bad("response_format", "only response_format {\"type\": \"text\"} is supported", "unsupported_value")


def _common(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_json")
    _unsupported(body)
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
                include_usage=include_usage, ignore_eos=_bool(body, "ignore_eos"))


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


def parse_chat(body: Any) -> ChatRequest:
    common = _common(body)
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages", "'messages' must be a non-empty list", "invalid_type")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(where, f"'{where}' must be an object", "invalid_type")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise bad(f"{where}.role", f"'{where}.role' must be system, user or assistant, got {role!r}")
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        # reasoning_content sent back by clients is dropped: R1 never sees earlier reasoning (DeepSeek API docs).
        out.append({"role": "system" if role == "developer" else role, "content": _text(content, f"{where}.content")})
    return ChatRequest(**common, messages=out)


def parse_completion(body: Any) -> CompletionRequest:
    common = _common(body)
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
