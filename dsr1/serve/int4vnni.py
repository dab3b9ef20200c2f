"""int4 x int8 matrix products on AVX-512 VNNI (int4vnni.c), for int4 weights on CPUs without AMX.

Without AMX, every int4 kernel PyTorch has on x86 widens each weight to floating point again for every
few rows it multiplies (the eager `_weight_int4pack_mm_for_cpu` and inductor's AVX-512 micro-kernel), so
16 rows cost several times one row, and prompts crawl. The kernel here multiplies 4-bit weights by
activations quantized to int8 per row and group of 32 (as llama.cpp's Q4 x Q8 dot products do), in
integers, so a weight is unpacked once for all the rows of a call. torchao has such a kernel
(da8w4_linear_cpu), but its PyPI wheel carries CUDA kernels only; PyTorch itself has none.

The C source is compiled once per source, compiler and flags with the system's C compiler (the one
inductor compiles with) into DSR1_HOME/cache/kernels, written atomically, and loaded with ctypes; a
machine without a compiler or without AVX-512 VNNI keeps PyTorch's int4 kernel (`available()` says).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from dsr1.probe.host import cpu_flags

SOURCE = Path(__file__).with_name("int4vnni.c")
FLAGS = ("-O3", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mfma")
NEEDS = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}
GROUP = 32  # input columns per scale/minimum pair: dsr1's int4 groups
BLOCK = 16  # output channels per vector of int32 sums


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")


@functools.lru_cache(maxsize=None)
def amx_granted() -> bool:
    """Whether this process may run AMX tiles: the CPU lists them and Linux grants the tile state
    (arch_prctl ARCH_REQ_XCOMP_PERM, what oneDNN and inductor ask for first). Without torch, so that a plan
    can ask (aotstep.amx_usable is the same question through torch)."""
    if "amx_tile" not in cpu_flags() or platform.machine() != "x86_64":
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(158, 0x1023, 18) == 0  # SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA


def runs_here() -> bool:
    """Whether this kernel can run here: x86-64 with AVX-512 (F, BW, VL) and VNNI, and a C compiler."""
    return platform.machine() == "x86_64" and NEEDS <= cpu_flags() and _compiler() is not None


def suits() -> bool:
    """Whether int4 takes this kernel here: it runs here and AMX is not usable (with AMX, inductor's AMX int4
    template compiled into the step is the faster: docs/performance.md). DSR1_INT4_VNNI=off keeps PyTorch's
    int4 kernels; =on takes this one wherever it runs (tests on a CPU with AMX). Cheap: no torch, no compiling."""
    choice = os.environ.get("DSR1_INT4_VNNI", "auto").lower()
    if choice in ("0", "off", "no", "false"):
        return False
    return runs_here() and (choice in ("1", "on", "yes", "true") or not amx_granted())


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL | None:
    """The compiled kernel, built on first use and kept; None where it cannot run here."""
    if not runs_here():
        return None
    cc = _compiler()
    from dsr1.settings import home

    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    key = hashlib.sha256("\0".join([SOURCE.read_text(), version, *FLAGS]).encode()).hexdigest()[:16]
    out = home() / "cache" / "kernels" / f"int4vnni-{key}.so"
    if not out.exists():
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".int4vnni-", suffix=".so")
        except OSError:  # a read-only or full home: PyTorch's int4 kernels, as without a compiler
            return None
        os.close(fd)
        try:
            done = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                import logging

                logging.getLogger("dsr1.serve").warning("int4 VNNI kernel did not compile (%s): %s", cc,
                                                        done.stderr.strip()[-400:])
                return None
            os.replace(tmp, out)  # atomic: a crash never leaves a half-written library under the final name
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(out))
    fn = lib.int4vnni_mm
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return lib


def available() -> bool:
    """Whether int4 weights take this kernel here (`suits`, and it compiled)."""
    return suits() and _library() is not None


def fits(n: int, k: int) -> bool:
    return n % BLOCK == 0 and k % GROUP == 0


def pack(q, scale, lo):
    """(packed nibbles uint8 [N/16, K/32, 256], scales and minima bf16 [N/16, K/32, 2, 16]) from integers q
    [N, K] in 0..15 and per-group scale and minimum [N, K/32] (w = q * scale + lo); int4vnni.c's layout."""
    import torch

    n, k = q.shape
    nb, g = n // BLOCK, k // GROUP
    # [nb, c, g, j(4), h(2), i(4)] -> [nb, g, j, h, c, i]: the low nibble holds inputs 8j..8j+3, the high 8j+4..
    qq = q.to(torch.uint8).view(nb, BLOCK, g, 4, 2, 4).permute(0, 2, 3, 4, 1, 5)
    nibbles = (qq[:, :, :, 0] | (qq[:, :, :, 1] << 4)).contiguous().view(nb, g, 256)
    sz = torch.stack([scale.float().view(nb, BLOCK, g), lo.float().view(nb, BLOCK, g)], 1)  # [nb, 2, c, g]
    return nibbles, sz.permute(0, 3, 1, 2).contiguous().to(torch.bfloat16)


def unpack(nibbles, sz):
    """`pack`'s inverse: (q int32 [N, K], scale fp32 [N, K/32], lo fp32 [N, K/32]); the scales as bf16 kept them."""
    import torch

    nb, g = nibbles.shape[:2]
    v = nibbles.view(nb, g, 4, 1, BLOCK, 4)
    qq = torch.cat([v & 15, v >> 4], 3)  # [nb, g, j, h, c, i]
    q = qq.permute(0, 4, 1, 2, 3, 5).reshape(nb * BLOCK, g * GROUP).to(torch.int32)
    s = sz.float().permute(0, 3, 1, 2)  # [nb, c, g, 2]
    return q, s[..., 0].reshape(nb * BLOCK, g), s[..., 1].reshape(nb * BLOCK, g)


def mm(x, nibbles, sz):
    """x @ w.T for rows x [..., K] (bf16 or fp32; the result in x's dtype) and a weight `pack` made."""
    import torch

    lib = _library()
    if lib is None:
        raise RuntimeError("the int4 VNNI kernel cannot run on this machine (AVX-512 VNNI and a C compiler needed)")
    nb, g = nibbles.shape[:2]
    n, k = nb * BLOCK, g * GROUP
    lead = x.shape[:-1]
    if x.dtype not in (torch.bfloat16, torch.float32):
        x = x.float()
    x2 = x.reshape(-1, k).contiguous()
    y = torch.empty(x2.shape[0], n, dtype=x2.dtype)
    if x2.shape[0]:
        rc = lib.int4vnni_mm(x2.data_ptr(), int(x2.dtype == torch.bfloat16), x2.shape[0], k, n,
                             nibbles.data_ptr(), sz.data_ptr(), y.data_ptr())
        if rc != 0:
            raise MemoryError("the int4 VNNI kernel could not allocate its workspace")
    return y.reshape(*lead, n)
