"""Run a command as if the CPU had no AMX: the nearest this project's AMX machines come to a CPU without it.

    python benchmarks/_noamx.py -- python benchmarks/engines.py --shape 1.5b ...
    python benchmarks/_noamx.py --check          # what torch and oneDNN see under it

Two things, both inherited by every child (the servers `dsr1 bench` starts, vLLM's engine core,
llama-server):
- Linux hands a process the AMX tile state only when it asks (arch_prctl ARCH_REQ_XCOMP_PERM, kernel
  5.16+), and the AMX users that read CPUID themselves ask before their first tile instruction: oneDNN
  (its `mayiuse(amx)`, inside torch and vLLM) and llama.cpp's ggml (`ggml_amx_init`, before it offers its
  AMX buffer type). A seccomp filter answers that one request with EPERM, so they take their AVX-512 paths.
- torch's own answer (`torch.cpu._is_amx_tile_supported()`, read by inductor and by vLLM's choice of
  attention and GEMM kernels) is False in every Python process (_noamx_site/sitecustomize.py, first on
  PYTHONPATH). vLLM picks its AMX kernels from that answer (CPUID), not from Linux's: refused alone, it
  would still choose them (whether they then fault was not tried).
The flags in /proc/cpuinfo are unchanged; benchmarks/_common.py's `cpu_line` says "AMX denied" under it.

What it is not: an AMD EPYC. The memory system, caches and clocks stay this Xeon's, so the figures say
how the engines' AVX-512 paths compare with each other on this machine, not what an EPYC measures.
docs/performance.md names every such table "AMX denied".
"""

from __future__ import annotations

import ctypes
import os
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import pythonpath  # noqa: E402

ENV = "DSR1_BENCH_AMX_DENIED"  # set for the command, so tables can say so
SITE = Path(__file__).resolve().parent / "_noamx_site"

_AUDIT_ARCH_X86_64 = 0xC000003E
_NR_ARCH_PRCTL = 158
_ARCH_REQ_XCOMP_PERM = 0x1023
_PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 38, 22, 2
_RET_ALLOW, _RET_EPERM = 0x7FFF0000, 0x00050000 | 1  # SECCOMP_RET_ERRNO | EPERM
_LD_W_ABS, _JEQ_K, _RET_K = 0x20, 0x15, 0x06
# struct seccomp_data: nr at 0, arch at 4, args[0] at 16 (its low 32 bits: little-endian)
_PROGRAM = (
    (_LD_W_ABS, 0, 0, 4),
    (_JEQ_K, 0, 4, _AUDIT_ARCH_X86_64),   # another ABI: allow
    (_LD_W_ABS, 0, 0, 0),
    (_JEQ_K, 0, 2, _NR_ARCH_PRCTL),       # another call: allow
    (_LD_W_ABS, 0, 0, 16),
    (_JEQ_K, 1, 0, _ARCH_REQ_XCOMP_PERM),  # the AMX request: EPERM
    (_RET_K, 0, 0, _RET_ALLOW),
    (_RET_K, 0, 0, _RET_EPERM),
)


def deny_amx() -> None:
    """Install the filter on this process (and so on everything it execs or forks afterwards)."""
    if os.uname().machine != "x86_64":
        raise SystemExit("noamx: x86-64 Linux only")
    code = b"".join(struct.pack("=HBBI", *ins) for ins in _PROGRAM)
    buf = ctypes.create_string_buffer(code, len(code))

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    prog = Prog(len(_PROGRAM), ctypes.addressof(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    for args in ((_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), (_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0)):
        if libc.prctl(*args) != 0:
            err = ctypes.get_errno()
            raise SystemExit(f"noamx: prctl{args[:2]} failed: {os.strerror(err)}")


def check() -> None:
    """Print what torch, inductor and oneDNN see in this process."""
    import torch
    from torch._inductor import cpu_vec_isa

    x, w = torch.randn(64, 512, dtype=torch.bfloat16), torch.randn(1024, 512, dtype=torch.bfloat16)
    isa = torch.backends.mkldnn.verbose  # oneDNN prints the kernel it ran, ISA included
    with isa(torch.backends.mkldnn.VERBOSE_ON):
        torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    granted = ctypes.CDLL(None).syscall(_NR_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, 18) == 0  # 18: XFEATURE_XTILEDATA
    print(f"torch says AMX: {torch.cpu._is_amx_tile_supported()}; Linux grants the tile state: {granted}; "
          f"inductor's ISA: {type(cpu_vec_isa.pick_vec_isa()).__name__}", flush=True)


def main(argv: list[str]) -> None:
    if argv[:1] == ["--check"]:
        argv = [sys.executable, "-c", "import sys; sys.path.insert(0, %r); import _noamx; _noamx.check()"
                % str(Path(__file__).resolve().parent)]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        raise SystemExit(__doc__)
    deny_amx()
    os.environ[ENV] = "1"
    os.environ["PYTHONPATH"] = pythonpath(SITE)
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
