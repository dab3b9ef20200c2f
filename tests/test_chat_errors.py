"""`dsr1.chat.ChatSession` against a real HTTP server on 127.0.0.1 that fails mid-stream, as
`dsr1 serve` does when generation breaks: an OpenAI-style error event inside the SSE stream."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dsr1.chat import ChatSession
from dsr1.errors import ServerError


class _FailingStream(BaseHTTPRequestHandler):
    def log_message(self, *a):  # keep pytest output clean
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        part = {"choices": [{"index": 0, "delta": {"content": "Half an"}, "finish_reason": None}]}
        err = {"error": {"message": "generation failed; see the server log", "type": "server_error"}}
        for event in (part, err):
            self.wfile.write(b"data: " + json.dumps(event).encode() + b"\n\n")
        self.wfile.write(b"data: [DONE]\n\n")


def test_an_error_event_mid_stream_is_reported_and_the_question_not_kept():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _FailingStream)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        s = ChatSession(f"http://127.0.0.1:{srv.server_port}", model="m")
        got = []
        with pytest.raises(ServerError, match="generation failed"):
            for part in s.send("hi"):
                got.append(part)
        assert got == [("content", "Half an")]
        assert s.history == []  # a retry sends the question once, not twice
    finally:
        srv.shutdown()
        srv.server_close()
