"""What dsr1's front costs over the engine behind it, measured side by side in one run.

For each engine (vLLM's CPU build, llama-server) one `dsr1 serve --engine E` runs; the same
`dsr1 bench --url` sweep goes to the engine's own port (raw: what a user running the engine
without dsr1 gets) and to dsr1's front on top of that same engine process, in turns (raw,
front, raw, front, ...), so both see the same warm engine and the same neighbours. Each point
reports the median of --repeat runs; the ratio front / raw of output tokens/s is the front's
overhead (1.00: none). The target ([13/14]): within 3% at concurrency 1 and 16.

The embedded engine has no raw port: `--embedded-baseline COMMIT` measures it against dsr1 as it
was at COMMIT (a git worktree; before the one front, its own HTTP layer), both `dsr1 serve` on
the same model, in turns.

    python benchmarks/front_overhead.py --engines-home .cache/engines-home
    python benchmarks/front_overhead.py --only embedded --embedded-baseline 9aa6e5b
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, demo_model  # noqa: E402
from engines import installed  # noqa: E402


def start(args_: list[str], env: dict) -> tuple[subprocess.Popen, str, str, list[str]]:
    """`dsr1 serve ARGS --port 0`: (process, front URL, engine URL or "", its log lines)."""
    # from the code's own root: `python -m` puts the working directory first on sys.path, ahead of PYTHONPATH
    proc = subprocess.Popen([sys.executable, "-m", "dsr1", "serve", *args_, "--port", "0"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=env.get("PYTHONPATH", str(REPO)))
    lines: list[str] = []
    deadline = time.monotonic() + 900
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("dsr1 serve: ready on "):
            break
        if time.monotonic() > deadline:
            break
    else:
        raise SystemExit("dsr1 serve exited:\n" + "".join(lines[-30:]))
    import threading

    threading.Thread(target=lambda: [lines.append(x) for x in proc.stderr], daemon=True).start()
    front = lines[-1].split("ready on ", 1)[1].strip()
    flat = "".join("".join(lines).split())  # the long "starting ENGINE: ..." line may be wrapped
    port = re.search(r"starting\w+:.*?--port(\d+)", flat)  # none for the embedded engine (in-process)
    return proc, front, f"http://127.0.0.1:{port.group(1)}" if port else "", lines


def sweep(url: str, args, env: dict) -> dict[int, dict]:
    out = Path(tempfile.mkdtemp(prefix="front-overhead-"))
    cmd = [sys.executable, "-m", "dsr1", "bench", "--url", url, "--model", "demo", "--tokenizer", args.model,
           "--concurrency", args.concurrency, "--requests", str(args.requests), "--input-len", str(args.input_len),
           "--output-len", str(args.output_len), "--warmup", "2", "--out", str(out), "--no-plots"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"bench against {url} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    doc = json.loads((out / "results.json").read_text())
    return {int(p["concurrency"]): p["summary"] for p in doc["points"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=demo_model(), help="safetensors model directory (vLLM; the tokenizer)")
    ap.add_argument("--gguf", default=str(Path(demo_model()).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"),
                    help="GGUF for llama-server")
    ap.add_argument("--engines-home", default=str(REPO / ".cache" / "engines-home"))
    ap.add_argument("--only", default="vllm,llamacpp")
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--embedded-baseline", help="with --only embedded: the commit to compare dsr1's embedded "
                                                "engine with (a git worktree of it)")
    args = ap.parse_args()
    if Path(args.model).exists():  # each server runs from its own tree's root (start): keep the path valid there
        args.model = str(Path(args.model).resolve())

    home = Path(tempfile.mkdtemp(prefix="front-overhead-home-"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "DSR1_HOME": str(home)}
    env.pop("DSR1_API_KEY", None)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    levels = [int(c) for c in args.concurrency.split(",")]
    print(f"front overhead: output tokens/s through dsr1's front / straight to the engine, same engine process; "
          f"{args.input_len} in / {args.output_len} out, EOS ignored, {args.requests} requests per point, median of "
          f"{args.repeat} runs in turns; {cpu}, {os.cpu_count()} CPUs")
    ok = True
    if args.only == "embedded":
        return embedded_against(args, env, levels)
    for engine in args.only.split(","):
        found = installed(Path(args.engines_home), engine)
        if found is None:
            print(f"{engine}: not installed in {args.engines_home}; skipped")
            ok = False
            continue
        e = dict(env)
        if engine == "vllm":
            serve = [args.model, "--engine", "vllm", "--engine-python", found["python"], "--dtype", "bf16"]
        else:
            serve = [args.gguf, "--engine", "llamacpp"]
            e["PATH"] = str(Path(found["binary"]).parent) + os.pathsep + e.get("PATH", "")
        proc, front, raw, _ = start([*serve, "--served-model-name", "demo", "--max-model-len", "1024",
                                     "--max-concurrent", "16"], e)
        try:
            runs: dict[str, list[dict[int, dict]]] = {"raw": [], "front": []}
            for _ in range(args.repeat):
                runs["raw"].append(sweep(raw, args, env))
                runs["front"].append(sweep(front, args, env))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(180)
        med = {k: {c: sorted((r[c] for r in v), key=lambda s: s["output_throughput"])[len(v) // 2] for c in levels}
               for k, v in runs.items()}
        for c in levels:
            a, b = med["front"][c], med["raw"][c]
            ratio = a["output_throughput"] / b["output_throughput"]
            spread = {k: [round(r[c]["output_throughput"], 1) for r in v] for k, v in runs.items()}
            print(f"{engine:<9} c={c:<3} raw {b['output_throughput']:7.1f} tok/s (TPOT {b['tpot_ms']['mean']:.1f} ms)  "
                  f"front {a['output_throughput']:7.1f} tok/s (TPOT {a['tpot_ms']['mean']:.1f} ms)  "
                  f"front/raw {ratio:.3f}  runs {spread}")
    return 0 if ok else 1


def embedded_against(args, env: dict, levels: list[int]) -> int:
    """dsr1's embedded engine now against dsr1 at --embedded-baseline, each its own `dsr1 serve`."""
    if not args.embedded_baseline:
        raise SystemExit("--only embedded needs --embedded-baseline COMMIT")
    tree = Path(tempfile.mkdtemp(prefix="front-baseline-")) / "tree"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), args.embedded_baseline],
                   check=True, capture_output=True)
    try:
        servers = {}
        for label, root in (("before", tree), ("now", REPO)):
            servers[label] = start([args.model, "--engine", "embedded", "--dtype", "bf16", "--served-model-name",
                                    "demo", "--max-model-len", "1024", "--max-concurrent", "16"],
                                   {**env, "PYTHONPATH": str(root)})
        runs: dict[str, list[dict[int, dict]]] = {"before": [], "now": []}
        for _ in range(args.repeat):
            for label, (_, url, _, _) in servers.items():
                runs[label].append(sweep(url, args, env))
        for proc, *_ in servers.values():
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], capture_output=True)
    for c in levels:
        med = {k: sorted((r[c] for r in v), key=lambda s: s["output_throughput"])[len(v) // 2] for k, v in runs.items()}
        spread = {k: [round(r[c]["output_throughput"], 1) for r in v] for k, v in runs.items()}
        a, b = med["now"], med["before"]
        print(f"embedded  c={c:<3} at {args.embedded_baseline} {b['output_throughput']:7.1f} tok/s "
              f"(TPOT {b['tpot_ms']['mean']:.1f} ms)  now {a['output_throughput']:7.1f} tok/s (TPOT "
              f"{a['tpot_ms']['mean']:.1f} ms)  now/before {a['output_throughput'] / b['output_throughput']:.3f}  "
              f"runs {spread}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
