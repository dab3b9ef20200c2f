"""Import a GGUF file (Ollama, LM Studio, llama.cpp) as a safetensors model directory.

transformers' GGUF loader dequantizes the tensors. A model loaded with plain
`gguf_file=` refuses `save_pretrained` ("quantized with gguf and is not
serializable"); loading with `quantization_config=GgufConfig(gguf_file=...,
dequantize=True)` gives an ordinary model that saves. The tokenizer (with its chat
template) comes from the GGUF metadata too.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from dsr1.errors import IntegrityError, NotFoundError, UsageError

GGUF_MAGIC = b"GGUF"


@dataclass
class GgufInfo:
    path: str
    architecture: str
    name: str | None
    size: int


def inspect(path: Path) -> GgufInfo:
    """Check the file really is GGUF and read its architecture (cheap: header and metadata only)."""
    if not path.is_file():
        raise NotFoundError(f"no such file: {path}", hint="pass the path of a .gguf file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise UsageError(f"{path} is not a GGUF file (starts with {magic!r}, expected b'GGUF')",
                         hint="pass a .gguf model file, e.g. from Ollama's blobs or LM Studio's models folder")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # truncated or damaged header: gguf raises assorted errors
        raise IntegrityError(f"{path} is a damaged GGUF file ({exc})", hint="download the file again") from None

    def field(key: str) -> str | None:
        f = reader.fields.get(key)
        if f is None:
            return None
        return bytes(f.parts[f.data[0]]).decode("utf-8", "replace")

    return GgufInfo(path=str(path), architecture=field("general.architecture") or "?",
                    name=field("general.name"), size=path.stat().st_size)


def supported_architectures() -> list[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return sorted(GGUF_SUPPORTED_ARCHITECTURES)


def import_gguf(path: Path, out_dir: Path, dtype: str = "bfloat16") -> GgufInfo:
    """Convert `path` into a transformers model directory at `out_dir` (created; must not exist)."""
    info = inspect(path)
    supported = supported_architectures()
    if info.architecture not in supported:
        raise UsageError(f"{path} holds a '{info.architecture}' model, which transformers cannot load from GGUF",
                         hint=f"supported GGUF architectures: {', '.join(supported)}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    torch_dtype = getattr(torch, dtype)
    qc = GgufConfig(gguf_file=path.name, dequantize=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, quantization_config=qc,
                                                     dtype=torch_dtype)
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except ValueError as exc:
        if "not supported" in str(exc):
            raise UsageError(f"transformers cannot load {path}: {exc}",
                             hint=f"supported GGUF architectures: {', '.join(supported)}") from None
        raise IntegrityError(f"could not read {path}: {exc}", hint="download the file again") from None
    out_dir.mkdir(parents=True)
    try:
        model.save_pretrained(out_dir)
        tok.save_pretrained(out_dir)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    return info
