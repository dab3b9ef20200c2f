"""GGUFs served by a real llama-server (installed by `dsr1 engine install llamacpp`, as CI does):
the demo GGUF pulled and served by its store name, and a tiny DeepSeek-V3 model (MLA + MoE) written
by llama.cpp's own converter as 3 low-bit shards, pulled from its first shard and served with the
flag set dsr1's base-tier R1 plan generates: layer split over two GPUs, routed experts in RAM,
context, --fit off. This llama-server is a CPU build, so the GPU flags must parse and load (it says
they have no effect) and the expert override is real.

The two GPUs are a profile file's (dsr1 plans a profile's hardware when this machine lacks it), sized
so the tiny model's placement has the base tier's shape: both GPUs used, some layers' experts in RAM.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsr1 import gguf_files, gguf_place
from tests.test_serve_engines import _client, _engines_home, _need, _serve
from tests.tiny_v3 import build_hf, convert

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def llama_server():
    return _need("llamacpp")


@pytest.fixture(scope="module")
def tiny_v3(llama_server, demo_model_dir, tmp_path_factory) -> list[Path]:
    converter = _engines_home() / "engines" / "llamacpp" / "convert" / "convert_hf_to_gguf.py"
    assert converter.is_file(), "dsr1 engine install llamacpp keeps llama.cpp's converter there"
    d = tmp_path_factory.mktemp("tiny-v3")
    return convert(build_hf(d / "hf", demo_model_dir), converter, d / "gguf")


def _dsr1(home: Path, *args: str, engine: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "DSR1_HOME": str(home)}
    if engine and engine.get("binary"):
        env["PATH"] = str(Path(engine["binary"]).parent) + os.pathsep + env.get("PATH", "")
    return subprocess.run([sys.executable, "-m", "dsr1", *args], env=env, capture_output=True, text=True, timeout=600)


def _two_gpu_profile(first: Path, path: Path, context: int) -> Path:
    """A profile of two GPUs whose memory makes the tiny model's placement the base tier's: every layer
    offloaded, split over both GPUs, the first layers' routed experts in RAM. Found with dsr1's own
    placement (the plan recomputes it from the profile), from the middle of the memory sizes that give it."""
    lay = gguf_place.layout_of(gguf_files.read_set(first))
    good, mem = [], 2 * 2**30
    while mem < 4 * 2**30 and not (good and good[-1] < mem - (1 << 16)):
        p = gguf_place.place(lay, [mem, mem], 64 * 10**9, context)
        if p.fits and p.where == "experts_in_ram" and all(p.tensor_split) and p.n_cpu_moe >= 2:
            good.append(mem)
        mem += 1 << 16
    assert good, "no two-GPU size gives the base tier's placement"
    mem = good[len(good) // 2]
    path.write_text(f"""name = "tiny-base"
rank = 1
description = "two GPUs sized for the tiny DeepSeek-V3 model as base's are for R1"
[requires]
gpus = 2
gpu_memory_gb = {mem / 1.07e9:.9f}
compute_capability = 8.0
ram_gb = 64
[settings]
default_model = "r1"
precision = "bf16"
engine = "vllm"
tensor_parallel = 2
pipeline_parallel = 1
max_concurrent = 32
context_length = {context // 32}
offload = "none"
memory_utilization = 0.9
notes = []
""")
    return path


def _options(argv: list[str]) -> set[str]:
    return {a for a in argv if a.startswith("-") and not a.lstrip("-").replace(".", "").isdigit()}


def test_pulled_gguf_is_served_by_llama_server_by_its_name(llama_server, demo_gguf, tmp_path):
    """The README's pull, then `dsr1 serve NAME --engine llamacpp`: the store's copy of the file."""
    home = tmp_path / "home"
    r = _dsr1(home, "pull", str(demo_gguf), "--name", "smollm2-135m", engine=llama_server)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (home / "models" / "smollm2-135m" / "model").exists()  # llama-server is here: no bf16 copy
    srv = _serve(["smollm2-135m", "--engine", "llamacpp", "--max-model-len", "1024", "--max-concurrent", "2"], home,
                 llama_server)
    try:
        c = _client(srv)
        r = c.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "What is the capital of France?"}],
                                      max_tokens=16, temperature=0)
        # the Q4_1 file's greedy answer under llama.cpp is not the bf16 model's: that it answers in words
        assert len(r.choices[0].message.content.split()) >= 3 and r.usage.completion_tokens >= 3
        assert any(str(home / "models" / "smollm2-135m" / "gguf") in line for line in srv.lines)
    finally:
        assert srv.stop() == 0, "".join(srv.lines[-30:])
    # The embedded engine asked for: its bf16 copy is made then (the plan says how big), once.
    r = _dsr1(home, "serve", "smollm2-135m", "--engine", "embedded", "--dry-run", engine=llama_server)
    assert r.returncode == 0 and "bf16 copy of it, about 0.27 GB" in " ".join(r.stdout.split()), r.stdout[-2000:]
    srv = _serve(["smollm2-135m", "--engine", "embedded", "--max-model-len", "512", "--dtype", "bf16"], home,
                 llama_server, key=None)
    try:
        assert any("making the embedded engine's bf16 copy" in line for line in srv.lines)
        r = _client(srv).chat.completions.create(model="smollm2-135m", max_tokens=12, temperature=0,
                                                 messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in r.choices[0].message.content
    finally:
        assert srv.stop() == 0, "".join(srv.lines[-30:])
    listed = json.loads(_dsr1(home, "list", "--json").stdout)["models"][0]
    assert listed["format"] == "gguf" and listed["gguf_quant"] == "Q4_1" and listed["embedded_copy_bytes"] > 2e8
    assert _dsr1(home, "verify", "smollm2-135m").returncode == 0  # the copy's files are in the manifest too


def test_tiny_deepseek_v3_split_gguf_runs_with_the_base_tier_flag_set(llama_server, tiny_v3, tmp_path):
    home = tmp_path / "home"
    r = _dsr1(home, "pull", str(tiny_v3[0]), "--name", "tiny-v3", "--json", engine=llama_server)
    assert r.returncode == 0, r.stderr[-2000:]
    pulled = json.loads(r.stdout)
    assert pulled["format"] == "gguf" and pulled["gguf_quant"] == "TQ1_0" and pulled["checks"]["shards"] == 3
    assert pulled["checks"]["architecture"] == "deepseek2"

    # 32 slots of the model's 4,096 tokens: a KV cache big enough, next to the tiny weights, for the
    # GPU sizes to decide where layers and experts go as R1's do on base
    profile = _two_gpu_profile(tiny_v3[0], tmp_path / "tiny-base.toml", 4096 * 32)
    r = _dsr1(home, "serve", "tiny-v3", "--profile", str(profile), "--dry-run", "--json", engine=llama_server)
    assert r.returncode == 0, r.stderr[-2000:]
    plan = json.loads(r.stdout)
    argv = plan["nodes"][0]["argv"]
    pl = plan["placement"]
    assert plan["engine"] == "llamacpp" and plan["checked_against"].startswith("llamacpp ")  # its own --help
    assert pl["where"] == "experts_in_ram" and pl["kv_type"] == "f16" and pl["n_layer"] == 4
    # llama.cpp's MLA format (attn_k_b): a K-only latent cache, kv_lora_rank + rope dims per layer, f16
    assert plan["kv_bytes_per_token"] == 4 * (256 + 64) * 2
    assert argv[argv.index("--tensor-split") + 1] == ",".join(map(str, pl["tensor_split"]))
    assert argv[argv.index("--n-cpu-moe") + 1] == str(pl["n_cpu_moe"])
    # the flag set the base tier's R1 plan generates (values differ: another model, other GPUs)
    base = json.loads(_dsr1(home, "serve", "r1", "--profile", "base", "--dry-run", "--json").stdout)
    assert base["gguf_quant"] == "UD-Q2_K_XL" and base["placement"]["where"] == "experts_in_ram"
    skip = {"-m", "-a", "--host", "--port", "--reasoning-format", "--cache-type-k"}  # the model's own, or R1's
    assert _options(argv) - skip == _options(base["nodes"][0]["argv"]) - skip

    srv = _serve(["tiny-v3", "--profile", str(profile), "--served-model-name", "tiny"], home, llama_server)
    try:
        log = "".join(srv.lines)
        assert "--n-cpu-moe" in log and "--tensor-split" in log
        c = _client(srv)
        r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=12,
                                      temperature=0, extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"
        chunks = [ch for ch in c.chat.completions.create(model="tiny", stream=True, max_tokens=8, temperature=0,
                                                          messages=[{"role": "user", "content": "Hi"}],
                                                          extra_body={"ignore_eos": True})]
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert len(chunks) >= 8 and text
    finally:
        assert srv.stop() == 0, "".join(srv.lines[-30:])


def test_a_gguf_the_embedded_engine_cannot_load_is_stored_for_llama_server(tiny_v3, tmp_path, monkeypatch):
    """No llama-server here and a deepseek2 GGUF transformers cannot import: stored as it is, and the
    pull says what serves it (no half-made embedded copy)."""
    home = tmp_path / "home"
    r = _dsr1(home, "pull", str(tiny_v3[0]), "--name", "tiny-v3")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "embedded engine cannot load deepseek2" in r.stdout + r.stderr
    assert not (home / "models" / "tiny-v3" / "model").exists()
    # ... and its plan is llama-server's (to install), not an embedded copy that cannot be made
    r = _dsr1(home, "serve", "tiny-v3", "--dry-run", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    plan = json.loads(r.stdout)
    assert plan["engine"] == "llamacpp" and "cannot load deepseek2" in plan["engine_reason"]
    assert any("dsr1 engine install llamacpp" in w for w in plan["warnings"])
