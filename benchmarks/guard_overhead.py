"""Guard overhead: the same load on `dsr1 serve` without and with a 20-rule policy (--guard).

Side by side in one run, the demo model, real servers started in turn, the official openai
client: output tokens/s of waves of `--concurrency` (16) streamed requests, alternated between
the two servers --rounds times (both stay up, so neither gets a warmer machine), medians and
their ratio. The policy: 17 keyword topics and 2 patterns on the input, 1 pattern on the
output, PII masking on both (none of them fire on this load: the cost measured is checking).
Issue 13's target: overhead < 3% of throughput.

    python benchmarks/guard_overhead.py [--model DIR] [--rounds 3] [--output-len 128]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import demo_model, tokens_per_second  # noqa: E402

from dsr1.serve.child import running  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def policy(path: Path) -> Path:
    rules = [f'[[rules]]\nname = "topic-{i}"\nwhere = "input"\nkeywords = ["forbiddenword{i}", "othertopic{i}"]\n'
             for i in range(17)]
    rules += ['[[rules]]\nname = "injection"\nwhere = "input"\npattern = "(?i)ignore (all )?previous instructions"\n',
              '[[rules]]\nname = "system-leak"\nwhere = "input"\npattern = "(?i)print your system prompt"\n',
              '[[rules]]\nname = "secret"\nwhere = "output"\npattern = "(?i)api[_-]?key\\\\s*[:=]"\n']
    path.write_text('max_prompt_chars = 20000\n[pii]\nmode = "mask"\n' + "\n".join(rules))
    return path


def wave(client: openai.OpenAI, n: int, output_len: int) -> float:
    def one(_: int) -> int:
        tokens = 0
        for ch in client.completions.create(model="demo", prompt=PROMPT, max_tokens=output_len, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}):
            if ch.usage:
                tokens = ch.usage.completion_tokens
        return tokens

    return tokens_per_second(one, list(range(n)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=demo_model())
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()
    common = ["--served-model-name", "demo", "--max-concurrent", str(args.concurrency)]
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        pol = policy(Path(tmp) / "policy.toml")
        plain = stack.enter_context(running(args.model, log=Path(tmp) / "plain.log", extra_args=common))
        guarded = stack.enter_context(running(args.model, log=Path(tmp) / "guarded.log",
                                              extra_args=common + ["--guard", str(pol)]))
        clients = {k: openai.OpenAI(base_url=u + "/v1", api_key="x", max_retries=0, timeout=600)
                   for k, u in (("off", plain), ("on", guarded))}
        for c in clients.values():
            wave(c, 4, 8)  # warm-up
        got = {"off": [], "on": []}
        for r in range(args.rounds):
            for k in (("off", "on") if r % 2 == 0 else ("on", "off")):
                got[k].append(wave(clients[k], args.concurrency, args.output_len))
            print(f"round {r + 1}: off {got['off'][-1]:.1f} tok/s, on {got['on'][-1]:.1f} tok/s", flush=True)
    off, on = statistics.median(got["off"]), statistics.median(got["on"])
    print(f"\n{args.concurrency} concurrent streams, {args.output_len} output tokens, 20 rules + PII mask:")
    print(f"guards off   {off:8.1f} tok/s")
    print(f"guards on    {on:8.1f} tok/s")
    print(f"overhead     {100 * (1 - on / off):7.1f} %  (target < 3%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
