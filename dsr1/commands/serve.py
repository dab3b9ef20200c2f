"""`dsr1 serve`: an OpenAI-compatible R1 server on the embedded engine."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dsr1.commands.options import JsonOpt, ProfileOpt, QuietOpt


def _api_key(flag: Optional[str], key_file: Optional[Path]) -> Optional[str]:
    from dsr1 import settings
    from dsr1.errors import UsageError

    if flag and key_file:
        raise UsageError("--api-key and --api-key-file both given", hint="use one of them")
    if key_file:
        try:
            key = key_file.expanduser().read_text().strip()
        except OSError as e:
            raise UsageError(f"cannot read --api-key-file {key_file}: {e.strerror}", hint="check the path") from None
        if not key:
            raise UsageError(f"--api-key-file {key_file} is empty", hint="write the key into the file")
        return key
    return settings.api_key(flag)


def serve(
    model: str = typer.Argument(..., help="Model directory, stored model name, or catalog name."),
    profile: Optional[str] = ProfileOpt,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind. Anything but loopback needs --api-key."),
    port: int = typer.Option(8000, "--port", help="Port (0 picks a free one; the URL is printed)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="Bearer key clients must send (or DSR1_API_KEY)."),
    api_key_file: Optional[Path] = typer.Option(None, "--api-key-file", help="Read the API key from this file."),
    max_concurrent: Optional[int] = typer.Option(None, "--max-concurrent", help="Requests decoded together (profile default)."),
    max_queue: Optional[int] = typer.Option(None, "--max-queue", help="Requests waiting for a slot before 429 (default 4x max-concurrent)."),
    max_model_len: Optional[int] = typer.Option(None, "--max-model-len", help="Context per request, prompt + output (profile/model default, capped by memory)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, bf16, fp16 or fp32 (auto: by hardware and batch)."),
    device_map: Optional[str] = typer.Option(None, "--device-map", help="auto, cpu or cuda (default: auto with a GPU, else cpu)."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="Per-device weight limits, e.g. 0=20GiB,cpu=60GiB."),
    offload_dir: Optional[Path] = typer.Option(None, "--offload-dir", help="Folder for weights offloaded to disk."),
    stream_interval: int = typer.Option(1, "--stream-interval", help="Tokens per streamed chunk."),
    prefill_chunk: int = typer.Option(256, "--prefill-chunk", help="Prompt tokens processed between decode steps (bounds stalls)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch (default: torch's choice)."),
    served_model_name: Optional[str] = typer.Option(None, "--served-model-name", help="Name clients pass as `model`."),
    reasoning_parser: str = typer.Option("auto", "--reasoning-parser", help="deepseek_r1 (text before </think> is reasoning), none (no split); auto: deepseek_r1 if the tokenizer has </think>."),
    reasoning_field: str = typer.Option("both", "--reasoning-field", help="reasoning_content (DeepSeek), reasoning (vLLM 0.11+) or both."),
    system_prompt: str = typer.Option("auto", "--system-prompt", help="keep, merge (into the first user turn, DeepSeek's R1 advice), drop; auto: merge for R1."),
    audit_log: Optional[Path] = typer.Option(None, "--audit-log", help="Append a JSONL line per request (no keys, no text)."),
    audit_content: bool = typer.Option(False, "--audit-content", help="Also record prompts and outputs in --audit-log."),
    grace: float = typer.Option(30.0, "--grace", help="Seconds running requests get to finish after SIGTERM/SIGINT."),
    json: bool = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Serve MODEL over HTTP with the OpenAI API (chat, completions, models, health, metrics). R1 reasoning comes back in `reasoning_content`. Stops cleanly on SIGTERM/Ctrl-C. See docs/serve.md."""
    import json as _json
    import sys

    from dsr1.errors import UsageError
    from dsr1.output import Output
    from dsr1.serve import server

    if reasoning_parser not in server.REASONING_PARSERS:
        raise UsageError(f"--reasoning-parser {reasoning_parser!r}", hint="use auto, deepseek_r1 or none")
    if reasoning_field not in ("reasoning_content", "reasoning", "both"):
        raise UsageError(f"--reasoning-field {reasoning_field!r}", hint="use reasoning_content, reasoning or both")
    if system_prompt not in ("auto", "keep", "merge", "drop"):
        raise UsageError(f"--system-prompt {system_prompt!r}", hint="use auto, keep, merge or drop")
    if audit_content and not audit_log:
        raise UsageError("--audit-content needs --audit-log", hint="add --audit-log PATH")
    opts = server.ServeOptions(
        model=model, profile=profile, host=host, port=port, api_key=_api_key(api_key, api_key_file),
        max_concurrent=max_concurrent, max_queue=max_queue, max_model_len=max_model_len, dtype=dtype,
        device_map=device_map, max_memory=max_memory, offload_dir=offload_dir, stream_interval=stream_interval,
        prefill_chunk=prefill_chunk, threads=threads, served_name=served_model_name, reasoning_parser=reasoning_parser,
        reasoning_field=reasoning_field, system_prompt=system_prompt, audit_log=audit_log, audit_content=audit_content,
        grace=grace)
    out = Output(json, quiet)
    p, sched, cfg, metrics = server.plan(opts, progress=out.info)
    for w in p.warnings:
        out.warn(w)
    gib = 2**30
    out.info(f"model      {p.model_dir} as [cyan]{p.served_name}[/] ({p.dtype}: {p.dtype_reason}; loaded in {p.load_seconds}s)")
    out.info(f"profile    {p.profile}; device {p.device}")
    out.info(f"batching   {p.max_concurrent} running, {p.max_queue} queued, context {p.max_model_len} tokens, "
             f"prefill chunk {p.prefill_chunk}")
    out.info(f"kv cache   {p.kv_cache_bytes / gib:.2f} GiB ({p.kv_bytes_per_token} B/token) of a "
             f"{p.memory_budget_bytes / gib:.1f} GiB budget")
    fields = "reasoning_content and reasoning" if reasoning_field == "both" else reasoning_field
    split = f"{p.reasoning_parser}, into {fields}" if p.reasoning_parser != "none" else "off, everything in content"
    out.info(f"reasoning  {split} ({p.reasoning_why}); system prompt: {p.system_prompt}")

    def ready(url: str) -> None:
        if json:
            sys.stdout.write(_json.dumps({"event": "ready", "url": url, "plan": _plan_dict(p)}) + "\n")
            sys.stdout.flush()
        # Always on stderr, unconditionally: scripts and tests wait for this line.
        print(f"dsr1 serve: ready on {url}", file=sys.stderr, flush=True)

    server.run(opts, p, sched, cfg, metrics, ready)
    out.info("dsr1 serve: stopped")


def _plan_dict(p) -> dict:
    from dsr1.output import to_jsonable

    return to_jsonable(p)
