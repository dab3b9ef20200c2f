"""Crash-safe file primitives: atomic writes, fsync'd renames, fast hashing.

Every write dsr1 makes to its store goes through here: write a temp file in the
same directory, fsync it, rename it over the target, fsync the directory. A crash
at any point leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

# 8 MiB reads: large enough that hashlib (which releases the GIL and uses the
# CPU's SHA extensions through OpenSSL) runs at disk speed, small enough to stay cheap.
HASH_BLOCK = 8 << 20


def free_bytes(path: Path) -> int:
    """Free space on the disk that holds `path`, or would hold it: the nearest existing parent is asked."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # the pid lets store.clean_stale spot dead writers
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk or Ctrl-C leaves no temp file behind
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def atomic_symlink(target: str, link: Path) -> None:
    """Point `link` at `target` (relative), replacing any existing link atomically."""
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.{os.getpid()}.lnk")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under root (before a directory is renamed into place)."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            if p.is_symlink():
                continue
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(dirpath))


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished directory into place; an older one at `final` is removed after the swap."""
    fsync_tree(tmp)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: Path, progress: Callable[[int], None] | None = None, limit: int | None = None) -> str:
    """sha256 of a file (or of its first `limit` bytes), read in large blocks."""
    h = hashlib.sha256()
    buf = bytearray(HASH_BLOCK)
    view = memoryview(buf)
    left = limit
    with open(path, "rb", buffering=0) as f:
        while True:
            want = HASH_BLOCK if left is None else min(HASH_BLOCK, left)
            if want == 0:
                break
            n = f.readinto(view[:want])
            if not n:
                break
            h.update(view[:n])
            if left is not None:
                left -= n
            if progress:
                progress(n)
    return h.hexdigest()


def git_blob_sha1(path: Path) -> str:
    """The git object id of a file: what the hub reports as `oid` for non-LFS files."""
    size = path.stat().st_size
    h = hashlib.sha1(f"blob {size}\0".encode())
    with open(path, "rb") as f:
        while chunk := f.read(HASH_BLOCK):
            h.update(chunk)
    return h.hexdigest()
