"""Where `dsr1 bench --url` gets its tokenizer: dsr1's store, then the server's own /tokenize.

End to end with real parts: the demo GGUF imported by `dsr1 pull` into an isolated DSR1_HOME,
served by a real `dsr1 serve`, measured by `python -m dsr1 bench` as a user runs it.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import pytest

from dsr1.bench.loopback import Behaviour, LoopbackServer
from dsr1.bench.report import SCHEMA_PATH
from tests.serve_util import ServerProc

REPO = Path(__file__).resolve().parent.parent
SCHEMA = json.loads(SCHEMA_PATH.read_text())
pytestmark = pytest.mark.slow

RUN = ["--concurrency", "1", "--requests", "3", "--warmup", "0", "--input-len", "48", "--output-len", "4",
       "--no-plots"]


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "DSR1_HOME": str(home), **extra}
    env.pop("DSR1_API_KEY", None)
    return env


def _bench(home: Path, *args, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsr1", "bench", *map(str, args)], env=_env(home, **env), cwd=REPO,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def stored_and_served(demo_gguf, tmp_path_factory):
    """The README demo: `dsr1 pull <demo>.gguf --name smollm2-135m`, then `dsr1 serve smollm2-135m`."""
    home = tmp_path_factory.mktemp("dsr1-home")
    pull = subprocess.run([sys.executable, "-m", "dsr1", "pull", str(demo_gguf), "--name", "smollm2-135m",
                           "--quant", "none", "--json"], env=_env(home), cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert pull.returncode == 0, pull.stderr[-3000:]
    # kept as GGUF; no llama-server here, so the pull made the embedded engine's copy, tokenizer included
    model_dir = json.loads(pull.stdout)["embedded_dir"]
    srv = ServerProc(["smollm2-135m"], home=home, timeout=300)
    try:
        yield home, srv.url, model_dir
    finally:
        srv.stop()


def _check_exact_lengths(doc: dict) -> None:
    jsonschema.validate(doc, SCHEMA)
    for p in doc["points"]:
        assert p["summary"]["completed"] == 3, p["summary"]["errors"]
        for r in p["requests"]:
            # the prompt built to 48 tokens is 48 tokens to the server too (chat template included)
            assert r["client_input_tokens"] == r["usage_input_tokens"] == 48


def test_readme_demo_command_uses_the_stored_model(stored_and_served, tmp_path):
    """`dsr1 bench --url http://127.0.0.1:8000/v1 --model smollm2-135m` once failed with "random prompts
    need the model's tokenizer" although the model is in dsr1's store under that name."""
    home, url, model_dir = stored_and_served
    out = _bench(home, "--url", url + "/v1", "--model", "smollm2-135m", *RUN, "--out", tmp_path / "r")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "tokenizer: stored model smollm2-135m" in out.stderr
    doc = json.loads((tmp_path / "r" / "results.json").read_text())
    assert doc["tokenizer"]["source"] == "store" and doc["tokenizer"]["ref"] == model_dir
    _check_exact_lengths(doc)


def test_served_name_is_looked_up_in_the_store(stored_and_served, tmp_path):
    """No --model: the server's /v1/models id (here the stored name dsr1 serve uses) finds the store entry."""
    home, url, model_dir = stored_and_served
    out = _bench(home, "--url", url, *RUN, "--out", tmp_path / "r", "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads(out.stdout)
    assert data["server"]["model"] == "smollm2-135m"
    assert data["tokenizer"]["source"] == "store" and data["tokenizer"]["ref"] == model_dir


def test_tokenizer_flag_takes_a_stored_name(stored_and_served, tmp_path):
    home, _, model_dir = stored_and_served
    with LoopbackServer(behaviour=Behaviour(model="m")) as srv:
        # HF_HUB_OFFLINE: a name that is not a directory must not be looked up on the hub first
        out = _bench(home, "--url", srv.url, "--tokenizer", "smollm2-135m", *RUN, "--out", tmp_path / "r", "--json",
                     HF_HUB_OFFLINE="1")
    assert out.returncode == 0, out.stderr[-3000:]
    tok = json.loads(out.stdout)["tokenizer"]
    assert tok["source"] == "flag" and tok["ref"] == model_dir and "stored model smollm2-135m" in tok["label"]


# -- the server's own tokenizer -------------------------------------------------------------------------------------

class VllmTokenizeFront:
    """A real HTTP server on 127.0.0.1 that answers POST /tokenize and POST /detokenize in vLLM's shapes
    (vllm/entrypoints/serve/tokenize/protocol.py: {"prompt"} or {"messages", "add_generation_prompt"} ->
    {"count", "max_model_len", "tokens", "token_strs"}; {"tokens"} -> {"prompt"}) with the served model's
    real tokenizer, and passes every other request through to a real `dsr1 serve`.

    vLLM itself cannot be installed in this test environment (no GPU, no vllm wheel), so this stands in
    for its tokenizer endpoints; generation, usage and /v1/models come from dsr1 serve unchanged.
    `chat_messages=False` answers the messages form with HTTP 400, as SGLang's /tokenize did before it
    took chat messages.
    """

    def __init__(self, upstream: str, tokenizer_dir: str, *, chat_messages: bool = True):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.upstream = urlsplit(upstream)
        self.chat_messages = chat_messages
        self.calls: list[dict] = []
        front = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _json(self, status: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("content-length") or 0))

            def do_GET(self) -> None:
                self._proxy(b"")

            def do_POST(self) -> None:
                raw = self._body()
                if self.path in ("/tokenize", "/detokenize"):
                    body = json.loads(raw)
                    front.calls.append({"path": self.path, **body})
                    self._json(*front.answer(self.path, body))
                else:
                    self._proxy(raw)

            def _proxy(self, raw: bytes) -> None:
                up = http.client.HTTPConnection(front.upstream.hostname, front.upstream.port, timeout=300)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                up.request(self.command, self.path, body=raw or None, headers=headers)
                resp = up.getresponse()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "content-length", "connection", "server", "date"):
                        self.send_header(k, v)
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                while data := resp.read1(1 << 16):  # streamed events pass through as they arrive
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
                up.close()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def answer(self, path: str, body: dict) -> tuple[int, dict]:
        tok = self.tok
        if path == "/detokenize":
            return 200, {"prompt": tok.decode(body["tokens"])}
        if "messages" in body:
            if not self.chat_messages:
                return 400, {"object": "error", "message": "Exactly one of 'prompt' ... field required: prompt",
                             "type": "BadRequestError", "code": 400}
            # vLLM renders the chat template, then tokenizes without adding special tokens by default
            text = tok.apply_chat_template(body["messages"], add_generation_prompt=body.get("add_generation_prompt",
                                                                                            True), tokenize=False)
            ids = tok.encode(text, add_special_tokens=body.get("add_special_tokens", False))
        else:
            ids = tok.encode(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))
        return 200, {"count": len(ids), "max_model_len": 8192, "tokens": ids, "token_strs": None}

    def __enter__(self) -> "VllmTokenizeFront":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_server_tokenize_when_nothing_local_has_the_tokenizer(stored_and_served, tmp_path):
    """A client machine without the model (empty DSR1_HOME and HF cache): the server's /tokenize counts,
    and the prompts it sized are exactly as long to the server's own usage."""
    _, url, model_dir = stored_and_served
    empty = tmp_path / "client-home"
    with VllmTokenizeFront(url, model_dir) as front:
        out = _bench(empty, "--url", front.url, *RUN, "--out", tmp_path / "r", HF_HOME=str(tmp_path / "hf"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"tokenizer: the server's /tokenize at {front.url}" in out.stderr
    doc = json.loads((tmp_path / "r" / "results.json").read_text())
    tok = doc["tokenizer"]
    assert tok["source"] == "server" and tok["ref"] == front.url + "/tokenize"
    # what was tried before, and why it did not apply
    assert any("store" in t and "smollm2-135m" in t for t in tok["tried"])
    assert any("Hugging Face cache" in t for t in tok["tried"])
    _check_exact_lengths(doc)
    paths = {c["path"] for c in front.calls}
    assert paths == {"/tokenize", "/detokenize"}  # /detokenize checks the round trip once
    assert any("messages" in c for c in front.calls)  # chat prompts are counted through the server's template
    assert all(c.get("model") == "smollm2-135m" for c in front.calls)


def test_server_tokenize_without_chat_messages_names_the_fixes(stored_and_served, tmp_path):
    _, url, model_dir = stored_and_served
    with VllmTokenizeFront(url, model_dir, chat_messages=False) as front:
        out = _bench(tmp_path / "client-home", "--url", front.url, *RUN, "--out", tmp_path / "r",
                     HF_HOME=str(tmp_path / "hf"))
    assert out.returncode == 2, out.stderr[-3000:]
    assert "chat messages" in out.stderr
    assert "--tokenizer" in out.stderr and "--endpoint completions" in out.stderr
    assert not (tmp_path / "r" / "results.json").exists()

    # the fix it names works: raw prompts are counted with the special tokens the server adds to them
    with VllmTokenizeFront(url, model_dir, chat_messages=False) as front:
        out = _bench(tmp_path / "client-home", "--url", front.url, "--endpoint", "completions", *RUN,
                     "--out", tmp_path / "c", HF_HOME=str(tmp_path / "hf"))
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads((tmp_path / "c" / "results.json").read_text())
    assert doc["tokenizer"]["source"] == "server" and doc["config"]["endpoint"] == "completions"
    _check_exact_lengths(doc)
    assert not any("messages" in c for c in front.calls)


def test_server_words_for_random_prompts_are_single_tokens(demo_model_dir, monkeypatch):
    """The vocabulary cannot be listed over HTTP: common words are checked in groups, and groups holding a
    word of several tokens are halved until it is found and left out."""
    from dsr1.bench import tokenizer as tk

    long_words = ["antidisestablishmentarianism", "floccinaucinihilipilification", "pneumonoultramicroscopic"]
    words = tk.COMMON_WORDS[:80] + long_words
    monkeypatch.setattr(tk, "COMMON_WORDS", words)
    with VllmTokenizeFront("http://127.0.0.1:9", str(demo_model_dir)) as front:  # /tokenize only: no upstream
        st = tk.ServerTokenizer.probe(front.url, "smollm2-135m")
        assert st.style == "vLLM-style"
        front.calls.clear()
        got = st.counter(chat=True).plain_words()
    local = front.tok
    want = sorted(f" {w}" for w in words if len(local.encode(f" {w}", add_special_tokens=False)) == 1)
    assert got == want and len(want) >= 50
    assert not any(w.strip() in long_words for w in got)
    assert len(front.calls) < len(words) / 4  # many words per request, not one each


def test_no_tokenizer_anywhere_lists_what_was_tried(tmp_path):
    with LoopbackServer(behaviour=Behaviour(model="m")) as srv:  # no /tokenize
        out = _bench(tmp_path / "home", "--url", srv.url, *RUN, "--out", tmp_path / "r")
    assert out.returncode == 2, out.stderr
    assert "random prompts need the model's tokenizer" in out.stderr
    assert "/tokenize" in out.stderr and "HTTP 404" in out.stderr  # the server was asked, and why it did not do
    assert "fix: pass --tokenizer" in out.stderr
