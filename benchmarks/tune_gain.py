"""What `dsr1 bench tune` gains: tuned settings against the default profile, under the same SLO.

1. `dsr1 bench tune MODEL --slo SLO --budget BUDGET` (every installed engine that can serve the
   model, or --engines) writes a tuned profile into a private DSR1_HOME.
2. Then, side by side in one run, the same load escalation and SLO check as tune uses
   (dsr1.bench.tune.measure: closed loop, concurrency 1, 2, 4, ... until the SLO breaks) measures
     default   `dsr1 serve MODEL --no-tuned` (the profile's defaults: what a user gets untuned)
     each engine at its own defaults (`--engine E --no-tuned`)
     tuned     `dsr1 serve MODEL` (which applies the tuned profile)
   --repeat times in turns; the median goodput of each is reported.
Targets (issue 11): tuned >= 1.3x default's goodput, and >= the best engine at its defaults.

    python benchmarks/tune_gain.py --model .cache/test-models/smollm2-135m-bf16 \\
        --engines-home .cache/engines-home --budget 20m
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, demo_model  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=demo_model())
    ap.add_argument("--engines-home", default=str(REPO / ".cache" / "engines-home"),
                    help="a DSR1_HOME whose engines/ holds installed engines (linked, not written to)")
    ap.add_argument("--engines", help="engines to tune (default: embedded and every installed one)")
    ap.add_argument("--slo", default="ttft_p99=2s,tpot_p99=100ms")
    ap.add_argument("--budget", default="20m")
    ap.add_argument("--input-len", default="256")
    ap.add_argument("--output-len", default="128")
    ap.add_argument("--max-load", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()

    home = Path(tempfile.mkdtemp(prefix="tune-gain-home-"))
    engines_dir = Path(args.engines_home) / "engines"
    if engines_dir.is_dir():
        (home / "engines").symlink_to(engines_dir.resolve())
    os.environ["DSR1_HOME"] = str(home)
    os.environ["PYTHONPATH"] = str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")
    os.environ.pop("DSR1_API_KEY", None)
    cmd = [sys.executable, "-m", "dsr1", "bench", "tune", args.model, "--slo", args.slo, "--budget", args.budget,
           "--input-len", args.input_len, "--output-len", args.output_len, "--max-load", str(args.max_load), "--json"]
    if args.engines:
        cmd += ["--engine", args.engines]
    print(f"# {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if r.returncode != 0:
        print(f"tune failed (exit {r.returncode})", file=sys.stderr)
        return 1
    doc = json.loads(r.stdout)
    if not doc.get("best"):
        print("tune found no candidate meeting the SLO", file=sys.stderr)
        return 1
    print(f"# tune: {len(doc['results'])} candidates measured in {doc['seconds']:.0f} s, {len(doc['skipped'])} "
          f"skipped; best {doc['best']['key']}", file=sys.stderr, flush=True)

    from dsr1.bench import tune
    from dsr1.bench.sweep import BenchConfig
    from dsr1.bench.workload import build_workload, token_counter

    cfg = tune.TuneConfig(model=args.model, slo=tune.parse_slo(args.slo), engines=doc["engines"], budget_s=0,
                          out_dir=Path(tempfile.mkdtemp(prefix="tune-gain-")), input_len=args.input_len,
                          output_len=args.output_len, max_load=args.max_load, server_timeout=900)
    workload, choice = build_workload(BenchConfig(url="", input_len=args.input_len, output_len=args.output_len,
                                                  requests=1, concurrency=[1]), args.model)
    encode = token_counter(choice.tokenizer)

    rows = {"default": tune.Candidate("")}  # serve's own choice, tuned profile ignored
    for e in doc["engines"]:
        rows[f"{e} defaults"] = tune.Candidate(e)
    rows["tuned"] = tune.Candidate("", use_tuned=True)  # `dsr1 serve MODEL`, which applies the tuned profile
    scores: dict[str, list[float]] = {k: [] for k in rows}
    for rep in range(args.repeat):
        for label, cand in rows.items():
            res = tune.measure(cfg, cand, workload, encode, tune.Hooks())
            scores[label].append(res.score)
            print(f"# {label} #{rep + 1}: goodput {res.score:.3f} req/s at concurrency {res.best_load}"
                  + (f" ({res.error})" if res.error else ""), file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in scores.items()}
    print(f"\ngoodput (requests/s meeting {tune.slo_text(cfg.slo)}), {args.input_len} in / {args.output_len} out, "
          f"median of {args.repeat} in turns; tuned = {doc['best']['key']}")
    for k, v in med.items():
        print(f"{k:<22}{v:>8.3f}   runs: {', '.join(f'{x:.3f}' for x in scores[k])}")
    base = med["default"]
    best_engine = max((k for k in med if k.endswith(" defaults")), key=lambda k: med[k])
    print(f"tuned / default: {med['tuned'] / base:.2f}x (target >= 1.3)" if base else "default met the SLO at no load")
    print(f"tuned / best engine at its defaults ({best_engine}): {med['tuned'] / med[best_engine]:.2f}x (target >= 1.0)"
          if med[best_engine] else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
