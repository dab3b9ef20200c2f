"""The engines side by side, in one run: the same `dsr1 bench` sweep against each, ratios printed.

For the same model and dtype, `dsr1 bench MODEL --serve-arg ...` starts `dsr1 serve` once per
engine and sweeps concurrency 1, 4 and 16 (random prompts of --input-len tokens, --output-len
tokens out, EOS ignored):
  embedded  dsr1's own engine (`--engine embedded`)
  vllm      vLLM's CPU build behind dsr1's front (`--engine vllm`), from `dsr1 engine install vllm`
  llamacpp  llama.cpp's llama-server behind dsr1's front (`--engine llamacpp`) on a GGUF of the
            same weights (`--gguf`; a BF16 one for the same dtype, made with llama.cpp's
            convert_hf_to_gguf.py --outtype bf16)
Every engine runs behind the same front, so the comparison includes the same serving path a
user gets. The embedded engine also runs in the variants --embedded-variants names (default:
`eager`, its transformers forward with every issue-10 option off: the floor the fast path is
measured against; `fast`, the lean forward without torch.compile), so the gain of each step shows. This is the comparison users make before choosing an engine, and the target for
the embedded engine.

    python benchmarks/engines.py --model .cache/test-models/smollm2-135m-bf16 \\
        --gguf /path/smollm2-135m-bf16.gguf --engines-home .cache/engines-home
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, demo_model  # noqa: E402


def installed(engines_home: Path, name: str) -> dict | None:
    env = {**os.environ, "DSR1_HOME": str(engines_home), "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "dsr1", "engine", "list", "--json"], capture_output=True, text=True,
                       env=env)
    if r.returncode != 0:
        return None
    return next((e for e in json.loads(r.stdout)["engines"] if e["name"] == name), None)


def sweep(label: str, model: str, serve_args: list[str], args, env: dict) -> dict[int, dict]:
    out = Path(tempfile.mkdtemp(prefix=f"bench-{label.replace(' #', '-')}-"))
    cmd = [sys.executable, "-m", "dsr1", "bench", model, "--concurrency", args.concurrency,
           "--requests", str(args.requests), "--input-len", str(args.input_len), "--output-len",
           str(args.output_len), "--out", str(out), "--no-plots", "--json", "--server-timeout", "900"]
    for a in serve_args:
        cmd += ["--serve-arg", a]
    print(f"# {label}: {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        print(f"# {label} failed (exit {r.returncode}):\n{r.stderr[-3000:]}", file=sys.stderr)
        return {}
    doc = json.loads((out / "results.json").read_text())
    points = {}
    for p in doc["points"]:
        points[int(p["concurrency"])] = p
    return points


def tput(point: dict) -> float:
    return point["summary"]["output_throughput"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(Path(os.environ.get("DSR1_TEST_CACHE", REPO / ".cache/test-models"))
                                           / "smollm2-135m-bf16"), help="safetensors model directory")
    ap.add_argument("--gguf", help="GGUF of the same weights for llama-server (BF16 for the same dtype)")
    ap.add_argument("--engines-home", default=str(REPO / ".cache" / "engines-home"),
                    help="DSR1_HOME where `dsr1 engine install` put vllm and llamacpp")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--only", default="embedded,vllm,llamacpp")
    ap.add_argument("--embedded-variants", default="eager,fast",
                    help="extra embedded rows: eager (--no-fast-path), fast (--compile off); '' for none")
    ap.add_argument("--repeat", type=int, default=1,
                    help="sweeps per engine, taken in turns (engine A, B, C, A, B, C, ...); each point reports "
                         "the median run, so a noisy neighbour on a shared VM hits every engine alike")
    args = ap.parse_args()

    home = Path(tempfile.mkdtemp(prefix="bench-home-"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "DSR1_HOME": str(home)}
    env.pop("DSR1_API_KEY", None)
    wanted = args.only.split(",")
    variants = {"eager": ["--no-fast-path", "--compile", "off"], "fast": ["--compile", "off"]}
    plan: list[tuple[str, str, list[str], dict]] = []  # (label, model, serve args, env)
    if "embedded" in wanted:
        for v in [x for x in args.embedded_variants.split(",") if x]:
            plan.append((f"emb-{v}", args.model, ["--engine", "embedded", "--dtype", args.dtype, *variants[v]], env))
        plan.append(("embedded", args.model, ["--engine", "embedded", "--dtype", args.dtype], env))
    vllm = installed(Path(args.engines_home), "vllm")
    if "vllm" in wanted and vllm:
        plan.append(("vllm", args.model, ["--engine", "vllm", "--engine-python", vllm["python"], "--dtype", args.dtype],
                     env))
    llama = installed(Path(args.engines_home), "llamacpp")
    if "llamacpp" in wanted and llama and args.gguf:
        lenv = {**env, "PATH": str(Path(llama["binary"]).parent) + os.pathsep + env.get("PATH", "")}
        plan.append(("llamacpp", args.gguf, ["--engine", "llamacpp"], lenv))
    tries: dict[str, list[dict[int, dict]]] = {label: [] for label, *_ in plan}
    for rep in range(max(1, args.repeat)):
        for label, model, serve_args, e in plan:
            tries[label].append(sweep(label if args.repeat == 1 else f"{label} #{rep + 1}", model, serve_args, args, e))
    runs: dict[str, dict[int, dict]] = {}
    for label, sweeps in tries.items():
        runs[label] = {}
        for c in {c for s in sweeps for c in s}:
            pts = sorted((s[c] for s in sweeps if c in s), key=tput)
            runs[label][c] = pts[len(pts) // 2]  # the median run (upper median for an even count)
        if args.repeat > 1:
            spread = {c: [round(tput(s[c]), 1) for s in sweeps if c in s] for c in sorted(runs[label])}
            print(f"# {label}: output tok/s of each run: {spread}", file=sys.stderr)

    levels = [int(c) for c in args.concurrency.split(",")]
    print(f"\noutput tokens/s (mean TPOT ms), {args.input_len} in / {args.output_len} out, EOS ignored, "
          f"{args.requests} requests per point, dtype {args.dtype}"
          + (f", median of {args.repeat} runs taken in turns" if args.repeat > 1 else ""))
    print(f"{'engine':<10}" + "".join(f"{'c=' + str(c):>20}" for c in levels))
    print("(embedded: dsr1's defaults; emb-eager: the transformers forward; emb-fast: lean forward, not compiled)")
    for name, pts in runs.items():
        cells = []
        for c in levels:
            p = pts.get(c)
            cells.append(f"{tput(p):>9.1f} ({p['summary']['tpot_ms']['mean']:>6.1f})" if p else "-")
        print(f"{name:<10}" + "".join(f"{x:>20}" for x in cells))
    base = runs.get("embedded", {})
    for other in ("emb-eager", "emb-fast", "vllm", "llamacpp"):
        if other in runs and base:
            ratios = []
            for c in levels:
                a, b = base.get(c), runs[other].get(c)
                ratios.append(f"{tput(a) / tput(b):.2f}" if a and b else "-")
            print(f"embedded / {other}: " + ", ".join(f"c={c}: {r}" for c, r in zip(levels, ratios)))
    return 0 if runs and all(runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
