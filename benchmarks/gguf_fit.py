"""dsr1's GGUF placement against llama-server's own `--fit`, side by side in one run.

The tiny DeepSeek-V3 model of the tests (tests/tiny_v3.py: MLA + MoE, 3 TQ1_0 shards from llama.cpp's
own converter) is started by the installed llama-server twice per round, alternating:
  dsr1   the flags dsr1's plan generates for it on this machine (`dsr1 serve --dry-run`'s argv:
         its placement, `--fit off`)
  fit    only the model, context and slots, with `--fit on` (b11434's default: llama-server sizes
         what was left unset to the device memory itself)
For each: seconds from exec to /health answering 200 (start-up, where --fit does its extra pass) and
output tokens/s of one stream (128 tokens, EOS ignored), medians of --rounds rounds. Ratios are dsr1/fit.

    python benchmarks/gguf_fit.py --engines-home .cache/engines-home
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_once(argv: list[str]) -> tuple[float, float]:
    port = free_port()
    argv = [*argv, "--host", "127.0.0.1", "--port", str(port)]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server exited {proc.returncode}: {' '.join(argv)}")
            time.sleep(0.01)
        ready = time.monotonic() - t0
        body = {"prompt": "Hello", "n_predict": 128, "ignore_eos": True, "temperature": 0}
        t1 = time.monotonic()
        r = httpx.post(f"http://127.0.0.1:{port}/completion", json=body, timeout=300).json()
        tok_s = r["timings"]["predicted_per_second"] if "timings" in r else 128 / (time.monotonic() - t1)
        return ready, tok_s
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engines-home", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    from tests.tiny_v3 import build_hf, convert

    engine_dir = a.engines_home / "engines" / "llamacpp"
    binary = engine_dir / "bin" / "llama-server"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = REPO / ".cache" / "test-models" / "smollm2-135m-bf16"
        shards = convert(build_hf(tmp / "hf", tok), engine_dir / "convert" / "convert_hf_to_gguf.py", tmp / "gguf")
        env = {**os.environ, "PYTHONPATH": str(REPO), "DSR1_HOME": str(tmp / "home"),
               "PATH": f"{binary.parent}{os.pathsep}{os.environ['PATH']}"}
        subprocess.run([sys.executable, "-m", "dsr1", "pull", str(shards[0]), "--name", "tiny-v3", "--quiet"], env=env,
                       check=True)
        out = subprocess.run([sys.executable, "-m", "dsr1", "serve", "tiny-v3", "--max-model-len", "2048",
                              "--max-concurrent", "1", "--dry-run", "--json"], env=env, check=True,
                             capture_output=True, text=True).stdout
        argv = json.loads(out)["nodes"][0]["argv"]
        cut = argv.index("--host")
        dsr1_argv = argv[:cut] + [a for a in argv[cut + 4:] if a != "--metrics"]
        fit_argv = [str(binary), "-m", argv[argv.index("-m") + 1], "-np", "1", "-c", "2048", "--jinja", "--fit", "on"]
        results: dict[str, list[tuple[float, float]]] = {"dsr1": [], "fit": []}
        for _ in range(a.rounds):
            results["dsr1"].append(run_once(dsr1_argv))
            results["fit"].append(run_once(fit_argv))
    med = {k: (statistics.median(r for r, _ in v), statistics.median(t for _, t in v)) for k, v in results.items()}
    print(f"CPU: {cpu_name()} ({os.cpu_count()} threads); llama-server {binary}")
    print(f"dsr1 flags: {' '.join(dsr1_argv[1:])}")
    print(f"fit flags:  {' '.join(fit_argv[1:])}")
    print(f"{'variant':8} {'ready s':>9} {'tok/s':>9}")
    for k, (ready, tok) in med.items():
        print(f"{k:8} {ready:9.3f} {tok:9.1f}")
    print(f"ratio dsr1/fit: start-up {med['dsr1'][0] / med['fit'][0]:.2f}, decode {med['dsr1'][1] / med['fit'][1]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
