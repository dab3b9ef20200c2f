"""Handing resident pages of file mappings back to the system (Linux, glibc): memory the process still
maps but no longer needs resident, such as a checkpoint's weights once copied (dsr1.serve.fastpath) or a
compiled library's weights once its runner has copied them (dsr1.serve.aotstep). MADV_DONTNEED on a
file-backed mapping drops the pages from this process only; the file and the page cache keep them, and a
later read fetches them again. Never on anonymous memory, where the same call zeroes it: callers pass
ranges inside the file mappings `file_mappings` lists."""

from __future__ import annotations

import ctypes
import functools
import os

MADV_DONTNEED = 4  # <linux/mman.h>
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def file_mappings() -> list[tuple[int, int, str]]:
    """This process's file-backed memory mappings as (start, end, path) (none where /proc is not)."""
    out = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[4] != "0" and parts[5].startswith("/"):  # an inode and a path
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    out.append((lo, hi, parts[5].rstrip("\n")))
    except OSError:
        pass
    return out


@functools.cache
def _madvise():
    """libc's madvise with its argument types set, or None (not glibc); looked up once, not per range."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise


def drop(lo: int, hi: int) -> bool:
    """MADV_DONTNEED on [lo, hi) (page-aligned, inside a file mapping); whether it was done."""
    madvise = _madvise()
    if madvise is None:  # not glibc: the pages stay
        return False
    return madvise(lo, hi - lo, MADV_DONTNEED) == 0


def mapping_of(ptr: int, nbytes: int) -> tuple[int, int, str] | None:
    """The file mapping (start, end, path) holding all of [ptr, ptr + nbytes), or None."""
    return next(((lo, hi, name) for lo, hi, name in file_mappings() if lo <= ptr and ptr + nbytes <= hi), None)


def smaps(pid: int | str = "self") -> list[tuple[int, int, str, dict[str, int]]] | None:
    """Every mapping of a process (this one by default) as (start, end, path or "", {field: bytes}) from
    /proc/PID/smaps: "Rss", "Anonymous", ...; None when /proc cannot say."""
    out: list[tuple[int, int, str, dict[str, int]]] = []
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                parts = line.split()
                if not parts:
                    continue
                if "-" in parts[0] and not parts[0].endswith(":"):  # a mapping's first line: start-end perms ...
                    a, b = (int(x, 16) for x in parts[0].split("-"))
                    path = " ".join(parts[5:])
                    out.append((a, b, path if path.startswith("/") else "", {}))
                elif out and len(parts) == 3 and parts[2] == "kB":
                    out[-1][3][parts[0].rstrip(":")] = int(parts[1]) * 1024
    except (OSError, ValueError):
        return None
    return out


def smaps_bytes(lo: int, hi: int, field: str) -> int | None:
    """The sum of smaps' `field` ("Rss", "Anonymous", ...) over this process's mappings inside [lo, hi), in
    bytes; None when /proc/self/smaps cannot say."""
    maps = smaps()
    return None if maps is None else sum(f.get(field, 0) for a, b, _, f in maps if lo <= a and b <= hi)


def written(lo: int, hi: int) -> int | None:
    """Bytes of the mappings inside [lo, hi) that this process has written to (smaps' Anonymous: a private
    file mapping's pages copied on write, which `drop` would discard, not merely unmap); None when
    /proc/self/smaps cannot say."""
    return smaps_bytes(lo, hi, "Anonymous")
