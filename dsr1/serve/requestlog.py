"""The server's log: one line per answered request, in the human format (default) or as JSON
(`dsr1 serve --log-format json`: one object per line, for log shippers such as Vector, Fluent
Bit or Promtail).

A request line carries its id, endpoint, status, token counts and timings; never the API key
(headers are never logged) and never prompt or output text unless `--log-content` asks for it.
The same formatter serves every other dsr1.serve message, so a JSON log stays JSON throughout.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

REQUESTS = logging.getLogger("dsr1.requests")
FORMATS = ("human", "json")
_CONTENT_KEYS = ("prompt", "output")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                               + f".{int(record.msecs):03d}Z", "level": record.levelname.lower(),
                               "logger": record.name}
        fields = getattr(record, "fields", None)
        if fields:
            obj["event"] = "request"
            obj.update(fields)  # may name its own event (ready)
        else:
            obj["message"] = record.getMessage()
        if record.exc_info:
            obj["error"] = self.formatException(record.exc_info)
        return json.dumps(obj, ensure_ascii=False, default=str)


class HumanFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        if not fields:
            return f"{stamp} {record.levelname.lower()}: " + super().format(record)
        f = fields
        parts = [stamp, f.get("endpoint", "-"), str(f.get("status", "-"))]
        if f.get("prompt_tokens") is not None:
            parts.append(f"{f['prompt_tokens']}+{f.get('completion_tokens', 0)} tokens")
        if f.get("ttft_s") is not None:
            parts.append(f"ttft {f['ttft_s']:.3f}s")
        parts.append(f"{f.get('seconds', 0):.3f}s")
        if f.get("finish_reason"):
            parts.append(f"finish={f['finish_reason']}")
        if f.get("request_id"):
            parts.append(f"id={f['request_id']}")
        if f.get("error"):
            parts.append(f"error={f['error']!r}")
        return " ".join(parts)


_content = False
_format = "human"
READY = "dsr1 serve: ready on "  # the line scripts and dsr1.serve.child wait for


def configure(fmt: str = "human", *, content: bool = False, stream=None) -> None:
    """Send dsr1.serve's and the request log's records to stderr in `fmt`. Called once by `dsr1 serve`."""
    global _content, _format
    if fmt not in FORMATS:
        from dsr1.errors import UsageError

        raise UsageError(f"--log-format {fmt!r}", hint="use human or json")
    _content, _format = content, fmt
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else HumanFormatter())
    for name in ("dsr1.serve", "dsr1.requests"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(logging.INFO)
        logger.propagate = False
    if fmt == "json":
        # Everything else that writes to stderr goes through the same formatter: Python warnings,
        # the libraries' loggers; their progress bars (tqdm) are turned off.
        import os

        os.environ["TQDM_DISABLE"] = "1"
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # transformers adds its own stderr handler
        logging.captureWarnings(True)
        for name in ("py.warnings", "transformers", "accelerate", "huggingface_hub", "uvicorn", "uvicorn.error"):
            logger = logging.getLogger(name)
            logger.handlers[:] = [handler]
            logger.propagate = False


def request(**fields: Any) -> None:
    """Log one answered request. Text fields are dropped unless --log-content; None values are left out."""
    if not REQUESTS.isEnabledFor(logging.INFO):
        return
    rec = {k: v for k, v in fields.items() if v is not None and (_content or k not in _CONTENT_KEYS)}
    for k in ("seconds", "ttft_s"):
        if k in rec:
            rec[k] = round(rec[k], 4)
    REQUESTS.info("request", extra={"fields": rec})


def ready(url: str) -> None:
    """Announce the server on stderr: the plain line, or with --log-format json an object with
    "event": "ready" whose message is that same line."""
    if _format == "json":
        logging.getLogger("dsr1.serve").info(READY + url, extra={"fields": {"event": "ready", "url": url,
                                                                              "message": READY + url}})
    else:
        print(READY + url, file=sys.stderr, flush=True)


def say(level: str, text: str) -> None:
    """A start-up message (what `Output.info`/`warn` print) as a log record in the JSON format."""
    from rich.text import Text

    logging.getLogger("dsr1.serve").log(logging.WARNING if level == "warn" else logging.INFO,
                                        Text.from_markup(text).plain)


def json_mode() -> bool:
    return _format == "json"


class EngineEcho:
    """Where a supervised engine's output lines go (dsr1.supervise.Child's `echo`): as they are,
    or one JSON object per line with the engine as the logger."""

    def __init__(self, engine: str):
        self.log = logging.getLogger(f"dsr1.engine.{engine}")
        if json_mode():
            self.log.handlers[:] = logging.getLogger("dsr1.serve").handlers
            self.log.setLevel(logging.INFO)
            self.log.propagate = False

    def write(self, text: str) -> None:
        if not json_mode():
            sys.stderr.write(text)
            return
        line = text.rstrip("\n")
        if line.startswith("[") and "] " in line:
            line = line.split("] ", 1)[1]
        self.log.info(line)

    def flush(self) -> None:
        if not json_mode():
            sys.stderr.flush()


def output(json_result: bool, quiet: bool):
    """The command's Output (dsr1.output): as is, or with --log-format json its messages as JSON records."""
    from dsr1.output import Output

    if not json_mode():
        return Output(json_result, quiet)

    class LogOutput(Output):
        def info(self, message: str) -> None:
            if not self.quiet:
                say("info", message)

        def warn(self, message: str) -> None:
            say("warn", message)

    return LogOutput(json_result, quiet)
