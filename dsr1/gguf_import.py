"""Import a GGUF file (Ollama, LM Studio, llama.cpp) as a safetensors model directory.

transformers' GGUF loader dequantizes the tensors. A model loaded with plain
`gguf_file=` refuses `save_pretrained` ("quantized with gguf and is not
serializable"); loading with `quantization_config=GgufConfig(gguf_file=...,
dequantize=True)` gives an ordinary model that saves. The tokenizer (with its chat
template) comes from the GGUF metadata too.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from typing import TYPE_CHECKING

from dsr1.errors import IntegrityError, NotFoundError, UsageError

if TYPE_CHECKING:
    from dsr1 import gguf_meta

GGUF_MAGIC = b"GGUF"


@dataclass
class GgufInfo:
    path: str
    architecture: str
    name: str | None
    size: int
    header: "gguf_meta.Header | None" = field(default=None, repr=False)
    tokenizer_repairs: list[str] = field(default_factory=list)
    tokenizer_checked: int = 0  # control/user-defined tokens checked against the file's ids


def inspect(path: Path) -> GgufInfo:
    """Check the file really is GGUF and read its architecture (cheap: header and metadata only)."""
    if not path.is_file():
        raise NotFoundError(f"no such file: {path}", hint="pass the path of a .gguf file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise UsageError(f"{path} is not a GGUF file (starts with {magic!r}, expected b'GGUF')",
                         hint="pass a .gguf model file, e.g. from Ollama's blobs or LM Studio's models folder")
    from dsr1 import gguf_meta

    try:
        header = gguf_meta.read(path)
    except gguf_meta.GgufFormatError as exc:  # truncated download, damaged header
        raise IntegrityError(f"{path} is a damaged GGUF file ({exc})", hint="download the file again") from None
    return GgufInfo(path=str(path), architecture=header.get("general.architecture") or "?",
                    name=header.get("general.name"), size=path.stat().st_size, header=header)


def supported_architectures() -> list[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return sorted(GGUF_SUPPORTED_ARCHITECTURES)


def import_gguf(path: Path, out_dir: Path, dtype: str = "bfloat16") -> GgufInfo:
    """Convert `path` (a .gguf file, or the first shard of a split set) into a transformers model
    directory at `out_dir` (created; must not exist). transformers' loader reads one file, so a split
    set is first joined into one (beside `out_dir`, removed after)."""
    from dsr1 import gguf_files

    gset = gguf_files.read_set(path)
    if len(gset.paths) > 1:
        joined = out_dir.with_name(f".{out_dir.name}.joined.gguf")
        joined.parent.mkdir(parents=True, exist_ok=True)
        try:
            join_shards(gset.paths, joined)
            info = import_gguf(joined, out_dir, dtype)
        finally:
            joined.unlink(missing_ok=True)
        return GgufInfo(path=str(path), architecture=info.architecture, name=info.name, size=gset.size,
                        header=gset.header, tokenizer_repairs=info.tokenizer_repairs,
                        tokenizer_checked=info.tokenizer_checked)
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
        model, loading = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                              quantization_config=qc, dtype=torch_dtype,
                                                              output_loading_info=True)
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except ValueError as exc:
        if "not supported" in str(exc):
            raise UsageError(f"transformers cannot load {path}: {exc}",
                             hint=f"supported GGUF architectures: {', '.join(supported)}") from None
        raise IntegrityError(f"could not read {path}: {exc}", hint="download the file again") from None
    _check_complete(path, model, loading)
    out_dir.mkdir(parents=True)
    try:
        model.save_pretrained(out_dir)
        tok.save_pretrained(out_dir)
        _match_file_tokenizer(info, out_dir, model.get_input_embeddings().weight.shape[0])
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    return info


def _check_complete(path: Path, model, loading: dict) -> None:
    """Every weight the model needs came from the file: transformers initialises a weight it did not
    find at random and only logs it, and a model with random layers answers gibberish that looks like
    a bad quantization. A tied output head (no `output.weight` in the file) is not missing."""
    missing = set(loading.get("missing_keys") or ())
    tied = getattr(model, "_tied_weights_keys", None) or {}
    tied_names = set(tied) if isinstance(tied, (dict, list, set, tuple)) else set()
    if getattr(model.config, "tie_word_embeddings", False):
        missing -= tied_names | {"lm_head.weight"}
    if missing:
        shown = ", ".join(sorted(missing)[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise IntegrityError(f"{path} lacks {len(missing)} weight(s) the {model.config.model_type} model needs: {shown}",
                             hint="the file is incomplete (a shard of a split set passed alone?) or not a whole "
                                  "model: pass a whole .gguf, or the first shard with every shard beside it")


def join_shards(paths: list[Path], out: Path) -> None:
    """Write a split GGUF set as one file: the first shard's metadata (less the split keys), then every
    shard's tensors byte for byte (no re-quantization)."""
    import gguf

    first = gguf.GGUFReader(str(paths[0]))
    arch = first.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(out), arch)
    try:
        for f in first.fields.values():
            if f.name.startswith(("GGUF.", "split.")) or f.name in ("general.architecture", "general.alignment"):
                continue
            main = f.types[0]
            sub = f.types[-1] if main == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(f.name, f.contents(), main, sub_type=sub)
        readers = [first] + [gguf.GGUFReader(str(p)) for p in paths[1:]]
        for r in readers:
            for t in r.tensors:
                writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for r in readers:
            for t in r.tensors:
                writer.write_tensor_data(t.data)
    finally:
        writer.close()


def _match_file_tokenizer(info: GgufInfo, out_dir: Path, embedding_rows: int) -> None:
    """Repair the saved tokenizer to the GGUF's own token ids, then reload and check it (a guard like
    quantization's reload check): a tokenizer that still disagrees is refused, never stored."""
    from transformers import AutoTokenizer

    from dsr1 import gguf_tokenizer

    table = gguf_tokenizer.TokenTable.from_header(info.header)
    if not table.tokens:
        return
    try:
        info.tokenizer_repairs = gguf_tokenizer.repair_saved(out_dir, table)
    except ValueError as exc:
        raise IntegrityError(f"{info.path}: its token table cannot be matched ({exc})",
                             hint="the file's tokenizer metadata is inconsistent; get the GGUF from another source") from None
    problems = gguf_tokenizer.check(AutoTokenizer.from_pretrained(out_dir), table, embedding_rows)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise IntegrityError(f"{info.path}: the imported tokenizer disagrees with the file's token ids: {shown}",
                             hint="this GGUF's tokenizer is not one dsr1 can import faithfully; pull the model's "
                                  "safetensors repo instead (dsr1 pull REPO_ID)")
    info.tokenizer_checked = len(table.added())
