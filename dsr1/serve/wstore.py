"""Weight-only int8/int4 weights kept on disk, so that a restart maps them instead of quantizing the
checkpoint again.

Why: once the compiled step is kept (dsr1.serve.aotstep), quantizing is what a low-bit restart spends
its time on. Measured on the 1.5B shape (2-core Xeon with AMX, `--precision int4 --compile on`): ready
23.5 s after launch although both compiled libraries loaded in 0.1 s: every start read the 3.55 GB bf16
checkpoint and rounded every weight into int4 groups.

What is kept: per layer, the fused projections' bits as wquant.QuantWeight.parts gives them, and the LM
head's; one file per layer (an int8 layer's fbgemm weights are unpacked one layer at a time, not all at
once), written into a build directory that is renamed into place when complete, so a crash leaves no
set that looks whole. torch.save's format, read back with weights_only (no code runs): int4's mapped, its
integers used where they lie in the page cache (the compiled step reads them in place too); int8's read
into memory and packed again for fbgemm, which makes its own copy (load).

The key is what the bits depend on: a sampled fingerprint of every source weight (aotstep's, which a
fine-tune or a merged adapter changes), the method, the compute dtype, torch's version and the code that
quantizes (wquant's source). Anything else changing makes a new set, never a wrong one.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from dsr1.fsutil import free_bytes
from dsr1.serve import int4vnni, wquant

log = logging.getLogger(__name__)

KEEP = 3  # weight sets kept per DSR1_HOME: the most recently used models'
DONE = "weights.json"  # written last into a set: its layer count, and that the set is whole
LAYER = "layer-{:04d}.pt"
HEAD = "head.pt"


def sources(model) -> list[tuple[str, torch.Tensor]]:
    """The weights the fast path quantizes (every layer's projections and the LM head), by name."""
    out = []
    for i, layer in enumerate(model.model.layers):
        a, m = layer.self_attn, layer.mlp
        for name, lin in (("q", a.q_proj), ("k", a.k_proj), ("v", a.v_proj), ("o", a.o_proj),
                          ("gate", m.gate_proj), ("up", m.up_proj), ("down", m.down_proj)):
            out.append((f"{i}.{name}", lin.weight))
    out.append(("head", model.get_output_embeddings().weight))
    return out


def key(model, method: str) -> str:
    from dsr1.serve.aotstep import weight_fingerprint

    h = hashlib.sha256()
    for name, w in sources(model):
        h.update(name.encode())
        h.update(weight_fingerprint(w))
    meta = {"method": method, "torch": torch.__version__, "groups": wquant.GROUPS,
            "code": hashlib.sha256(inspect.getsource(wquant).encode()).hexdigest()}
    if method == "int4":  # the layout int4 takes on this machine (wquant.int4_layout), and its packing code
        meta["layout"] = wquant.int4_layout()
        if meta["layout"] == wquant.VNNI:
            meta["vnni"] = hashlib.sha256(inspect.getsource(int4vnni).encode()).hexdigest()
    h.update(json.dumps(meta, sort_keys=True).encode())
    return f"{method}-{h.hexdigest()[:32]}"


def maps(method: str) -> bool:
    """Whether a kept set of `method` is mapped (used where it lies) rather than read into memory. int4 is
    used in place; fbgemm copies int8 into its own layout, so mapped, the files' pages stayed resident
    beside that copy (a 1.5B int8 restart peaked 1.8 GB higher): int8 is read."""
    return method != "int8"


def load(root: Path, name: str, layers: int) -> tuple[list[dict[str, wquant.QuantWeight]], wquant.QuantWeight] | None:
    """The set `name` under `root`: per layer {"qkv", "o", "gu", "d"} -> QuantWeight, and the head; None
    when there is none (or it is damaged: it is removed, and the caller quantizes again)."""
    where = root / name
    if not (where / DONE).is_file():
        return None
    try:
        if json.loads((where / DONE).read_text())["layers"] != layers:
            raise ValueError("a different layer count")
        mapped = maps(name.split("-", 1)[0])  # the name is key()'s "<method>-<hash>"
        read = lambda f: torch.load(where / f, mmap=mapped, weights_only=True)  # noqa: E731
        out = [{k: wquant.QuantWeight.from_parts(d) for k, d in read(LAYER.format(i)).items()} for i in range(layers)]
        head = wquant.QuantWeight.from_parts(read(HEAD), lazy=True)  # a compiled step reads it unpacked
    except Exception as e:  # noqa: BLE001 - anything wrong with the files: quantize again
        log.warning("kept %s weights at %s did not load (%s); quantizing again", name, where, e)
        shutil.rmtree(where, ignore_errors=True)
        return None
    os.utime(where)  # most recently used, for prune
    return out, head


class Writer:
    """Writes one set layer by layer as the fast path quantizes (`layer`, then `head`), into a build
    directory renamed to `root/name` by `head`. Every failure (a full disk) is logged and drops the set:
    the server runs on the weights it has, and the next start quantizes again."""

    def __init__(self, root: Path, name: str, need: int):
        self.final = root / name
        self.build = root / f".build-{name}-{os.getpid()}"
        self.layers = 0
        self.why_not = None
        try:
            root.mkdir(parents=True, exist_ok=True)
            free = free_bytes(root)
            if free < need + (1 << 30):  # a gigabyte spare for everything else
                self.why_not = f"{free / 1e9:.1f} GB free at {root}, keeping the {name} weights needs {need / 1e9:.1f} GB"
                log.warning("the quantized weights are not kept for the next start: %s", self.why_not)
                return
            shutil.rmtree(self.build, ignore_errors=True)
            self.build.mkdir()
        except OSError as e:
            self._drop(e)

    def _drop(self, e: Exception) -> None:
        self.why_not = str(e)
        log.warning("the quantized weights are not kept for the next start: %s", e)
        shutil.rmtree(self.build, ignore_errors=True)

    def layer(self, ws: dict[str, wquant.QuantWeight]) -> None:
        if self.why_not is None:
            try:
                torch.save({k: w.parts() for k, w in ws.items()}, self.build / LAYER.format(self.layers))
            except Exception as e:  # noqa: BLE001 - a full disk, an unpicklable part: not kept
                self._drop(e)
        self.layers += 1

    def head(self, w: wquant.QuantWeight) -> None:
        if self.why_not is not None:
            return
        try:
            torch.save(w.parts(), self.build / HEAD)
            (self.build / DONE).write_text(json.dumps({"layers": self.layers}))
            for f in self.build.iterdir():  # on disk before the rename makes the set look whole
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            shutil.rmtree(self.final, ignore_errors=True)  # a damaged set of this name (load removed it)
            os.replace(self.build, self.final)
        except Exception as e:  # noqa: BLE001
            self._drop(e)
            return
        prune(self.final.parent, keep=self.final)


def need_bytes(model, method: str) -> int:
    """About what a set of `model` in `method` takes on disk: 4 or 8 bits per weight, scales, an int8 head."""
    per = {"int4": 0.5 + 4 / wquant.GROUPS[0], "int8": 1.0}[method]
    total = 0
    for name, w in sources(model):
        total += w.numel() * (1.0 if name == "head" else per)
    return int(total)


def prune(root: Path, keep: Path) -> None:
    """Keep the KEEP most recently used sets (`keep` among them); build directories of processes that
    are gone go too."""
    sets = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.stat().st_mtime, reverse=True)
    for old in [p for p in sets if p != keep][KEEP - 1:]:
        shutil.rmtree(old, ignore_errors=True)
    for build in root.glob(".build-*"):
        pid = build.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(build, ignore_errors=True)
