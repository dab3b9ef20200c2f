"""Run a Starlette app under uvicorn the way dsr1 serve needs it, for every engine.

On SIGTERM/SIGINT uvicorn stops accepting and lets running requests finish for
`grace` seconds; `on_signal` runs first (the embedded scheduler stops admitting).
uvicorn re-raises a captured signal after shutdown, which would end the process with
-SIGTERM; a drained server exits 0 instead. A port that cannot be bound is dsr1's
ServerError (exit 10), not uvicorn's SystemExit(3).
"""

from __future__ import annotations

from typing import Callable

from dsr1.errors import ServerError


def make_server(app, *, host: str, port: int, grace: float, on_ready: Callable[[str], None],
                on_signal: Callable[[], None] = lambda: None):
    import uvicorn

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            on_signal()
            super().handle_exit(sig, frame)
            self._captured_signals.clear()

        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                sock = self.servers[0].sockets[0].getsockname()
                on_ready(f"http://{sock[0]}:{sock[1]}")

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=int(max(1, grace)), lifespan="on")
    return _Server(config)


def run(server, *, host: str, port: int) -> None:
    """server.run(), with a failed bind reported in dsr1's terms."""
    try:
        server.run()
    except SystemExit:
        if server.started:
            raise
    if not server.started:
        raise ServerError(f"could not listen on {host}:{port}", hint="pick another --port")
