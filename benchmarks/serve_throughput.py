"""Throughput of `dsr1 serve` against the floor this machine allows, side by side in one run.

Measures, for the same model and dtype:
  raw     the decode-step loop (batched prefill, then model(...) one token per step with a
          DynamicCache, argmax), at batch 1, 4 and 16: what the hardware gives with zero serving work;
  seq     sequential `model.generate` calls (one request at a time), tokens/s;
  server  `dsr1 serve` over HTTP with 1, 4 and 16 concurrent streaming clients (EOS ignored);
  hf      `transformers serve --continuous-batching` with 16 concurrent clients (if it starts).
and prints the ratios the issue sets targets for. Prompts are ~38 tokens, 128 new tokens each.

    DSR1_TEST_CACHE=/work/test-cache python benchmarks/serve_throughput.py --dtype bf16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dsr1.bench.metrics import percentile  # noqa: E402
from dsr1.bench.server import free_port, wait_healthy  # noqa: E402
from dsr1.errors import ServerError  # noqa: E402
from dsr1.serve.child import running, stop  # noqa: E402

PROMPT = ("Here is a long list of numbers written out in words, one after another, separated by commas, "
          "without stopping: one, two, three, four, five, six, seven,")


def default_model() -> Path:
    cache = Path(os.environ.get("DSR1_TEST_CACHE", REPO / ".cache" / "test-models"))
    return cache / "smollm2-135m-bf16"


# -- in-process floors ---------------------------------------------------------------------------
def raw_loop(model, tok, batch: int, steps: int) -> float:
    import torch

    ids = torch.tensor([tok(PROMPT).input_ids] * batch)
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True)
        cache = out.cache
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=nxt, cache=cache, use_cache=True)
            cache = out.cache
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        return batch * steps / (time.perf_counter() - t0)


def sequential_generate(model, tok, calls: int, new: int) -> float:
    import torch

    ids = torch.tensor([tok(PROMPT).input_ids])
    t0 = time.perf_counter()
    n = 0
    with torch.inference_mode():
        for _ in range(calls):
            g = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
            n += g.shape[1] - ids.shape[1]
    return n / (time.perf_counter() - t0)


# -- HTTP clients ----------------------------------------------------------------------------------
def _one(url: str, model: str, new: int, out: list, extra: dict) -> None:
    body = {"model": model, "prompt": PROMPT, "max_tokens": new, "stream": True, "temperature": 0.6,
            "top_p": 0.95, "stream_options": {"include_usage": True}, **extra}
    times, tokens = [], None
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                for ch in chunk.get("choices", []):
                    if ch.get("text"):
                        times.append(time.perf_counter())
    # token count from usage when the server reports it (a chunk can hold no text, e.g. a partial UTF-8 byte)
    out.append((times, tokens if tokens is not None else len(times)))


def drive(url: str, model: str, clients: int, new: int, extra: dict) -> dict:
    results: list[tuple[list[float], int]] = []
    threads = [threading.Thread(target=_one, args=(url, model, new, results, extra)) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    tokens = sum(n for _, n in results)
    first = min(r[0] for r, _ in results if r)
    last = max(r[-1] for r, _ in results if r)
    decode = sum(n - 1 for _, n in results) / max(1e-9, last - first)
    itl = [b - a for r, _ in results for a, b in zip(r, r[1:])]
    return {"clients": clients, "tokens": tokens, "e2e_tok_s": tokens / wall, "decode_tok_s": decode,
            "itl_p50_ms": 1000 * percentile(itl, 50), "itl_p99_ms": 1000 * percentile(itl, 99)}


@contextlib.contextmanager
def start_dsr1(model_dir: Path, dtype: str, threads: int | None, extra: list[str] | None = None) -> Iterator[str]:
    """`dsr1 serve` as a user runs it, for the length of the block; yields its URL."""
    args = ["--dtype", dtype, "--max-concurrent", "16", "--served-model-name", "bench",
            *(extra or ["--max-model-len", "512"])]
    if threads:
        args += ["--threads", str(threads)]
    with tempfile.TemporaryDirectory() as tmp, running(str(model_dir), log=Path(tmp) / "serve.log",
                                                       extra_args=args, timeout=600) as url:
        yield url


def start_hf(model_dir: Path, dtype: str) -> tuple[subprocess.Popen, str] | None:
    exe = Path(sys.executable).parent / "transformers"
    if not exe.exists():
        return None
    port = free_port()
    hf_dtype = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}[dtype]
    # Bound its paged cache: by default it takes 0.6 x system RAM (issue 4).
    p = subprocess.Popen([str(exe), "serve", str(model_dir), "--continuous-batching", "--host", "127.0.0.1",
                          "--port", str(port), "--dtype", hf_dtype, "--device", "cpu", "--cb-block-size", "32",
                          "--cb-num-blocks", "512"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, p, None, timeout=120)
    except ServerError:
        stop(p)
        return None
    return p, url


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=default_model())
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seq-calls", type=int, default=3, help="sequential generate calls (median tok/s of them)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dt).eval()
    print(f"model {args.model.name} dtype {args.dtype} prompt {len(tok(PROMPT).input_ids)} tokens, {args.new} new",
          flush=True)
    # This machine is shared and its speed swings several-fold within seconds: each server run is
    # measured right next to its floor, in short bursts, several times, and the medians of the
    # pairwise ratios are reported.
    seq = statistics.median(sequential_generate(model, tok, 1, args.new) for _ in range(args.seq_calls))
    print(f"sequential generate {seq:.1f} tok/s", flush=True)
    server_run = contextlib.ExitStack()
    url = server_run.enter_context(start_dsr1(args.model, args.dtype, args.threads))
    raw: dict[int, list[float]] = {1: [], 4: [], 16: []}
    server: dict[int, list[dict]] = {1: [], 4: [], 16: []}
    hf_pairs: list[tuple[dict, dict]] = []
    try:
        drive(url, "bench", 2, 8, {"ignore_eos": True})  # warm-up
        for c in (1, 4, 16):
            for rep in range(args.reps):
                raw[c].append(raw_loop(model, tok, c, args.new))
                server[c].append(drive(url, "bench", c, args.new, {"ignore_eos": True}))
                print(f"c={c} rep {rep}: raw {raw[c][-1]:.1f} tok/s, dsr1 serve "
                      f"{json.dumps({k: round(v, 1) for k, v in server[c][-1].items()})}", flush=True)
        del model
        hf_started = None if args.skip_hf else start_hf(args.model, args.dtype)
        if not args.skip_hf and hf_started is None:
            print("transformers serve --continuous-batching did not start here; skipped", flush=True)
        if hf_started:
            hp, hurl = hf_started
            try:
                drive(hurl, str(args.model), 2, 8, {})  # warm-up
                for rep in range(args.reps):
                    ours = drive(url, "bench", 16, args.new, {"ignore_eos": True})
                    theirs = drive(hurl, str(args.model), 16, args.new, {})
                    hf_pairs.append((ours, theirs))
                    print(f"rep {rep}: dsr1 serve c=16 {ours['e2e_tok_s']:.1f} tok/s, transformers serve c=16 "
                          f"{json.dumps({k: round(v, 1) for k, v in theirs.items()})}", flush=True)
            finally:
                stop(hp)
    finally:
        server_run.close()
    ratio = {c: statistics.median(s["decode_tok_s"] / r for s, r in zip(server[c], raw[c])) for c in raw}
    srv16_e2e = statistics.median(s["e2e_tok_s"] for s in server[16])
    hf_ratio = statistics.median(o["e2e_tok_s"] / t["e2e_tok_s"] for o, t in hf_pairs) if hf_pairs else None

    print(f"\nratios, medians over {args.reps} interleaved reps (targets from issue 4):")
    print(f"  server c=16 decode / raw batch-16 loop   {ratio[16]:.2f}  (>= 0.85)")
    print(f"  server c=1 decode / raw batch-1 loop     {ratio[1]:.2f}  (overhead {100 * (1 - ratio[1]):.0f}%, target < 10%)")
    print(f"  server c=4 decode / raw batch-4 loop     {ratio[4]:.2f}")
    print(f"  server c=16 e2e / sequential generate    {srv16_e2e / seq:.2f}  (>= 6)")
    if hf_ratio is not None:
        print(f"  server c=16 e2e / transformers serve CB  {hf_ratio:.2f}  (>= 1.15)")


if __name__ == "__main__":
    main()
