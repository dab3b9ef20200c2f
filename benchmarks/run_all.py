"""Run every benchmark in benchmarks/ and write what each printed into docs/performance.md.

docs/performance.md keeps its prose (what a figure means, what was tried and did not pay); the
figures themselves live between markers, one block per benchmark:

    <!-- run_all: startup -->
    ...replaced on every run: the command, the machine, the date, what the benchmark printed...
    <!-- /run_all: startup -->

A block whose benchmark failed keeps its earlier contents and gets a line saying it failed and
why; a marker missing from the document is appended in a "Generated" section at the end, so a
new benchmark shows up without editing the prose first. The machine line (CPU model, cores,
GPU) is written into every block, because a ratio is only comparable within one machine.

    python benchmarks/run_all.py                   # all, a few hours on the 2-core CPU VM
    python benchmarks/run_all.py --only startup,fit_accuracy
    python benchmarks/run_all.py --list
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "performance.md"
CACHE = os.environ.get("DSR1_TEST_CACHE", str(REPO / ".cache" / "test-models"))
ENGINES_HOME = ".cache/engines-home"  # relative: commands run in the repository, and the docs show them
GGUF = os.environ.get("DSR1_BF16_GGUF", "")  # the demo model as a BF16 GGUF, for llama-server (see engines.py)

# name -> (arguments after `python`, what it measures). Commands are what the docs show.
BENCHMARKS: dict[str, tuple[list[str], str]] = {
    "startup": (["benchmarks/startup.py"], "start-up time of dsr1 --help and doctor"),
    "fit_accuracy": (["benchmarks/fit_accuracy.py"], "memory-fit estimate against measured peak"),
    "pull_download": (["benchmarks/pull_download.py"], "download, verify, resume"),
    "pull_quant": (["benchmarks/pull_quant.py"], "quantization quality and size"),
    "serve_throughput": (["benchmarks/serve_throughput.py", "--dtype", "bf16"], "serve efficiency against the floor"),
    "serve_prefill": (["benchmarks/serve_prefill.py"], "a long prompt does not stall streams"),
    "engines": (["benchmarks/engines.py", "--engines-home", ENGINES_HOME, "--repeat", "3"]
                + (["--gguf", GGUF] if GGUF else []), "the engines side by side"),
    "engines_1.5b": (["benchmarks/engines.py", "--engines-home", ENGINES_HOME, "--shape", "1.5b", "--duration", "60",
                      "--output-len", "64", "--input-len", "64", "--requests", "32", "--warmup", "1"],
                     "the engines at R1-Distill-Qwen-1.5B's shape, at matching precisions (bf16, int8, int4)"),
    "serve_fastpath": (["benchmarks/serve_fastpath.py"], "prefix caching and speculative decoding"),
    "client_ceiling": (["benchmarks/bench_client_ceiling.py"], "the bench client's own ceiling"),
    "tune_gain": (["benchmarks/tune_gain.py", "--engines-home", ENGINES_HOME], "tuning gain"),
    "lora_mixed": (["benchmarks/lora_mixed.py"], "16 requests over 3 LoRA adapters against 16 base-model requests"),
    "guard_overhead": (["benchmarks/guard_overhead.py"], "throughput with and without a 20-rule --guard policy"),
    "gguf_fit": (["benchmarks/gguf_fit.py", "--engines-home", ENGINES_HOME],
                 "dsr1's GGUF placement flags against llama-server's --fit"),
    "front_overhead": (["benchmarks/front_overhead.py", "--engines-home", ENGINES_HOME, "--requests", "16"],
                       "dsr1's front over vLLM and llama-server against the same engine asked directly"),
    "serve_restart": (["benchmarks/serve_restart.py", "--shape", "1.5b", "--starts", "3", "--compile", "auto", "--",
                       "--max-model-len", "2048", "--max-concurrent", "16", "--prefix-cache-mb", "0"],
                      "a compiled model's first start and restarts, peak RSS against weights + KV"),
    "package_constants": (["benchmarks/package_constants.py", "--shape", "1.5b"],
                          "decode with the compiled package's weights mapped from its file against anonymous copies"),
    "int4_gemm": (["benchmarks/int4_gemm.py"],
                  "weight-only int4 GEMMs: the eager CPU kernel against inductor's int4 template, per row count"),
}


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpus = ""
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=20)
        if r.returncode == 0 and r.stdout.strip():
            names = r.stdout.strip().splitlines()
            gpus = f", {len(names)} x {names[0]}"
    except (OSError, subprocess.TimeoutExpired):
        pass
    return f"{cpu}, {os.cpu_count()} cores{gpus or ', no GPU'}"


def block(name: str, body: str) -> str:
    return f"<!-- run_all: {name} -->\n{body.rstrip()}\n<!-- /run_all: {name} -->"


def replace_block(doc: str, name: str, body: str) -> str:
    pat = re.compile(rf"<!-- run_all: {re.escape(name)} -->.*?<!-- /run_all: {re.escape(name)} -->", re.S)
    if pat.search(doc):
        return pat.sub(lambda m: block(name, body), doc, count=1)
    if "## Generated by benchmarks/run_all.py" not in doc:
        doc = doc.rstrip() + "\n\n## Generated by benchmarks/run_all.py\n"
    return doc.rstrip() + f"\n\n### {name}\n\n{block(name, body)}\n"


def old_body(doc: str, name: str) -> str:
    m = re.search(rf"<!-- run_all: {re.escape(name)} -->\n(.*?)<!-- /run_all: {re.escape(name)} -->", doc, re.S)
    return m.group(1) if m else ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated benchmark names (default: all)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--doc", default=str(DOC))
    ap.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per benchmark")
    args = ap.parse_args()
    if args.list:
        for name, (argv, what) in BENCHMARKS.items():
            print(f"{name:<18}{what}: python {' '.join(argv)}")
        return 0
    names = args.only.split(",") if args.only else list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; --list shows them", file=sys.stderr)
        return 2
    doc_path = Path(args.doc)
    failed = 0
    where = machine()
    env = {**os.environ, "PYTHONPATH": str(REPO), "DSR1_TEST_CACHE": CACHE}
    for name in names:
        argv, what = BENCHMARKS[name]
        cmd = [sys.executable, *argv]
        shown = "python " + " ".join(argv)
        print(f"# {name}: {shown}", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=args.timeout)
            code, out, err = r.returncode, r.stdout, r.stderr
        except subprocess.TimeoutExpired as e:
            code, out, err = 124, (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), \
                f"timed out after {args.timeout:.0f} s"
        took = time.monotonic() - t0
        when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        doc = doc_path.read_text()
        if code == 0:
            body = (f"`{shown}` ({what}), {when}, {where}, {took:.0f} s:\n\n```\n{out.strip()}\n```\n")
        else:
            failed += 1
            tail = "\n".join(err.strip().splitlines()[-5:])
            body = (old_body(doc, name).rstrip() + "\n\n" if old_body(doc, name).strip() else "") + \
                f"_Last run_ {when} on {where} **failed** (exit {code}); figures above are from an earlier run:\n\n" \
                f"```\n{tail}\n```\n"
        tmp = doc_path.with_name(doc_path.name + ".tmp")  # never a half-written document
        tmp.write_text(replace_block(doc, name, body))
        os.replace(tmp, doc_path)
        print(f"# {name}: exit {code} in {took:.0f} s", file=sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
