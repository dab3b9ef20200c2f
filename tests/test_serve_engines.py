"""`dsr1 serve --engine llamacpp|vllm`: real engines behind dsr1's front, through the official client.

The engines are the real ones, installed by scripts/engines.sh with `dsr1 engine install`
into DSR1_TEST_ENGINES_HOME (llama.cpp's llama-server built from source; vLLM's CPU build
in its own venv): `DSR1_TEST_ENGINES=1 bash scripts/test.sh`. Without
DSR1_TEST_ENGINES_HOME these tests skip; with it, a missing engine fails them, so a broken
install cannot pass as green.

The R1 reasoning cases use bigram-table models whose greedy output is a fixed script
(tests/gguf_util.build_tiny_gguf with `script=`, tests/serve_util.build_scripted_r1),
so what the engine's own reasoning parser returns, and what dsr1's front makes of it,
can be checked exactly.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import CACHE
from tests.gguf_util import build_tiny_gguf, r1_qwen_metadata
from tests.serve_util import REPO, ServerProc

pytestmark = pytest.mark.slow
KEY = "sk-engine-test-42"
R1_SCRIPT = ["<｜Assistant｜>", "<think>", "Ċ", "Let", "Ġme", "Ġthink", "</think>", "The", "Ġanswer",
             "<｜end▁of▁sentence｜>"]


def _engines_home() -> Path | None:
    home = os.environ.get("DSR1_TEST_ENGINES_HOME")
    return Path(home) if home else None


def _installed(name: str) -> dict | None:
    """The engine as `dsr1 engine list --json` reports it in DSR1_TEST_ENGINES_HOME."""
    home = _engines_home()
    if home is None:
        return None
    env = {**os.environ, "PYTHONPATH": str(REPO), "DSR1_HOME": str(home)}
    r = subprocess.run([sys.executable, "-m", "dsr1", "engine", "list", "--json"], capture_output=True, text=True,
                       env=env, timeout=120)
    if r.returncode != 0:
        return None
    for e in json.loads(r.stdout).get("engines", []):
        if e.get("name") == name and e.get("origin") == "dsr1":
            return e
    return None


def _need(name: str) -> dict:
    e = _installed(name)
    if e is None:
        if _engines_home() is None:
            pytest.skip("no DSR1_TEST_ENGINES_HOME: run DSR1_TEST_ENGINES=1 bash scripts/test.sh")
        pytest.fail(f"{name} is not installed in DSR1_TEST_ENGINES_HOME={_engines_home()} (run scripts/engines.sh)")
    return e


@pytest.fixture(scope="module")
def llama_server():
    return _need("llamacpp")


def _serve(args: list[str], home: Path, engine: dict, *, key: str | None = KEY, timeout: float = 900,
           extra_env: dict[str, str] | None = None) -> ServerProc:
    env = dict(extra_env or {})
    if key:
        env["DSR1_API_KEY"] = key
    if engine.get("binary"):  # llama-server from dsr1's engine dir, found on PATH as a user's would be
        env["PATH"] = str(Path(engine["binary"]).parent) + os.pathsep + os.environ.get("PATH", "")
    if engine.get("python"):
        args = [*args, "--engine-python", engine["python"]]
    return ServerProc(args, home, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def llama_demo(llama_server, demo_gguf, lora_adapter, tmp_path_factory):
    """The module's one llama-server on the demo GGUF, with a LoRA adapter (peft, converted to GGUF by
    llama.cpp's converter at start); its drain test runs last."""
    home = tmp_path_factory.mktemp("home-llama")
    srv = _serve([str(demo_gguf), "--engine", "llamacpp", "--served-model-name", "demo", "--max-concurrent", "4",
                  "--max-queue", "0", "--max-model-len", "1024", "--lora", f"a={lora_adapter}"], home, llama_server)
    yield srv
    srv.stop()


ENGINE_RUNNING = {"llamacpp": "llamacpp:requests_processing", "vllm": "vllm:num_requests_running"}


def _wait_admitted(srv: ServerProc, engine: str, key: str | None, timeout: float = 120) -> None:
    """Until the engine itself counts a running request (its own /metrics, behind dsr1's), not a sleep."""
    name = ENGINE_RUNNING[engine]
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = httpx.get(f"{srv.url}/metrics", headers=headers, timeout=10).text
        if any(line.startswith(name) and float(line.rsplit(" ", 1)[1]) >= 1 for line in text.splitlines()):
            return
        time.sleep(0.05)
    raise AssertionError(f"{engine} never counted the request as running ({name})")


def _client(srv: ServerProc, key: str | None = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key or "unused", max_retries=0, timeout=300)


def test_llamacpp_answers_through_dsr1s_front(llama_demo):
    c = _client(llama_demo)
    r = c.chat.completions.create(model="demo", messages=[{"role": "user", "content": "What is the capital of France?"}],
                                  max_tokens=24, temperature=0)
    # the Q4_1 file's greedy answer is not the bf16 model's; that it answers in words is what is checked
    assert len(r.choices[0].message.content.split()) >= 3
    assert r.usage.completion_tokens >= 1 and r.choices[0].finish_reason in ("stop", "length")
    text = ""
    for chunk in c.chat.completions.create(model="demo", stream=True, max_tokens=12, temperature=0,
                                           messages=[{"role": "user", "content": "Count to five."}]):
        text += "".join(ch.delta.content or "" for ch in chunk.choices)
    assert text.strip()
    cr = c.completions.create(model="demo", prompt="The capital of France is", max_tokens=4, temperature=0)
    assert cr.choices[0].text
    assert [m.id for m in c.models.list().data] == ["demo", "a"]


def _engine_url(srv: ServerProc, engine: str) -> str:
    flat = "".join("".join(srv.lines).split())  # rich wraps the long "starting ENGINE: ..." line anywhere
    port = re.search(rf"starting{engine}:.*?--port(\d+)", flat).group(1)
    return f"http://127.0.0.1:{port}"


def test_llamacpp_serves_lora_adapters_by_name_as_llama_server_itself_does(llama_demo):
    """--lora with llama-server: the peft adapter converted by llama.cpp's own converter, loaded at scale 0;
    the front sets the asked adapter's scale per request. Through dsr1 the adapter's answer differs from
    the base model's and is exactly what llama-server gives for that adapter asked directly."""
    c = _client(llama_demo)
    prompt = "The capital of France is"
    texts = {m: c.completions.create(model=m, prompt=prompt, max_tokens=12, temperature=0).choices[0].text
             for m in ("demo", "a")}
    assert texts["a"] != texts["demo"]
    own = {scale: httpx.post(f"{_engine_url(llama_demo, 'llamacpp')}/v1/completions", timeout=120, json={
        "model": "demo", "prompt": prompt, "max_tokens": 12, "temperature": 0, "lora": [{"id": 0, "scale": scale}]})
        .json()["choices"][0]["text"] for scale in (0.0, 1.0)}
    assert (own[0.0], own[1.0]) == (texts["demo"], texts["a"])
    assert "--lora-init-without-apply" in "".join(llama_demo.lines)


def test_llamacpp_front_keeps_dsr1s_rules(llama_demo):
    url = llama_demo.url
    assert httpx.get(f"{url}/health").json()["engine"] == "llamacpp"
    # the key is dsr1's, checked at the front
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "demo", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    auth = {"Authorization": f"Bearer {KEY}"}
    # the same validation as the embedded engine, before the engine sees anything
    r = httpx.post(f"{url}/v1/chat/completions", headers=auth, json={"model": "other", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(f"{url}/v1/chat/completions", headers=auth, json={"model": "demo", "messages": [{"role": "user", "content": "x"}], "n": 2})
    assert r.status_code == 400
    metrics = httpx.get(f"{url}/metrics", headers=auth).text
    assert "dsr1_requests_total" in metrics and "llamacpp:" in metrics
    assert "dsr1_kv_cache" not in metrics  # the embedded engine's series; llama.cpp reports its own


def test_llamacpp_responses_fit_openais_schema(llama_demo):
    """What llama-server answers, as dsr1's front relays it, validates against OpenAI's OpenAPI document."""
    from tests.test_openai_schema import check, stream

    auth = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "demo", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8}
    r = httpx.post(f"{llama_demo.url}/v1/chat/completions", headers=auth, json=body, timeout=300)
    check("CreateChatCompletionResponse", r.json())
    chunks = stream(llama_demo, "/v1/chat/completions", {**body, "stream_options": {"include_usage": True}}, KEY)
    for c in chunks:
        check("CreateChatCompletionStreamResponse", c)
    assert chunks[-1]["usage"]["completion_tokens"] >= 1
    r = httpx.post(f"{llama_demo.url}/v1/chat/completions", headers=auth, json={**body, "model": "nope"})
    check("ErrorResponse", r.json())


def test_llamacpp_overload_is_429(llama_demo):
    """4 running, no queue: the fifth and later concurrent requests get 429 with Retry-After."""
    auth = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "demo", "messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 64,
            "ignore_eos": True}
    codes: list[int] = []

    def one() -> None:
        codes.append(httpx.post(f"{llama_demo.url}/v1/chat/completions", headers=auth, json=body, timeout=300)
                     .status_code)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes.count(200) >= 4 and codes.count(429) >= 1 and set(codes) <= {200, 429}


def _assert_scripted_answer(c: openai.OpenAI, streamed_field: str) -> None:
    """The scripted R1 model's answer, non-streamed (both field names) and streamed (`streamed_field`)."""
    msgs = [{"role": "user", "content": "hi"}]
    m = c.chat.completions.create(model="r1", messages=msgs, max_tokens=20, temperature=0).choices[0].message
    assert (m.model_extra["reasoning_content"], m.model_extra["reasoning"], m.content) == \
        ("Let me think", "Let me think", "The answer")
    reasoning = content = ""
    for chunk in c.chat.completions.create(model="r1", messages=msgs, max_tokens=20, temperature=0, stream=True):
        for ch in chunk.choices:
            reasoning += (ch.delta.model_extra or {}).get(streamed_field) or ""
            content += ch.delta.content or ""
    assert (reasoning, content) == ("Let me think", "The answer")


def test_llamacpp_r1_reasoning_reaches_both_fields(llama_server, tmp_path):
    """llama-server's deepseek reasoning format, renamed by dsr1's front into both field names."""
    gguf = build_tiny_gguf(r1_qwen_metadata(CACHE), tmp_path / "scripted-r1.gguf", script=R1_SCRIPT)
    srv = _serve([str(gguf), "--engine", "llamacpp", "--served-model-name", "r1", "--max-model-len", "512"],
                 tmp_path / "home", llama_server)
    try:
        c = _client(srv)
        _assert_scripted_answer(c, "reasoning_content")
    finally:
        srv.stop()


def test_llamacpp_a_model_it_rejects_is_diagnosed_from_its_log(llama_server, demo_gguf, tmp_path):
    """A GGUF whose header passes dsr1's checks but whose tensor shapes llama.cpp refuses: the engine
    fails at load, and dsr1 exits with llama-server's own lines and the fix for what they say."""
    from dsr1 import gguf_meta
    from tests.gguf_util import HEAD_BYTES

    with open(demo_gguf, "rb") as f:
        meta = gguf_meta.parse(f.read(HEAD_BYTES), tensors=False).fields
    bad = build_tiny_gguf(meta, tmp_path / "bad.gguf", q_rows=18)  # attn_q: 18 rows where 16 belong
    env = {**os.environ, "PYTHONPATH": str(REPO), "DSR1_HOME": str(tmp_path / "home"),
           "PATH": str(Path(llama_server["binary"]).parent) + os.pathsep + os.environ.get("PATH", "")}
    r = subprocess.run([sys.executable, "-m", "dsr1", "serve", str(bad), "--engine", "llamacpp",
                        "--max-model-len", "512", "--port", "0"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 10 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "wrong shape" in r.stderr  # llama-server's own line, read from its log
    assert "llama-server could not read the GGUF" in r.stderr  # the diagnosis of it


# --- vLLM (CPU build) ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vllm():
    return _need("vllm")


@pytest.fixture(scope="module")
def lora_adapter(demo_model_dir, tmp_path_factory):
    from tests.test_lora import _make_adapter

    return _make_adapter(demo_model_dir, tmp_path_factory.mktemp("lora") / "a", 1,
                         ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


@pytest.fixture(scope="module")
def vllm_demo(vllm, demo_model_dir, lora_adapter, tmp_path_factory):
    """The module's one vLLM on the demo model (with a LoRA adapter beside it); its drain test runs last."""
    home = tmp_path_factory.mktemp("home-vllm")
    srv = _serve([str(demo_model_dir), "--engine", "vllm", "--served-model-name", "demo", "--max-model-len", "1024",
                  "--dtype", "bf16", "--lora", f"a={lora_adapter}"], home, vllm)
    yield srv
    srv.stop()


def test_vllm_answers_through_dsr1s_front(vllm_demo):
    c = _client(vllm_demo)
    r = c.chat.completions.create(model="demo", messages=[{"role": "user", "content": "What is the capital of France?"}],
                                  max_tokens=24, temperature=0)
    assert len(r.choices[0].message.content.split()) >= 3 and r.usage.completion_tokens >= 1
    text = ""
    for chunk in c.chat.completions.create(model="demo", stream=True, max_tokens=12, temperature=0,
                                           messages=[{"role": "user", "content": "Count to five."}],
                                           stream_options={"include_usage": True}):
        text += "".join(ch.delta.content or "" for ch in chunk.choices)
    assert text.strip()
    assert httpx.get(f"{vllm_demo.url}/health").json()["engine"] == "vllm"
    metrics = httpx.get(f"{vllm_demo.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert "dsr1_requests_total" in metrics and "vllm:" in metrics
    assert "dsr1_kv_cache" not in metrics and "vllm:kv_cache_usage_perc" in metrics


@pytest.fixture(scope="module")
def scripted_r1_for_vllm(demo_model_dir, tmp_path_factory):
    """A bigram-table Qwen2 with R1's tokens whose greedy answer is "<think>\\nLet me think</think>The answer"."""
    from tests.serve_util import build_r1_for_vllm

    return build_r1_for_vllm(demo_model_dir, tmp_path_factory.mktemp("vllm-r1"))


def test_vllm_serves_lora_adapters_by_name(vllm_demo):
    """--lora with vLLM: dsr1 passes vLLM's own LoRA flags; the adapter answers under its name,
    differently from the base model, through dsr1's front."""
    c = _client(vllm_demo)
    assert {m.id: m.model_extra["parent"] for m in c.models.list().data} == {"demo": None, "a": "demo"}
    texts = {}
    for model in ("demo", "a"):
        r = c.completions.create(model=model, prompt="The capital of France is", max_tokens=12, temperature=0)
        assert r.model == model
        texts[model] = r.choices[0].text
    assert texts["a"] != texts["demo"]
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="a", prompt="The capital of France is", max_tokens=12, temperature=0, stream=True) if ch.choices)
    assert streamed == texts["a"]
    own = httpx.post(f"{_engine_url(vllm_demo, 'vllm')}/v1/completions", timeout=120, json={
        "model": "a", "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0}).json()
    assert own["choices"][0]["text"] == texts["a"]  # what vLLM itself answers for the adapter
    assert "--enable-lora" in "".join(vllm_demo.lines)


def test_vllm_r1_reasoning_reaches_both_fields(vllm, scripted_r1_for_vllm, tmp_path):
    """vLLM's deepseek_r1 parser (its field is `reasoning` since 0.11) reaches clients in both names."""
    srv = _serve([str(scripted_r1_for_vllm), "--engine", "vllm", "--served-model-name", "r1", "--max-model-len",
                  "512", "--dtype", "fp32"], tmp_path / "home", vllm)
    try:
        _assert_scripted_answer(_client(srv), "reasoning")
    finally:
        srv.stop()


def test_vllm_a_model_it_rejects_is_diagnosed_from_its_log(vllm, tiny_model_factory, tmp_path):
    """A model whose config names an architecture vLLM has no implementation of (dsr1 plans it from the
    config's fields; the embedded engine would load it through transformers' model_type): vLLM refuses
    at start, and dsr1 exits with vLLM's own line and the fix."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_factory("qwen2"), model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "architectures": ["Dsr1NoSuchForCausalLM"]}))
    env = {**os.environ, "PYTHONPATH": str(REPO), "DSR1_HOME": str(tmp_path / "home")}
    r = subprocess.run([sys.executable, "-m", "dsr1", "serve", str(model), "--engine", "vllm",
                        "--engine-python", vllm["python"], "--max-model-len", "512", "--port", "0"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 10, r.stderr[-3000:]
    assert "Model architectures ['Dsr1NoSuchForCausalLM'] are not supported" in r.stderr  # vLLM's own line
    assert "vLLM has no implementation of 'Dsr1NoSuchForCausalLM'" in r.stderr  # the diagnosis of it


def test_vllm_cpu_tensor_parallel_two_nodes_on_one_host(vllm, demo_model_dir, tmp_path):
    """dsr1's multi-node path with vLLM's CPU build: two `dsr1 serve --nodes 2` ranks on this host,
    tensor parallel 2 (one TP rank per node, gloo between them), vLLM's own `--nnodes/--headless`
    launch (which needs `vllm serve`: dsr1's install registers vllm-cpu as `vllm` for it). The
    worker waits for node 0 in its pre-launch check; the head's front answers; SIGTERM stops both."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    model = tmp_path / "tp2"
    tok = AutoTokenizer.from_pretrained(demo_model_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True)  # head_dim 64: vLLM's CPU attention takes it; 2 heads split in 2
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(model)
    tok.save_pretrained(model)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        head_port = s.getsockname()[1]
    common = [str(model), "--engine", "vllm", "--engine-python", vllm["python"], "--nodes", "2",
              "--head", f"127.0.0.1:{head_port}", "--tensor-parallel", "2", "--served-model-name", "tp2"]
    home = tmp_path / "home"
    env = {**os.environ, "PYTHONPATH": str(REPO), "DSR1_HOME": str(home)}
    env.pop("DSR1_API_KEY", None)
    wlog = open(tmp_path / "worker.log", "w")
    worker = subprocess.Popen([sys.executable, "-m", "dsr1", "serve", *common, "--node-rank", "1"], stdout=wlog,
                              stderr=subprocess.STDOUT, env=env)
    try:
        head = ServerProc([*common, "--node-rank", "0"], home, timeout=900)
        try:
            assert any("checked: --head 127.0.0.1" in line for line in head.lines)
            # rich wraps the long "starting vllm: ..." line: compare with whitespace removed
            flat = "".join("".join(head.lines).split())
            argv = flat[flat.index("startingvllm"):]
            assert "--nnodes2" in argv and "--tensor-parallel-size2" in argv
            r = _client(head, key=None).completions.create(model="tp2", prompt="hello there", max_tokens=8,
                                                           temperature=0, extra_body={"ignore_eos": True})
            assert r.usage.completion_tokens == 8 and r.choices[0].finish_reason == "length"
            assert "tp2" in (r.system_fingerprint or "")  # vLLM's own: vllm-0.32.0-tp2-...
            # each rank runs a node agent; the worker's announces itself to the head's, so the head
            # lists both nodes for `dsr1 monitor init`, and the worker measures its way to the head
            from dsr1.monitoring import deployment

            deadline = time.monotonic() + 30
            while len((d := deployment.fetch(head.url)).nodes) < 2 and time.monotonic() < deadline:
                time.sleep(1)
            assert [n["rank"] for n in d.nodes] == [0, 1], d.nodes
            agent = httpx.get(f"http://{d.nodes[1]['address']}/metrics").text
            assert 'dsr1_node_head_reachable{node_rank="1"} 1.0' in agent and "dsr1_node_head_rtt_seconds" in agent
        finally:
            assert head.stop(timeout=120) == 0, "".join(head.lines[-30:])
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(120) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
        wlog.close()
    text = (tmp_path / "worker.log").read_text()
    assert "node 0 reachable" in text or "waiting for node 0" in text, text[-3000:]


def test_llamacpp_crash_while_loading_is_retried_without_repacking():
    """The retry rule alone (whether this CPU crashes depends on the CPU: an AVX512/AMX Xeon does with
    the demo Q4_1 GGUF, and then every llama-server test above goes through the retry)."""
    from dsr1.engines.llamacpp import ENGINE

    lines = ["load_model: loading model 'x.gguf'", "init: llama threadpool init, n_threads = 2"]
    argv, why = ENGINE.start_fallback(-11, lines, ["llama-server", "-m", "x.gguf"])
    assert argv[-1] == "--no-repack" and "SIGSEGV" in why
    assert ENGINE.start_fallback(-11, lines, argv) is None  # once only
    assert ENGINE.start_fallback(1, lines, ["llama-server"]) is None  # not a crash
    assert ENGINE.start_fallback(-11, lines + ["llama_server: model loaded"], ["llama-server"]) is None
    # the abort a deepseek2 GGUF gives on a Xeon with AMX (b11434), lines as llama-server printed them
    aborted = ["0.00.004.294 I srv    load_model: loading model 'tiny-v3-TQ1_0-00001-of-00003.gguf'",
               "llama.cpp/ggml/src/ggml-backend.cpp:1434: GGML_ASSERT(*cur_backend_id != -1) failed",
               "#3  0x000055ef4f32dfbd in ggml_backend_sched_split_graph ()"]
    argv, why = ENGINE.start_fallback(-6, aborted, ["llama-server", "-m", "x.gguf"])
    assert argv[-1] == "--no-repack" and "GGML_ASSERT" in why
    assert ENGINE.start_fallback(-6, aborted, argv) is None
    assert ENGINE.start_fallback(-6, lines, ["llama-server"]) is None  # another abort: not this one
    # with --lora, a line per adapted tensor pushes "load_model" out of the kept tail before the crash
    flood = [f"W llama_adapter_lora_init_impl: lora for 'blk.{i}.attn_q.weight' cannot use buft 'AMX', fallback to CPU"
             for i in range(250)] + ["init: llama threadpool init, n_threads = 2"]
    assert ENGINE.start_fallback(-11, flood[-200:], ["llama-server", "--lora", "a.gguf"])[0][-1] == "--no-repack"


def _names_missing_from_metrics(srv: ServerProc, engine: str) -> list[str]:
    """After a plain and a streamed request, every metric name the monitoring setup for this
    deployment queries (dashboard and rules) that the front's /metrics (dsr1's series plus the
    engine's own) does not have."""
    import re

    from dsr1.monitoring import deployment, signals

    c = _client(srv)
    for stream in (False, True):
        r = c.completions.create(model="demo", prompt="Hello there", max_tokens=8, stream=stream)
        if stream:
            list(r)

    d = deployment.fetch(srv.url, KEY)
    assert d.engine == engine
    exprs = signals.all_queries(d) + [r.expr for r in signals.recordings(d)]
    text = httpx.get(f"{srv.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    exported = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    names = {n for e in exprs for n in re.findall(r"\b(?:dsr1_|vllm:|llamacpp:)[a-zA-Z0-9_:]+", e)}
    assert any(n.startswith(f"{engine}:") for n in names)  # the engine's own names are on the dashboard
    return sorted(n for n in names if n not in exported)


def test_vllm_dashboard_queries_name_metrics_vllm_exports(vllm_demo):
    assert _names_missing_from_metrics(vllm_demo, "vllm") == []


def test_llamacpp_dashboard_queries_name_metrics_llama_server_exports(llama_demo):
    assert _names_missing_from_metrics(llama_demo, "llamacpp") == []


def test_bench_counts_prompts_with_the_real_vllms_tokenize(vllm_demo, tmp_path):
    """`dsr1 bench --url` at vLLM itself (the engine's own port, as a user who runs vLLM without dsr1
    would point it) from a machine with no tokenizer: prompts are sized through vLLM's /tokenize and
    chat template, and vLLM's own usage counts them exactly as long."""
    from tests.test_bench_tokenizer_sources import RUN, _bench, _check_exact_lengths

    url = _engine_url(vllm_demo, "vllm")
    out = _bench(tmp_path / "client-home", "--url", url, "--model", "demo", *RUN, "--out", tmp_path / "r",
                 HF_HOME=str(tmp_path / "hf"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"tokenizer: the server's /tokenize at {url}" in out.stderr
    doc = json.loads((tmp_path / "r" / "results.json").read_text())
    assert doc["tokenizer"]["source"] == "server"
    _check_exact_lengths(doc)


# --- drain tests: last in the module, each on its shared server (SIGTERM ends it) ------------------

def _drain(srv: ServerProc, engine: str, key: str | None, tokens: int) -> None:
    """SIGTERM while a request runs (the engine's own counter says so): it finishes, then dsr1 stops
    the engine and exits 0, and the engine's port is closed."""
    got: dict = {}

    def ask() -> None:
        r = _client(srv, key).completions.create(model="demo", prompt="Tell a story.", max_tokens=tokens,
                                                 temperature=0, extra_body={"ignore_eos": True})
        got["finish"], got["n"] = r.choices[0].finish_reason, r.usage.completion_tokens

    t = threading.Thread(target=ask)
    t.start()
    _wait_admitted(srv, engine, key)
    code = srv.stop(signal.SIGTERM, timeout=180)
    t.join(60)
    assert code == 0, "".join(srv.lines[-30:])
    assert got == {"finish": "length", "n": tokens}  # the running request finished before the engine stopped
    port = int(_engine_url(srv, engine).rsplit(":", 1)[1])
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_zz_llamacpp_sigterm_drains_and_stops_the_engine(llama_demo):
    _drain(llama_demo, "llamacpp", KEY, 48)


def test_zz_vllm_sigterm_drains_and_stops_the_engine(vllm_demo):
    _drain(vllm_demo, "vllm", KEY, 200)
