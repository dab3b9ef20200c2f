"""Prefix caching and speculative decoding on the embedded engine, each against itself turned off.

Side by side in one run, the same model and dtype, real `dsr1 serve` processes and the official
openai client:

  prefix   TTFT of requests that share a 1,000-token system prompt (each with its own question),
           one at a time after one warm-up request, with `--prefix-cache-mb 0` and with the
           default prefix cache. Target (issue 10): >= 5x lower with it.
  spec     output tokens/s of greedy requests at concurrency 1 and 16 with `--speculative off`
           and `--speculative ngram`, on prompts that ask the model to repeat and continue a text
           it was given (the case prompt lookup is for) and on open prompts (where it should cost
           little), with the acceptance rate from /metrics. Outputs are compared: greedy-exact.
           The same with `--speculative draft`: a draft model (--draft-model; default: the first
           --draft-layers layers of the model itself, a layer-skip draft, since no smaller model
           shares the demo model's tokenizer).

    python benchmarks/serve_fastpath.py --model .cache/test-models/smollm2-135m-bf16
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, demo_model  # noqa: E402

TEXT = ("The river rises in the northern hills, where snow melts each spring and feeds a hundred small "
        "streams. It runs south through farmland, past the old mill and the stone bridge, and reaches the "
        "sea at a wide, slow delta where birds gather in their thousands. ")


class Server:
    def __init__(self, model: str, args: list[str], home: Path):
        env = {**os.environ, "PYTHONPATH": str(REPO), "DSR1_HOME": str(home)}
        env.pop("DSR1_API_KEY", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "dsr1", "serve", model, "--port", "0", *args],
                                     stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        self.url = ""
        self.lines = []
        for line in self.proc.stderr:
            self.lines.append(line)
            if line.startswith("dsr1 serve: ready on "):
                self.url = line.split("ready on ", 1)[1].strip()
                break
        if not self.url:
            raise SystemExit("server did not start:\n" + "".join(self.lines[-20:]))
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=600)
        self.name = self.client.models.list().data[0].id

    def metric(self, name: str) -> float:
        m = re.search(rf"^{name} ([0-9.e+-]+)$", httpx.get(self.url + "/metrics").text, re.M)
        return float(m.group(1)) if m else float("nan")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def ttft(srv: Server, prompt: str) -> float:
    t0 = time.perf_counter()
    stream = srv.client.completions.create(model=srv.name, prompt=prompt, max_tokens=2, temperature=0, stream=True)
    first = None
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].text:
            first = time.perf_counter() - t0
    return first if first is not None else time.perf_counter() - t0


def prefix_run(model: str, extra: list[str], args) -> tuple[float, int]:
    system = TEXT * 19  # ~1,000 tokens with the demo tokenizer
    srv = Server(model, ["--dtype", args.dtype, "--max-model-len", "2048", *extra], Path(tempfile.mkdtemp()))
    try:
        n = srv.client.completions.create(model=srv.name, prompt=system, max_tokens=1).usage.prompt_tokens
        ttft(srv, system + "\nQuestion 0: where does the river rise?\nAnswer:")  # warm-up (fills the cache)
        times = [ttft(srv, system + f"\nQuestion {i}: what happens at mile {i * 7}?\nAnswer:")
                 for i in range(1, args.prefix_requests + 1)]
        return statistics.median(times), n
    finally:
        srv.stop()


def spec_run(model: str, extra: list[str], conc: int, prompts: list[str], args) -> tuple[float, list[str], float]:
    srv = Server(model, ["--dtype", args.dtype, "--max-concurrent", str(max(conc, 1)), "--max-model-len", "1024",
                         *extra], Path(tempfile.mkdtemp()))
    try:
        def one(p: str):
            r = srv.client.completions.create(model=srv.name, prompt=p, max_tokens=args.output_len, temperature=0,
                                              extra_body={"ignore_eos": True})
            return r.choices[0].text, r.usage.completion_tokens

        one(prompts[0])  # warm-up
        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(conc) as ex:
            results = list(ex.map(one, prompts))
        wall = time.perf_counter() - t0
        rate = srv.metric("dsr1_spec_decode_acceptance_rate")
        return sum(n for _, n in results) / wall, [t for t, _ in results], rate
    finally:
        srv.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=demo_model())
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--prefix-requests", type=int, default=8)
    ap.add_argument("--output-len", type=int, default=96)
    ap.add_argument("--only", default="prefix,spec")
    ap.add_argument("--spec-methods", default="ngram,draft")
    ap.add_argument("--draft-model", help="draft for --speculative draft (default: a layer-skip draft)")
    ap.add_argument("--draft-layers", type=int, default=6)
    ap.add_argument("--num-speculative-tokens", type=int, default=4)
    args = ap.parse_args()
    if "prefix" in args.only:
        off, n = prefix_run(args.model, ["--prefix-cache-mb", "0"], args)
        on, _ = prefix_run(args.model, [], args)
        print(f"prefix cache, shared {n}-token system prompt, median TTFT of {args.prefix_requests} requests: "
              f"off {off * 1e3:.0f} ms, on {on * 1e3:.0f} ms, ratio {off / on:.1f}x", flush=True)
    if "spec" in args.only:
        repeat = [f"Copy this text exactly, then continue it.\nText: {TEXT}\nCopy: {TEXT[: 40 + 9 * i]}"
                  for i in range(16)]
        open_ = [f"Write a short story about a {w} who finds a lost key." for w in
                 ("farmer", "sailor", "child", "baker", "doctor", "pilot", "teacher", "miner",
                  "painter", "singer", "cook", "judge", "guard", "tailor", "poet", "monk")]
        methods = {"ngram": ["--speculative", "ngram"]}
        if "draft" in args.spec_methods:
            from dsr1.serve.speculative import save_layer_draft

            draft = args.draft_model or str(save_layer_draft(args.model, args.draft_layers,
                                                             Path(tempfile.mkdtemp()) / "draft"))
            methods["draft"] = ["--speculative", "draft", "--draft-model", draft]
        k = ["--num-speculative-tokens", str(args.num_speculative_tokens)]
        for label, prompts in (("repeat", repeat), ("open", open_)):
            for conc in (1, 16):
                ps = prompts[:4] if conc == 1 else prompts
                base, want, _ = spec_run(args.model, ["--speculative", "off"], conc, ps, args)
                for method in [m for m in args.spec_methods.split(",") if m in methods]:
                    fast, got, rate = spec_run(args.model, methods[method] + k, conc, ps, args)
                    same = sum(a == b for a, b in zip(want, got))
                    print(f"speculative {method}, {label} prompts, c={conc}: off {base:.1f} tok/s, on {fast:.1f} "
                          f"tok/s, ratio {fast / base:.2f}x, acceptance {rate:.2f}, identical outputs "
                          f"{same}/{len(want)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
