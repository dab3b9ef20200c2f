"""LoRA on the embedded engine: 16 requests spread over 3 adapters against 16 base-model requests.

Side by side in one run on one real `dsr1 serve` (the demo model, bf16, `--max-concurrent 16`,
three rank-16 adapters on every projection, made with peft), through the official openai client:
output tokens/s of 16 concurrent requests for the base model, then of 16 concurrent requests
round-robin over the three adapters, alternated --rounds times; the median of each and their
ratio. Issue 13's target: mixed / base >= 0.7.

    python benchmarks/lora_mixed.py [--model DIR] [--rounds 3] [--output-len 128]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import demo_model, tokens_per_second  # noqa: E402

from dsr1.serve.child import running  # noqa: E402

PROMPT = ("Write a short story about a lighthouse keeper who finds a message in a bottle. " * 4).strip()
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(base: str, root: Path, n: int, rank: int) -> list[Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = []
    for i in range(n):
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        pm = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS))
        g = torch.Generator().manual_seed(100 + i)
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.data = torch.randn(p.shape, generator=g) * 0.02
        pm.save_pretrained(root / f"a{i}")
        out.append(root / f"a{i}")
    return out


def wave(client: openai.OpenAI, models: list[str], output_len: int) -> float:
    """All requests at once; output tokens/s over the wave's wall time."""
    def one(model: str) -> int:
        r = client.completions.create(model=model, prompt=PROMPT, max_tokens=output_len, temperature=0,
                                      extra_body={"ignore_eos": True})
        return r.usage.completion_tokens

    return tokens_per_second(one, models)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=demo_model())
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--serve-arg", action="append", default=[], help="another `dsr1 serve` argument (repeat)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(args.model, Path(tmp), 3, args.rank)
        extra = ["--served-model-name", "base", "--max-concurrent", str(args.concurrency), *args.serve_arg]
        for i, a in enumerate(adapters):
            extra += ["--lora", f"a{i}={a}"]
        os.environ["COLUMNS"] = "2000"  # the server's start report unwrapped in its log (read below)
        with running(args.model, log=Path(tmp) / "serve.log", extra_args=extra) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600)
            n = args.concurrency
            base_models = ["base"] * n
            mixed_models = [f"a{i % 3}" for i in range(n)]
            wave(client, base_models[:4], 8)  # warm-up
            wave(client, mixed_models[:4], 8)
            base, mixed = [], []
            for r in range(args.rounds):
                base.append(wave(client, base_models, args.output_len))
                mixed.append(wave(client, mixed_models, args.output_len))
                print(f"round {r + 1}: base {base[-1]:.1f} tok/s, mixed over 3 adapters {mixed[-1]:.1f} tok/s",
                      flush=True)
        forward = [ln.strip() for ln in (Path(tmp) / "serve.log").read_text().splitlines() if "forward " in ln]
        print("server:", forward[0] if forward else "(no forward line in its log)")
    b, m = statistics.median(base), statistics.median(mixed)
    print(f"\n{n} concurrent, {args.output_len} output tokens, rank {args.rank} on all 7 projections:")
    print(f"base model      {b:8.1f} tok/s")
    print(f"3 adapters      {m:8.1f} tok/s")
    print(f"mixed / base    {m / b:8.2f}  (target >= 0.7)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
