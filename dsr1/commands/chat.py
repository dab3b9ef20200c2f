"""`dsr1 chat`: a terminal chat that shows R1's reasoning dimmed, then the answer."""

from __future__ import annotations

import contextlib
from typing import Optional

import typer

from dsr1.commands.options import ProfileOpt


def chat(
    model: Optional[str] = typer.Argument(None, help="Model to start a local server for (omit with --url)."),
    url: Optional[str] = typer.Option(None, "--url", help="Talk to a running server instead, e.g. http://127.0.0.1:8000."),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="Bearer key (or DSR1_API_KEY); with MODEL, the server it starts requires it too."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Cap each reply."),
    profile: Optional[str] = ProfileOpt,
) -> None:
    """Type a message, read the reply. /reset clears the conversation, /exit (or Ctrl-D) leaves. Earlier reasoning is not sent back (R1 does not expect it)."""
    from rich.console import Console

    from dsr1 import settings
    from dsr1.errors import UsageError
    from dsr1.serve.child import running

    if bool(model) == bool(url):
        raise UsageError("give either MODEL or --url", hint="dsr1 chat MODEL  or  dsr1 chat --url http://127.0.0.1:8000")
    console = Console(highlight=False)
    key = settings.api_key(api_key)
    with contextlib.ExitStack() as server:
        if model:
            log = settings.home() / "logs" / "chat-server.log"
            console.print(f"[dim]starting a server for {model} (log: {log})...[/]")
            url = server.enter_context(running(model, log=log, extra_args=["--profile", profile] if profile else [],
                                               api_key=key))
        _talk(console, url, key, max_tokens)


def _talk(console, url: str, key: str | None, max_tokens: int | None) -> None:
    from dsr1.chat import ChatSession

    session = ChatSession(url, api_key=key, max_tokens=max_tokens)
    name = session.connect()
    console.print(f"[dim]chatting with {name} at {url}; /reset clears, /exit leaves[/]")
    while True:
        try:
            text = console.input("[bold green]> [/]")
        except EOFError:
            break
        if text.strip() in ("/exit", "/quit"):
            break
        if text.strip() == "/reset":
            session.reset()
            console.print("[dim](conversation cleared)[/]")
            continue
        if not text.strip():
            continue
        kind_before = None
        for kind, delta in session.send(text):
            if kind == "content" and kind_before == "reasoning":
                console.print()
            console.print(delta, end="", style="dim" if kind == "reasoning" else None, markup=False)
            kind_before = kind
        r = session.last
        console.print()
        note = f" · stopped: {r.finish_reason}" if r.finish_reason == "length" else ""
        console.print(f"[dim]{r.completion_tokens} tokens in {r.seconds:.1f}s · {r.tokens_per_second:.1f} tok/s{note}[/]")
