"""Weight-only int4 GEMMs: PyTorch's eager CPU kernel against inductor's int4 GEMM template over the same
packed integers, side by side in one process.

    python benchmarks/int4_gemm.py                       # the 1.5B shape's gate|up, rows 1 .. 256
    python benchmarks/int4_gemm.py --backends CPP,ATEN   # let autotune pick ATen's kernel too

Why: `--precision int4` runs `_weight_int4pack_mm_for_cpu` (dsr1/serve/wquant.py), which widens the
weights to floating point again for every few rows: fast at one row, 5x bf16's time at sixteen. With the
compiled step (wquant.Frozen) inductor lowers the same call to its own int4 template (AMX tiles where
the CPU has them) when `max_autotune` lets it, and the batch size decides which is faster. Eight distinct
[--n, --k] matrices (groups of 32) are applied in turn so that nothing stays in cache; each row count is
compiled with a static shape (as the one-row library is; the dynamic library's whole step is timed per
batch size by the server at its first start: FastForward.measure_rows). Printed: ms per matrix eager /
compiled, and eager / compiled.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import cpu_line  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=17920, help="output features (default: the 1.5B shape's gate|up)")
    ap.add_argument("--k", type=int, default=1536, help="input features")
    ap.add_argument("--rows", default="1,2,4,16,64,256")
    ap.add_argument("--backends", default="CPP", help="inductor's max_autotune_gemm_backends")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()

    import torch
    import torch._inductor.config as inductor_config

    from dsr1.serve.wquant import QuantWeight

    torch.manual_seed(0)
    mats = [QuantWeight(torch.randn(args.n, args.k, dtype=torch.bfloat16) * 0.02, "int4") for _ in range(8)]

    class Eight(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for i, w in enumerate(mats):
                self.register_parameter(f"q{i}", torch.nn.Parameter(w.q, requires_grad=False))
                self.register_parameter(f"s{i}", torch.nn.Parameter(w.scales, requires_grad=False))

        def forward(self, x):
            return [torch._weight_int4pack_mm_for_cpu(x, getattr(self, f"q{i}"), 32, getattr(self, f"s{i}"))
                    for i in range(len(mats))]

    def best(fn, x) -> float:
        fn(x)
        t = float("inf")
        for _ in range(args.reps):
            t0 = time.perf_counter()
            fn(x)
            t = min(t, time.perf_counter() - t0)
        return t * 1000 / len(mats)

    m = Eight().eval()
    opts = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": args.backends,
            "autotune_num_choices_displayed": 0}
    print(f"CPU: {cpu_line()}; torch {torch.__version__}; [{args.n}, {args.k}] int4, groups of 32; "
          f"backends {args.backends}; a static compile per row count")
    print(f"{'rows':>5} {'eager ms':>9} {'compiled ms':>12} {'eager/compiled':>15}")
    with torch.inference_mode(), inductor_config.patch(opts):
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, args.k, dtype=torch.bfloat16)
            torch._dynamo.reset()
            compiled = torch.compile(m, dynamic=False)
            e, c = best(m, x), best(compiled, x)
            print(f"{rows:>5} {e:>9.2f} {c:>12.2f} {e / c:>15.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
