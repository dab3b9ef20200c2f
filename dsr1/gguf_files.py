"""A GGUF model as the files it ships in: one file, or a split set read from its first shard.

llama.cpp's `gguf-split` (and gguf-py's writer with `split_max_tensors`) writes
NAME-00001-of-0000N.gguf ... NAME-0000N-of-0000N.gguf; every shard is a GGUF of its own
with `split.no`, `split.count` and, on the first, `split.tensors.count`. llama-server loads
the set from the first shard. A set is only a model when every shard is there and whole:
`read_set` checks that (each header, each shard's tensor bytes, the split keys, the tensor
count) before anything is stored or served, so a missing middle shard is an error, not a
model with random layers.

Also what a plan needs from the files without loading them: the quantization name
(`general.file_type`), and every tensor's size by what it is (attention, routed experts,
shared experts, embeddings ...) and by layer, for placing a GGUF on GPUs and host RAM.
Plain header reads (dsr1.gguf_meta): no torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from dsr1 import gguf_meta
from dsr1.errors import IntegrityError, NotFoundError, UsageError

SHARD_RE = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$", re.I)
_LAYER_RE = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class Tensor:
    name: str
    ggml_type: int
    elements: int
    nbytes: int

    @property
    def layer(self) -> int | None:
        m = _LAYER_RE.match(self.name)
        return int(m.group(1)) if m else None

    @property
    def kind(self) -> str:
        return tensor_kind(self.name)


@dataclass
class GgufSet:
    paths: list[Path]  # the first shard first; one path for a single file
    header: gguf_meta.Header  # the first file's (it holds the model's metadata)
    tensors: list[Tensor] = field(default_factory=list)

    @property
    def first(self) -> Path:
        return self.paths[0]

    @property
    def size(self) -> int:
        return sum(p.stat().st_size for p in self.paths)

    @property
    def architecture(self) -> str:
        return str(self.header.get("general.architecture") or "?")

    @property
    def quant(self) -> str:
        return quant_name(self.header, self.tensors)


def tensor_kind(name: str) -> str:
    """What a llama.cpp tensor is, by its GGUF name: the categories a placement moves as a unit."""
    base = _LAYER_RE.sub("", name)
    if name.startswith("token_embd"):
        return "embeddings"
    if name.startswith("output.") or name == "output":
        return "output"
    if name.startswith(("output_norm", "rope_")):
        return "norm"
    if re.match(r"ffn_(gate|up|down|gate_up)_exps\.", base):
        return "routed_experts"
    if re.match(r"ffn_(gate|up|down)_shexp\.", base) or base.startswith(("ffn_gate_inp_shexp", "exp_probs_b",
                                                                          "ffn_gate_inp")):
        return "shared_experts" if "shexp" in base else "router"
    if base.startswith("ffn_") and "norm" not in base:
        return "ffn"
    if base.startswith("attn_") and "norm" not in base:
        return "attention"
    if _LAYER_RE.match(name):
        return "norm" if "norm" in base else "other"
    return "other"


def shard_paths(path: Path) -> list[Path] | None:
    """The whole set `path` names as its first shard (None: not a shard name). Missing shards are
    reported by `read_set`; a later shard is refused here (llama-server reads a set from the first)."""
    m = SHARD_RE.match(path.name)
    if not m:
        return None
    no, count = int(m.group("no")), int(m.group("count"))
    if no != 1:
        first = path.with_name(f"{m.group('stem')}-00001-of-{m.group('count')}.gguf")
        raise UsageError(f"{path.name} is shard {no} of {count} of a split GGUF",
                         hint=f"pass the first shard: {first}")
    if count < 1:
        raise UsageError(f"{path.name} names a split of {count} shards", hint="pass the first shard of a whole set")
    return [path.with_name(f"{m.group('stem')}-{i:05d}-of-{m.group('count')}.gguf") for i in range(1, count + 1)]


def _read(path: Path) -> gguf_meta.Header:
    try:
        return gguf_meta.read(path)
    except gguf_meta.GgufFormatError as exc:
        raise IntegrityError(f"{path} is a damaged GGUF file ({exc})", hint="download the file again") from None
    except OSError as exc:
        raise IntegrityError(f"cannot read {path} ({exc.strerror or exc})", hint="check the file") from None


def read_set(path: Path) -> GgufSet:
    """`path` (a .gguf file or a split set's first shard) with every shard checked whole and consistent."""
    if not path.is_file():
        raise NotFoundError(f"no such file: {path}", hint="pass the path of a .gguf file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != gguf_meta.MAGIC:
        raise UsageError(f"{path} is not a GGUF file (starts with {magic!r}, expected b'GGUF')",
                         hint="pass a .gguf model file, e.g. from Ollama's blobs or LM Studio's models folder")
    paths = shard_paths(path) or [path]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise IntegrityError(f"{path.name} is the first of {len(paths)} shards, and {shown} "
                             f"{'is' if len(missing) == 1 else 'are'} not in {path.parent}",
                             hint="download every shard of the set into one folder, then pass the first")
    headers = [_read(p) for p in paths]
    first = headers[0]
    count = first.get("split.count")
    if count is not None and int(count) != len(paths):
        if len(paths) == 1:
            raise UsageError(f"{path.name} is shard {int(first.get('split.no', 0)) + 1} of a {count}-shard split GGUF "
                             f"whose file names were changed", hint="give the shards their "
                                                                    "NAME-0000K-of-0000N.gguf names back and pass the first")
        raise IntegrityError(f"{path.name} says the set has {count} shards, its name says {len(paths)}",
                             hint="download the set again")
    for i, (p, h) in enumerate(zip(paths, headers)):
        no = h.get("split.no")
        if len(paths) > 1 and (no is None or int(no) != i):
            raise IntegrityError(f"{p.name} is not shard {i + 1} of the set (its split.no is {no})",
                                 hint="the shards come from different sets: download the set again")
    tensors = [_tensor(name, dims, t) for h in headers for name, dims, t, _off in h.tensors]
    expected = first.get("split.tensors.count")
    if expected is not None and int(expected) != len(tensors):
        raise IntegrityError(f"the {len(paths)} shards of {path.name} hold {len(tensors)} tensors; the set has "
                             f"{expected}", hint="a shard is from another set or was cut: download the set again")
    return GgufSet(paths, first, tensors)


def _tensor(name: str, dims: tuple[int, ...], ggml_type: int) -> Tensor:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    n = 1
    for d in dims:
        n *= d
    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    return Tensor(name, ggml_type, n, n // block * type_size)


def type_name(ggml_type: int) -> str:
    from gguf import GGMLQuantizationType

    try:
        return GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"type{ggml_type}"


def quant_name(header: gguf_meta.Header, tensors: list[Tensor]) -> str:
    """The file's quantization as llama.cpp names it (Q4_K_M, IQ1_S ...): `general.file_type`, else
    the type holding most of the bytes."""
    from gguf import LlamaFileType

    ft = header.get("general.file_type")
    if ft is not None:
        try:
            name = LlamaFileType(int(ft)).name
            if name != "GUESSED":
                return name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            pass
    by_type: dict[int, int] = {}
    for t in tensors:
        by_type[t.ggml_type] = by_type.get(t.ggml_type, 0) + t.nbytes
    return type_name(max(by_type, key=by_type.get)) if by_type else "?"


def bytes_by_kind(tensors: list[Tensor]) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in tensors:
        out[t.kind] = out.get(t.kind, 0) + t.nbytes
    return out
