"""GGUF models in the store: kept as they came, every shard, and dequantized only on demand.

`store_set` copies a checked GGUF set (dsr1.gguf_files) into an entry's `gguf/`: each file is
hashed as it is copied, a copy killed part-way resumes where it stopped (the source's sizes and
modification times are recorded beside the partial files, so a changed source starts over), and
the finished set is re-read (headers, tensor bytes, split keys) before it moves into place.

`embedded_copy` makes the safetensors copy dsr1's embedded engine loads (transformers
dequantizes the GGUF): only when the embedded engine is to serve the model, since for an R1
GGUF it is several times the file's size. The manifest records it last.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from dsr1 import gguf_files, store
from dsr1.errors import DiskSpaceError
from dsr1.fsutil import fsync_dir, replace_dir

GGUF_SUBDIR = "gguf"
PARTIAL = ".gguf-partial"  # an interrupted copy, resumed by the next pull of the same files
_STAMP = ".source.json"
_CHUNK = 8 << 20


def bf16_bytes(tensors: list[gguf_files.Tensor]) -> int:
    """The embedded engine's copy of a GGUF: every element in bf16."""
    return 2 * sum(t.elements for t in tensors)


def store_set(gset: gguf_files.GgufSet, entry: Path, reporter, before_install=None) -> tuple[Path, list[store.FileRecord]]:
    """Copy `gset` into `entry/gguf/` (resumable, hashed while copying); returns the folder and its records.
    `before_install(entry)` runs just before the copy replaces an earlier one (pull withdraws the old manifest)."""
    from dsr1.fsutil import free_bytes

    partial = entry / PARTIAL
    stamp = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in gset.paths}
    stamp_file = partial / _STAMP
    try:
        if json.loads(stamp_file.read_text()) != stamp:
            shutil.rmtree(partial)  # another source than the interrupted copy's: start over
    except (OSError, ValueError):
        pass
    partial.mkdir(parents=True, exist_ok=True)
    stamp_file.write_text(json.dumps(stamp))
    have = {p.name: (partial / p.name).stat().st_size if (partial / p.name).is_file() else 0 for p in gset.paths}
    total = sum(s for s, _ in stamp.values())
    done = sum(min(have[n], stamp[n][0]) for n in have)
    free = free_bytes(entry)
    if total - done > free:
        raise DiskSpaceError(f"storing {gset.first.name} needs {(total - done) / 1e9:.2f} GB more at {entry}, "
                             f"{free / 1e9:.2f} GB free", hint="free space there or set DSR1_HOME to a bigger disk")
    reporter.start(total, done)
    records = []
    for src in gset.paths:
        reporter.file(src.name)
        records.append(_copy(src, partial / src.name, reporter))
    if hasattr(reporter, "close"):
        reporter.close()
    stamp_file.unlink()
    gguf_files.read_set(partial / gset.first.name)  # the copies are whole and consistent too
    final = entry / GGUF_SUBDIR
    if before_install is not None:
        before_install(entry)
    replace_dir(partial, final)
    fsync_dir(entry)
    return final, records


def _copy(src: Path, dst: Path, reporter) -> store.FileRecord:
    size = src.stat().st_size
    have = dst.stat().st_size if dst.is_file() else 0
    if have > size:
        dst.unlink()
        have = 0
    h = hashlib.sha256()
    with open(src, "rb") as fin, open(dst, "ab") as fout:
        if have:  # the bytes an earlier pull copied: hashed again, and checked against the source
            with open(dst, "rb") as old:
                left = have
                while left:
                    a, b = old.read(min(_CHUNK, left)), fin.read(min(_CHUNK, left))
                    if a != b:  # the partial is not this file's start: copy it whole
                        fout.truncate(0)
                        fin.seek(0)
                        h, have = hashlib.sha256(), 0
                        break
                    h.update(a)
                    left -= len(a)
        fin.seek(have)
        while True:
            chunk = fin.read(_CHUNK)
            if not chunk:
                break
            fout.write(chunk)
            h.update(chunk)
            reporter.advance(len(chunk))
        fout.flush()
        os.fsync(fout.fileno())
    return store.FileRecord(path=dst.name, size=size, sha256=h.hexdigest())


def make_embedded(first: Path, entry: Path, reporter) -> tuple[Path, list[store.FileRecord], object]:
    """Dequantize the GGUF set at `first` into `entry/model/` (built aside, moved in whole); returns the
    folder, its file records and the import's findings. The caller records it in the manifest."""
    from dsr1 import gguf_import
    from dsr1.fsutil import free_bytes

    gset = gguf_files.read_set(first)
    need = bf16_bytes(gset.tensors)
    free = free_bytes(entry)
    if need * 1.1 > free:
        raise DiskSpaceError(f"the embedded engine's copy of {entry.name} needs about {need / 1e9:.2f} GB at {entry}, "
                             f"{free / 1e9:.2f} GB free",
                             hint="free space there, or serve the GGUF as it is with llama-server "
                                  "(`dsr1 engine install llamacpp`)")
    work = entry / f".tmp-{os.getpid()}"
    reporter.stage(f"making the embedded engine's bf16 copy of {entry.name} ({gset.quant} GGUF -> about "
                   f"{need / 1e9:.2f} GB of safetensors; once)")
    try:
        imported = gguf_import.import_gguf(first, work / "imported")
        records = store.record_files(work / "imported")
        final = entry / store.MODEL_SUBDIR
        replace_dir(work / "imported", final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final, records, imported


def record_embedded(m: store.Manifest, folder: Path, records: list[store.FileRecord], imported) -> None:
    m.embedded_dir, m.embedded_files, m.dtype = str(folder), records, "bfloat16"
    m.checks = {**m.checks, "tokenizer_tokens_checked": imported.tokenizer_checked,
                "tokenizer_repairs": imported.tokenizer_repairs}


def embedded_copy(name: str, reporter=None) -> Path:
    """The stored GGUF `name` as a safetensors directory for the embedded engine: made once (into the
    entry's model/), recorded in the manifest, reused after."""
    from dsr1.download import Reporter

    reporter = reporter or Reporter()
    m = store.load(name)
    if m.embedded_ready:
        return Path(m.embedded_dir)
    assert m.gguf_path is not None, f"{name} is not stored as GGUF"
    folder, records, imported = make_embedded(m.gguf_path, store.entry_dir(name), reporter)
    record_embedded(m, folder, records, imported)
    store.write_manifest(m)  # last: a crash before this leaves a copy no manifest vouches for, redone next time
    return folder
