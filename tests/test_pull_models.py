"""GGUF import and bitsandbytes quantization on the real demo model (SmolLM2-135M-Instruct)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dsr1 import store
from dsr1.errors import IntegrityError, UsageError

pytestmark = pytest.mark.slow


def cli(*args: str):
    from dsr1.cli import build_app

    return CliRunner().invoke(build_app(), list(args))


def _greedy(model, tok, n: int = 24) -> list[int]:
    import torch

    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def test_gguf_import_generates_like_the_gguf(demo_gguf):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    r = cli("pull", str(demo_gguf), "--name", "demo", "--quant", "none", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    model_dir = store.resolve_model_dir("demo")
    assert model_dir == store.store_root() / "demo" / "model" and out["source_kind"] == "gguf"
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "tokenizer.json").is_file()
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    imported = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    direct = AutoModelForCausalLM.from_pretrained(demo_gguf.parent, gguf_file=demo_gguf.name, dtype=torch.bfloat16)
    direct_tok = AutoTokenizer.from_pretrained(demo_gguf.parent, gguf_file=demo_gguf.name)
    got, want = _greedy(imported, tok), _greedy(direct, direct_tok)
    assert got == want and len(got) > 5
    assert "Paris" in tok.decode(got)
    assert cli("verify", "demo").exit_code == 0
    assert not list((store.store_root() / "demo").glob(".tmp-*"))


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_text("this is not a model")
    r = cli("pull", str(bad), "--quant", "none")
    assert r.exit_code == UsageError.exit_code and "not a GGUF file" in r.stderr


def test_damaged_gguf(tmp_path, demo_gguf):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(demo_gguf.read_bytes()[:200])
    r = cli("pull", str(bad), "--quant", "none")
    assert r.exit_code == IntegrityError.exit_code and "damaged" in r.stderr


def test_gguf_with_unsupported_architecture(tmp_path):
    import numpy as np
    from gguf import GGUFWriter

    path = tmp_path / "odd.gguf"
    w = GGUFWriter(str(path), "wavenet-9000")
    w.add_tensor("tok_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r = cli("pull", str(path), "--quant", "none")
    assert r.exit_code == UsageError.exit_code
    assert "wavenet-9000" in r.stderr and "llama" in r.stderr  # names what would work


def test_missing_local_path():
    r = cli("pull", "./nowhere/model.gguf", "--quant", "none")
    assert r.exit_code == 4 and "no such file" in r.stderr


@pytest.mark.parametrize("method,max_rel", [("int8", 0.01), ("nf4", 0.07)])
def test_quantized_model_reloads_from_store_with_bounded_nll(demo_model_dir, method, max_rel):
    from transformers import AutoTokenizer

    from dsr1 import quantize

    r = cli("pull", str(demo_model_dir), "--quant", method, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["name"] == f"smollm2-135m-bf16-{method}" and out["quantization"] == method
    assert out["checks"]["reload_max_logit_diff"] <= quantize.LOGIT_ATOL
    model_dir = store.resolve_model_dir(out["name"])
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "bitsandbytes"
    tok = AutoTokenizer.from_pretrained(model_dir)
    nll = quantize.mean_nll(quantize.load_quantized(model_dir), tok)
    ref = quantize.mean_nll(quantize.load(demo_model_dir), tok)
    assert abs(nll - ref) / ref <= max_rel, (method, nll, ref)
    assert store.verify(out["name"]).ok


def _has_avx512_bf16() -> bool:
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not _has_avx512_bf16(), reason="the nf4 save bug needs a CPU with AVX512-BF16")
def test_reload_guard_catches_the_real_nf4_save_bug(demo_model_dir, tmp_path):
    """nf4 without double quantization, run once before saving, saves broken scales on this
    CPU (bitsandbytes 0.50.2). The guard must refuse to store it."""
    from dsr1 import quantize

    with pytest.raises(IntegrityError, match="does not reproduce"):
        quantize.quantize(demo_model_dir, tmp_path / "q", "nf4", double_quant=False)
    assert not (tmp_path / "q").exists()


@pytest.mark.slow
def test_serve_quantizes_a_local_model_while_loading(demo_model_dir, tmp_path):
    """`dsr1 serve DIR --precision nf4` (a `dsr1 bench tune` candidate on a GPU): bitsandbytes while
    loading, no stored copy; the real server answers through the official client. (On a CPU
    `--precision int8|int4` packs for the fast path instead: tests/test_wquant.py.)"""
    import openai

    from tests.serve_util import ServerProc

    srv = ServerProc([str(demo_model_dir), "--engine", "embedded", "--precision", "nf4", "--max-concurrent", "2",
                      "--max-model-len", "256"], home=tmp_path / "home", timeout=300)
    try:
        log = "".join(srv.lines)
        assert "nf4 (bitsandbytes) while loading" in log and "bitsandbytes-quantized weights" in log, log[-2000:]
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none")
        r = client.completions.create(model="smollm2-135m-bf16", prompt="The capital of France is", max_tokens=4,
                                      temperature=0)
        assert r.usage.completion_tokens >= 1 and r.choices[0].text
        assert not (tmp_path / "home" / "models").exists()  # nothing was stored
    finally:
        srv.stop()
