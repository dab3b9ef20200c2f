"""Weight-only int4 GEMMs: PyTorch's eager CPU kernel against inductor's int4 GEMM template over the same
packed integers, side by side in one process.

    python benchmarks/int4_gemm.py                       # the 1.5B shape's gate|up, rows 1 .. 256
    python benchmarks/int4_gemm.py --backends CPP,ATEN   # let autotune pick ATen's kernel too
    python benchmarks/int4_gemm.py --dynamic             # one graph over a dynamic row count, as the server's
    python benchmarks/int4_gemm.py --rows 1 --mats 64    # one row, weights streamed from memory (1.1 GB)
    python benchmarks/int4_gemm.py --head --mats 4 --reps 15   # the int8 LM head at one row (head())
    python benchmarks/int4_gemm.py --vnni                # eager kernels without AMX, dsr1's int4 x int8 among them

Why: `--precision int4` runs `_weight_int4pack_mm_for_cpu` (dsr1/serve/wquant.py), which widens the
weights to floating point again for every few rows: fast at one row, 5x bf16's time at sixteen. With the
compiled step (wquant.Frozen) inductor lowers the same call to its own int4 template (AMX tiles where
the CPU has them) when `max_autotune` lets it, and the batch size decides which is faster. Eight distinct
[--n, --k] matrices (groups of 32) are applied in turn so that nothing stays in cache; each row count is
compiled with a static shape (as the one-row library is; the dynamic library's whole step is timed per
batch size by the server at its first start: FastForward.measure_rows). Printed: ms per matrix eager /
compiled as inductor writes it / compiled with dsr1's kernel edits (dsr1/serve/kernel_edits.py: its
one-row path at one row; where inductor picks the AMX kernel, that kernel reading the integers in place),
and eager / dsr1's. `--mats`: how many distinct matrices; eight of the
1.5B shape's gate|up (138 MB) fit the last-level cache of some CPUs (the 2-core Xeon here reports 480 MiB),
so what a decode step sees, weights streamed from memory, takes `--mats 64`.

--dynamic compiles one graph over a dynamic row count three times: as inductor picks its micro-kernel (AMX
tiles where the CPU has them, over its own re-blocked copy of the integers), the same with dsr1's kernel
edits (dsr1/serve/kernel_edits.py: the AMX kernel reading the integers where they lie, as an int4 package
now does), and with the AMX kernel withheld (the AVX-512 one, which reads them in place too).
"""

from __future__ import annotations

import argparse
import contextlib
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
    ap.add_argument("--mats", type=int, default=8, help="distinct matrices applied in turn (64: beyond the cache)")
    ap.add_argument("--dynamic", action="store_true",
                    help="one dynamic-row graph, inductor's kernel choice against the AMX kernel withheld")
    ap.add_argument("--head", action="store_true",
                    help="the int4 model's int8 LM head at one row (default shape: the 1.5B's [151936, 1536])")
    ap.add_argument("--vnni", action="store_true",
                    help="eager kernels side by side: bf16 packed, int8 fbgemm, PyTorch's int4, dsr1's int4 x int8 VNNI")
    args = ap.parse_args()
    if args.head:
        return head(args)
    if args.vnni:
        return vnni(args)

    import os

    os.environ["DSR1_INT4_VNNI"] = "off"  # PyTorch's int4 layout, which inductor's template reads (--vnni: dsr1's)
    import torch
    import torch._inductor.config as inductor_config

    from dsr1.serve.kernel_edits import patched
    from dsr1.serve.wquant import QuantWeight

    torch.manual_seed(0)
    mats = [QuantWeight(torch.randn(args.n, args.k, dtype=torch.bfloat16) * 0.02, "int4") for _ in range(args.mats)]

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
    if args.dynamic:
        return dynamic(m, opts, args, best)
    print(f"CPU: {cpu_line()}; torch {torch.__version__}; {args.mats} x [{args.n}, {args.k}] int4, groups of 32; "
          f"backends {args.backends}; a static compile per row count")
    print(f"{'rows':>5} {'eager ms':>9} {'inductor ms':>12} {'dsr1 ms':>8} {'eager/dsr1':>11} {'GB/s (dsr1)':>12}")
    size = mats[0].q.nbytes + mats[0].scales.nbytes
    opts = {**opts, "fx_graph_cache": False}  # the second compile of a row count must not reuse the first's code
    with torch.inference_mode(), inductor_config.patch(opts):
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, args.k, dtype=torch.bfloat16)
            times = []
            for way in (contextlib.nullcontext, patched):
                torch._dynamo.reset()
                with way():
                    compiled = torch.compile(m, dynamic=False)
                    compiled(x)
                times.append(best(compiled, x))
            e = best(m, x)
            print(f"{rows:>5} {e:>9.3f} {times[0]:>12.3f} {times[1]:>8.3f} {e / times[1]:>11.2f} "
                  f"{size / times[1] / 1e6:>12.1f}", flush=True)
    return 0


def dynamic(m, opts: dict, args, best) -> int:
    """Eager against one graph compiled over a dynamic row count: inductor's choice, the same with dsr1's
    kernel edits, and with the AMX micro-kernel withheld."""
    import torch
    import torch._inductor.compile_fx  # noqa: F401 - inductor's codegen modules import in this order
    import torch._inductor.config as inductor_config
    from torch._inductor.codegen import cpp_micro_gemm

    from dsr1.serve.kernel_edits import patched

    @contextlib.contextmanager
    def without_amx():
        saved = cpp_micro_gemm.micro_gemm_configs.pop(cpp_micro_gemm.CppMicroGemmWoQInt4Amx, None)
        try:
            yield
        finally:
            if saved is not None:
                cpp_micro_gemm.micro_gemm_configs[cpp_micro_gemm.CppMicroGemmWoQInt4Amx] = saved

    rows = [int(r) for r in args.rows.split(",")]
    chosen: list[str] = []
    make = cpp_micro_gemm.create_micro_gemm

    def record(*a, **kw):
        out = make(*a, **kw)
        if out is not None:
            chosen.append(type(out).__name__)
        return out

    opts = {**opts, "fx_graph_cache": False}  # the second compile must not reuse the first's code
    times, kernels = {}, {}
    cpp_micro_gemm.create_micro_gemm = record  # which kernel each compile picked (inductor looks it up per call)
    try:
        with torch.inference_mode(), inductor_config.patch(opts):
            for name, ctx in (("picked", contextlib.nullcontext), ("dsr1", patched), ("no AMX", without_amx)):
                torch._dynamo.reset()
                chosen.clear()
                with ctx():
                    compiled = torch.compile(m)
                    x = torch.randn(3, args.k, dtype=torch.bfloat16)
                    torch._dynamo.mark_dynamic(x, 0)
                    compiled(x)
                kernels[name] = chosen[-1] if chosen else "?"
                times[name] = {r: best(compiled, torch.randn(r, args.k, dtype=torch.bfloat16)) for r in rows if r > 1}
    finally:
        cpp_micro_gemm.create_micro_gemm = make
    with torch.inference_mode():
        print(f"CPU: {cpu_line()}; torch {torch.__version__}; {args.mats} x [{args.n}, {args.k}] int4, groups of 32; "
              f"one graph over a dynamic row count: {kernels['picked']} (picked; dsr1's edits: {kernels['dsr1']}) / "
              f"{kernels['no AMX']} (AMX withheld)")
        print(f"{'rows':>5} {'eager ms':>9} {'picked ms':>10} {'dsr1 ms':>8} {'no-AMX ms':>10} {'dsr1/picked':>12}")
        for r in rows:
            if r == 1:  # dynamo specialises a one-row call into a static graph of its own: not the dynamic one
                continue
            e = best(m, torch.randn(r, args.k, dtype=torch.bfloat16))
            a, d, v = times["picked"][r], times["dsr1"][r], times["no AMX"][r]
            print(f"{r:>5} {e:>9.2f} {a:>10.2f} {d:>8.2f} {v:>10.2f} {d / a:>12.2f}", flush=True)
    return 0


def vnni(args) -> int:
    """The eager kernels a server without AMX can run, on the same `--mats` distinct [--n, --k] weights, ms per
    matrix at each row count: bf16 packed for oneDNN (`--precision` none), int8 fbgemm (`int8`), PyTorch's int4
    (`_weight_int4pack_mm_for_cpu`, what int4 ran before) and dsr1's int4 x int8 VNNI kernel (dsr1.serve.int4vnni,
    what int4 runs without AMX now), over the same 4-bit integers and groups of 32."""
    import torch

    from dsr1.serve import int4vnni
    from dsr1.serve.wquant import PACKED, QuantWeight, _int4pack, int4_groups

    if not int4vnni.runs_here():
        print("dsr1's int4 VNNI kernel cannot run here (AVX-512 VNNI and a C compiler needed)", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    n, k = args.n, args.k
    kinds: dict[str, list] = {"bf16 packed": [], "int8 fbgemm": [], "int4 torch": [], "int4 vnni": []}
    for _ in range(args.mats):
        w = torch.randn(n, k, dtype=torch.bfloat16) * 0.02
        kinds["bf16 packed"].append(QuantWeight(w, PACKED).mm)
        kinds["int8 fbgemm"].append(QuantWeight(w, "int8").mm)
        q, s, lo = int4_groups(w)
        t_q, t_s = _int4pack(q, s, lo, torch.bfloat16)
        kinds["int4 torch"].append(lambda x, t_q=t_q, t_s=t_s: torch._weight_int4pack_mm_for_cpu(x, t_q, 32, t_s))
        v = int4vnni.pack(q, s, lo)
        kinds["int4 vnni"].append(lambda x, v=v: int4vnni.mm(x, *v))
    print(f"CPU: {cpu_line()}; torch {torch.__version__}; {args.mats} x [{n}, {k}], applied in turn; "
          f"ms per matrix, best of {args.reps}")
    print(f"{'rows':>5} " + " ".join(f"{name:>12}" for name in kinds) + f" {'torch/vnni':>11}")
    with torch.inference_mode():
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, k, dtype=torch.bfloat16)
            ms = {}
            for name, fns in kinds.items():
                for f in fns:  # warm: fbgemm packs its int8 at the first call
                    f(x)
                best = float("inf")
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    for f in fns:
                        f(x)
                    best = min(best, time.perf_counter() - t0)
                ms[name] = best * 1000 / len(fns)
            print(f"{rows:>5} " + " ".join(f"{ms[name]:>12.3f}" for name in kinds)
                  + f" {ms['int4 torch'] / ms['int4 vnni']:>11.2f}", flush=True)
    return 0


def head(args) -> int:
    """The int8 LM head ([--n, --k], 151936 x 1536 unless given) at one row, `--mats` distinct heads streamed,
    compiled for one row as the one-row library compiles it, in `--reps` rounds taken in turns: eager
    `_weight_int8pack_mm` over the [N, K] integers; inductor's vector kernel over its plain blocked copy;
    dsr1's (kernel_edits: that kernel reading the AMX kernel's VNNI-2 layout, prefetching further ahead);
    inductor's AMX kernel at one row over the same VNNI-2 copy (what sharing the layout the other way would
    run). Printed per variant: the median and best ms per head, and its result against inductor's."""
    import statistics

    import sympy
    import torch
    import torch._inductor.compile_fx  # noqa: F401 - inductor's codegen modules import in this order
    import torch._inductor.config as inductor_config
    from torch._inductor.codegen import cpp_gemm_template, cpp_micro_gemm
    from torch._inductor.utils import run_and_get_code

    from dsr1.serve.kernel_edits import patched

    n = args.n if args.n != 17920 else 151936
    torch.manual_seed(0)
    heads = [(torch.randint(-127, 128, (n, args.k), dtype=torch.int8), torch.rand(n, dtype=torch.bfloat16) * 0.01)
             for _ in range(args.mats)]

    class Heads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for i, (q, s) in enumerate(heads):
                self.register_parameter(f"q{i}", torch.nn.Parameter(q, requires_grad=False))
                self.register_parameter(f"s{i}", torch.nn.Parameter(s, requires_grad=False))

        def forward(self, x):
            return [torch._weight_int8pack_mm(x, getattr(self, f"q{i}"), getattr(self, f"s{i}"))
                    for i in range(len(heads))]

    create = cpp_micro_gemm.create_micro_gemm

    def amx_at_one_row(*a, **kw):  # the row count hidden from inductor's choice: it skips AMX below 5 rows
        a = list(a)
        if kw.get("input2_dtype") == torch.int8 and getattr(a[1], "is_number", False) and int(a[1]) < 16:
            a[1] = sympy.Symbol("rows_hidden", positive=True, integer=True)
        return create(*a, **kw)

    @contextlib.contextmanager
    def amx():
        with patched():
            cpp_micro_gemm.create_micro_gemm = cpp_gemm_template.create_micro_gemm = amx_at_one_row
            try:
                yield
            finally:
                cpp_micro_gemm.create_micro_gemm = cpp_gemm_template.create_micro_gemm = create

    m = Heads().eval()
    x = torch.randn(1, args.k, dtype=torch.bfloat16)
    opts = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": args.backends,
            "autotune_num_choices_displayed": 0, "fx_graph_cache": False}
    runs, notes, outs = {"eager": m}, {"eager": "eager, the [N, K] rows"}, {}
    with torch.inference_mode(), inductor_config.patch(opts):
        for name, ctx in (("inductor", contextlib.nullcontext), ("dsr1", patched), ("AMX", amx)):
            torch._dynamo.reset()
            with ctx():
                compiled = torch.compile(m, dynamic=False)
                outs[name], code = run_and_get_code(compiled, x)
            code = "".join(code)
            runs[name] = compiled
            notes[name] = ("AMX tiles" if "AMXState" in code else "vector") + (
                ", VNNI-2 pairs" if "B in VNNI-2 pairs" in code or "AMXState" in code else ", plain blocks")
        times = {name: [] for name in runs}
        for _ in range(args.reps):  # in turns: the machine's drift falls on every variant alike
            for name, fn in runs.items():
                fn(x)
                t0 = time.perf_counter()
                fn(x)
                times[name].append((time.perf_counter() - t0) * 1000 / len(heads))
        ref = outs["inductor"]
        print(f"CPU: {cpu_line()}; torch {torch.__version__}; {args.mats} x [{n}, {args.k}] int8 heads streamed, one row; "
              f"{args.reps} rounds in turns")
        print(f"{'variant':<10} {'kernel':<26} {'median ms':>10} {'best ms':>8} {'/ inductor':>11} {'result':>14}")
        base = statistics.median(times["inductor"])
        for name in runs:
            out = outs.get(name) or m(x)
            same = all(torch.equal(a, b) for a, b in zip(out, ref))
            err = max((a.float() - b.float()).abs().max().item() for a, b in zip(out, ref))
            med = statistics.median(times[name])
            print(f"{name:<10} {notes[name]:<26} {med:>10.2f} {min(times[name]):>8.2f} {med / base:>11.2f} "
                  f"{'bit-equal' if same else f'max diff {err:.3g}':>14}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
