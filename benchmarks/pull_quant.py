"""Quantization of the real demo model: memory and quality of bf16, int8 and nf4, side by side.

Run: DSR1_TEST_CACHE=/work/test-cache python benchmarks/pull_quant.py

For each method, in its own process (so peak RSS is that method's alone):
  memory   model.get_memory_footprint() of the loaded model
  NLL      mean negative log-likelihood per token of dsr1.quantize.NLL_TEXT (a fixed
           English paragraph), in memory before save and after save + reload
  peak     peak RSS of the quantizing process, and that minus the RSS after imports
Targets after reload: int8 within 1% of bf16 NLL, nf4 within 7%.
The bf16 model directory is the demo fixture (tests/conftest.py: demo_model_dir).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHILD = r"""
import json, resource, sys, warnings, logging
warnings.filterwarnings("ignore"); logging.disable(logging.WARNING)
import torch, transformers
from transformers.utils import logging as tl
tl.disable_progress_bar()
from pathlib import Path
from dsr1 import quantize as q
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
src, out, method = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
from transformers import AutoTokenizer
import time
t0 = time.perf_counter()
if method == "bf16":
    m = q.load(src)
    tok = AutoTokenizer.from_pretrained(src)
    nll = q.mean_nll(m, tok)
    r = {"memory_bytes": int(m.get_memory_footprint()), "nll_before_save": nll, "nll_after_reload": nll,
         "max_logit_diff": 0.0}
else:
    res = q.quantize(src, out, method)
    r = {"memory_bytes": res.memory_bytes, "nll_before_save": res.nll_before_save,
         "nll_after_reload": res.nll_after_reload, "max_logit_diff": res.max_logit_diff, "size_bytes": res.size_bytes}
r["seconds"] = time.perf_counter() - t0
r["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
r["import_rss"] = base
print("RESULT", json.dumps(r))
"""


def main() -> None:
    cache = Path(os.environ.get("DSR1_TEST_CACHE", REPO / ".cache" / "test-models"))
    src = cache / "smollm2-135m-bf16"
    if not (src / "model.safetensors").is_file():
        sys.exit(f"{src} missing: run the test suite once (demo_model_dir fixture) or set DSR1_TEST_CACHE")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("bf16", "int8", "nf4"):
            out = subprocess.run([sys.executable, "-c", CHILD, str(src), str(Path(tmp) / method), method],
                                 env=env, capture_output=True, text=True)
            line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{method} failed:\n{out.stderr[-3000:]}")
            rows[method] = json.loads(line[7:])
    ref = rows["bf16"]["nll_after_reload"]
    weights = (src / "model.safetensors").stat().st_size
    print(f"demo model SmolLM2-135M-Instruct, bf16 weights {weights / 1e6:.0f} MB; CPU; "
          f"torch {__import__('importlib.metadata').metadata.version('torch')}, "
          f"bitsandbytes {__import__('importlib.metadata').metadata.version('bitsandbytes')}")
    print(f"{'method':<7}{'memory MB':>10}{'x bf16':>8}{'NLL mem':>9}{'NLL reload':>11}{'vs bf16':>9}"
          f"{'logit diff':>11}{'peak RSS MB':>12}{'above imports':>14}{'s':>6}")
    for m, r in rows.items():
        print(f"{m:<7}{r['memory_bytes'] / 1e6:>10.0f}{r['memory_bytes'] / rows['bf16']['memory_bytes']:>8.2f}"
              f"{r['nll_before_save']:>9.3f}{r['nll_after_reload']:>11.3f}"
              f"{(r['nll_after_reload'] - ref) / ref * 100:>+8.2f}%{r['max_logit_diff']:>11.2g}"
              f"{r['peak_rss'] / 1e6:>12.0f}{(r['peak_rss'] - r['import_rss']) / 1e6:>14.0f}{r['seconds']:>6.0f}")
    print("targets after reload: int8 within 1% of bf16, nf4 within 7%")


if __name__ == "__main__":
    main()
