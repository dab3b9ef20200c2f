"""Decode with the compiled package's weights mapped from its constants file, against copies of them in
anonymous memory: does reading the weights through a file mapping cost decode speed?

    python benchmarks/package_constants.py --shape 1.5b
    THP_MEM_ALLOC_ENABLE=1 python benchmarks/package_constants.py --shape 1.5b   # the copies on huge pages

Why: a restart maps inductor's packed weights from `step-<key>.consts` and hands them to AOTInductor's
runner in place (dsr1/serve/aotstep.py), so they are file pages (4 KiB, never transparent huge pages)
where the library's own copy used to be anonymous memory. One process: the package is built (or loaded
from `--store`), then the same runner is handed the mapped tensors and clones of them in turn, and the
compiled step is timed at 1, 4 and 16 rows (median of `--reps` calls, `--rounds` alternations); printed:
ms per step each way and mapped / copied. torch's THP_MEM_ALLOC_ENABLE=1 puts the clones (and every
large allocation) on transparent huge pages where the kernel allows them (madvise mode).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_line, demo_model  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="demo", help="demo, 1.5b or 7b (built once by benchmarks/_shapes.py)")
    ap.add_argument("--store", help="where the package is kept (default: a temporary directory: compiled now)")
    ap.add_argument("--rows", default="1,4,16")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    import torch

    from dsr1.serve.engine import EmbeddedModel

    if args.shape == "demo":
        model = Path(demo_model())
    else:
        from _shapes import hf_model

        model = hf_model(args.shape)
    rows = [int(r) for r in args.rows.split(",")]
    print(f"CPU: {cpu_line()}; THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', '')}")
    tmp = tempfile.TemporaryDirectory(prefix="dsr1-consts-")
    m = EmbeddedModel(model, dtype=torch.bfloat16)
    cache = m.make_cache(max(rows), 2048)
    m.fast.enable_compile(store=Path(args.store or tmp.name))
    t0 = time.perf_counter()
    m.fast.warm_up(cache)
    print(f"package {m.fast.compile_how} in {time.perf_counter() - t0:.1f} s: {m.fast.package.name}")
    run = m.fast._aot
    if not getattr(run, "constants", None):
        print("this package holds its constants inside the library (fp32, or oneDNN's packed ones): nothing to compare")
        return 1
    live = {id(t) for t in run.shared}
    mapped = dict(run.constants)
    stored = [k for k, t in mapped.items() if id(t) not in live]
    copied = {k: (t.clone() if k in stored else t) for k, t in mapped.items()}
    print(f"{len(stored)} stored constants, {sum(mapped[k].nbytes for k in stored) / 1e9:.2f} GB, "
          f"mapped from {m.fast.package.with_suffix('.consts').name}")

    def step_ms(n: int) -> float:
        ids = torch.zeros(n, 1, dtype=torch.long)
        pos = torch.full((n, 1), 64, dtype=torch.long)
        cols = torch.arange(65)
        with torch.inference_mode():
            m.fast._run_compiled(ids, pos, cols, cache)  # untimed: pages touched, kernels warm
            times = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                m.fast._run_compiled(ids, pos, cols, cache)
                times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3

    got: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):
        for way, consts in (("mapped", mapped), ("copied", copied)):
            run.runner.update_constant_buffer(consts, False, True, True)
            for n in rows:
                got.setdefault((way, n), []).append(step_ms(n))
    anon_huge = next((ln.split(":")[1].strip() for ln in open("/proc/meminfo") if ln.startswith("AnonHugePages")), "?")
    print(f"AnonHugePages after: {anon_huge}")
    print("| rows | mapped ms | copied ms | mapped / copied |\n| --- | --- | --- | --- |")
    for n in rows:
        a, b = statistics.median(got[("mapped", n)]), statistics.median(got[("copied", n)])
        print(f"| {n} | {a:.1f} | {b:.1f} | {a / b:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
