"""What a MODEL argument names and what it is, without loading it.

A catalog name, a stored model (dsr1.store), a model directory, a .gguf file or a hub
repo id. The architecture comes from the catalog, else from the directory's config.json,
else from the GGUF header (dsr1.gguf_meta): plain file reads, no torch, no network.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dsr1 import catalog
from dsr1.catalog import ModelSpec

THINK_END = "</think>"


@dataclass(frozen=True)
class ModelRef:
    arg: str  # what the user typed
    kind: str  # catalog | store | dir | gguf | hub
    name: str  # short name: catalog/store name, directory or file stem, repo id
    spec: ModelSpec | None  # None: size unknown (a hub repo not pulled yet)
    path: str | None  # local directory or .gguf file the engine loads; None = not local yet
    repo: str | None  # hub repo id, when known
    catalog_name: str | None
    head_dim: int | None
    reasoning: bool | None  # tokenizer has </think> (None = unknown)
    quantized: str | None  # bitsandbytes/awq/... when the checkpoint is already quantized
    # A stored model imported from a GGUF file: that file, for `--engine llamacpp` (None: not an
    # import); `gguf_problem` says why it cannot be used (moved, changed since the import).
    gguf_file: str | None = None
    gguf_problem: str | None = None
    # A model stored as GGUF (dsr1.gguf_store): llama.cpp's name for its quantization, and the size of
    # the embedded engine's bf16 copy still to be made (0 once made).
    gguf_quant: str | None = None
    embedded_copy_bytes: int = 0

    @property
    def local(self) -> bool:
        return self.path is not None


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def spec_from_config(cfg: dict, name: str) -> ModelSpec | None:
    """A ModelSpec from a transformers config.json (llama/qwen2/deepseek_v3 style keys)."""
    text = cfg.get("text_config") or cfg
    try:
        hidden, layers, heads = int(text["hidden_size"]), int(text["num_hidden_layers"]), int(text["num_attention_heads"])
    except (KeyError, TypeError, ValueError):
        return None
    arch = str(text.get("model_type") or "llama")
    mla = text.get("kv_lora_rank") is not None
    dtype = str(text.get("torch_dtype") or text.get("dtype") or "bfloat16")
    quant = (cfg.get("quantization_config") or {}).get("quant_method")
    native = "fp8" if quant == "fp8" else {"float32": "fp32", "float16": "fp16"}.get(dtype, "bf16")
    fields = dict(
        name=name, repo=str(cfg.get("_name_or_path") or name), description="", architecture=arch, params_b=0.0,
        layers=layers, hidden=hidden, intermediate=int(text.get("intermediate_size") or 4 * hidden), heads=heads,
        kv_heads=int(text.get("num_key_value_heads") or heads), vocab=int(text.get("vocab_size") or 32000),
        max_context=int(text.get("max_position_embeddings") or 4096), native_dtype=native, hub_size_gb=0.0,
        licence="", reasoning=False, tie_embeddings=bool(text.get("tie_word_embeddings", False)),
        attention_bias=bool(text.get("attention_bias", arch == "qwen2")), head_dim=text.get("head_dim"),
    )
    if mla:
        fields.update(mtp_layers=int(text.get("num_nextn_predict_layers") or 0),
                      moe_intermediate=text.get("moe_intermediate_size"), routed_experts=int(text.get("n_routed_experts") or 0),
                      shared_experts=int(text.get("n_shared_experts") or 0),
                      experts_per_token=int(text.get("num_experts_per_tok") or 0),
                      first_dense_layers=int(text.get("first_k_dense_replace") or 0),
                      q_lora_rank=text.get("q_lora_rank") or hidden, kv_lora_rank=text.get("kv_lora_rank"),
                      qk_nope_head_dim=text.get("qk_nope_head_dim"), qk_rope_head_dim=text.get("qk_rope_head_dim"),
                      v_head_dim=text.get("v_head_dim"))
    spec = ModelSpec(**fields)
    return spec


def _head_dim(spec: ModelSpec | None) -> int | None:
    if spec is None:
        return None
    if spec.is_mla:
        return (spec.qk_nope_head_dim or 0) + (spec.qk_rope_head_dim or 0)
    return spec.head_dim or spec.hidden // spec.heads


def _has_think(model_dir: Path) -> bool | None:
    """Whether the tokenizer knows </think> (what serve's `auto` reasoning parser asks too)."""
    seen = False
    for fname in ("tokenizer.json", "tokenizer_config.json", "added_tokens.json"):
        f = model_dir / fname
        if f.is_file():
            seen = True
            try:
                with open(f, encoding="utf-8", errors="replace") as fh:
                    if THINK_END in fh.read():
                        return True
            except OSError:
                continue
    return False if seen else None


def _from_dir(arg: str, kind: str, name: str, model_dir: Path, repo: str | None) -> ModelRef:
    cfg = _read_json(model_dir / "config.json") or {}
    spec = catalog.find(repo) if repo else None
    if spec is None and repo:  # a quantized checkpoint of a catalog model (dsr1/data/checkpoints.toml)
        from dsr1 import checkpoints

        ck = checkpoints.by_repo(repo)
        spec = catalog.find(ck.model) if ck else None
    cat = spec.name if spec else None
    quant = (cfg.get("quantization_config") or {}).get("quant_method")
    local_spec = spec_from_config(cfg, name)
    if spec is None:
        spec = local_spec
    return ModelRef(arg, kind, name, spec, str(model_dir), repo, cat, _head_dim(local_spec or spec),
                    _has_think(model_dir), quant if quant and quant != "fp8" else None)


def _from_gguf(arg: str, path: Path) -> ModelRef:
    """A .gguf file, checked as `dsr1 pull` checks it (GGUF magic, a whole header, every tensor's
    bytes there): a damaged file is refused by --dry-run too, not by llama-server minutes later."""
    from dsr1 import gguf_import

    fields = gguf_import.inspect(path).header.fields
    spec = _spec_from_gguf(fields, path)
    tokens = fields.get("tokenizer.ggml.tokens")
    think = THINK_END in tokens.value if tokens is not None else None
    return ModelRef(arg, "gguf", path.stem, spec, str(path), None, None, _head_dim(spec), think, "gguf")


def _spec_from_gguf(fields: dict, path: Path) -> ModelSpec | None:
    def get(key, default=None):
        f = fields.get(key)
        return f.value if f is not None else default

    arch = str(get("general.architecture", "llama"))
    try:
        layers, hidden, heads = int(get(f"{arch}.block_count")), int(get(f"{arch}.embedding_length")), int(get(f"{arch}.attention.head_count"))
    except (TypeError, ValueError):
        return None
    kv = int(get(f"{arch}.attention.head_count_kv", heads) or heads)
    return ModelSpec(name=path.stem, repo=path.name, description="", architecture=arch, params_b=0.0, layers=layers,
                     hidden=hidden, intermediate=int(get(f"{arch}.feed_forward_length", 4 * hidden) or 4 * hidden),
                     heads=heads, kv_heads=kv, vocab=32000, max_context=int(get(f"{arch}.context_length", 4096) or 4096),
                     native_dtype="bf16", hub_size_gb=path.stat().st_size / 1e9, licence="", reasoning=False,
                     head_dim=get(f"{arch}.attention.key_length"))


def _import_source(manifest) -> dict:
    """The GGUF file a stored model was imported from, if it is still the file that was imported:
    its size and modification time are recorded at import (hashing gigabytes on every serve
    would cost more than it proves; `dsr1 verify` checks the store's own files)."""
    src = manifest.source_path or manifest.source
    p = Path(src)
    if not p.is_file():
        return {"gguf_file": None, "gguf_problem": f"it was imported from {src}, which is no longer there"}
    st = p.stat()
    size, mtime = manifest.checks.get("source_size"), manifest.checks.get("source_mtime_ns")
    if (size is not None and size != st.st_size) or (mtime is not None and mtime != st.st_mtime_ns):
        return {"gguf_file": None, "gguf_problem": f"{src} has changed since it was imported"}
    return {"gguf_file": str(p.resolve()), "gguf_problem": None}


def _stored_gguf(arg: str, manifest, spec: ModelSpec | None) -> ModelRef:
    """A model stored as GGUF: the file (first shard) for llama-server; the embedded engine's copy
    when it was made (else what making it costs)."""
    from dsr1 import gguf_files, gguf_store

    first = manifest.gguf_path
    if manifest.embedded_ready:
        ref = _from_dir(arg, "store", manifest.name, Path(manifest.embedded_dir), manifest.repo_id)
        copy = 0
    else:
        g = _from_gguf(arg, first)
        ref = ModelRef(**{**g.__dict__, "kind": "store", "name": manifest.name, "repo": manifest.repo_id})
        copy = gguf_store.bf16_bytes(gguf_files.read_set(first).tensors)
    if spec is not None:
        ref = ModelRef(**{**ref.__dict__, "spec": spec, "catalog_name": spec.name})
    return ModelRef(**{**ref.__dict__, "gguf_file": str(first), "gguf_quant": manifest.gguf_quant,
                       "embedded_copy_bytes": copy, "quantized": "gguf"})


def gguf_of(ref: ModelRef) -> ModelRef:
    """`ref` (a stored GGUF import) as the GGUF file it came from, keeping the store's name."""
    assert ref.gguf_file is not None
    g = _from_gguf(ref.arg, Path(ref.gguf_file))
    return ModelRef(**{**g.__dict__, "name": ref.name, "catalog_name": ref.catalog_name,
                       "repo": ref.repo, "gguf_file": ref.gguf_file, "gguf_quant": ref.gguf_quant,
                       "spec": ref.spec if ref.catalog_name else g.spec})


def resolve(arg: str) -> ModelRef:
    """MODEL as the user typed it. Never downloads; a catalog model not in the store yet
    comes back with `path=None` (serve pulls it before starting an engine)."""
    from dsr1 import store

    p = Path(arg).expanduser()
    if p.suffix.lower() == ".gguf" and (p.is_file() or "/" in arg or not catalog.find(arg)):
        return _from_gguf(arg, p.resolve())
    if p.is_dir() and (p / "config.json").is_file():
        return _from_dir(arg, "dir", p.resolve().name, p.resolve(), None)
    spec = catalog.find(arg)
    manifest = store.find(arg)
    if manifest is None and spec is not None:  # pulled earlier under a quantized name (e.g. NAME-nf4)
        manifest = next((m for m in store.list_models() if m.name in (spec.name, f"{spec.name}-int8", f"{spec.name}-nf4")), None)
    if manifest is not None and manifest.is_gguf:
        return _stored_gguf(arg, manifest, spec)
    if manifest is not None and (Path(manifest.model_dir) / "config.json").is_file():
        ref = _from_dir(arg, "store", manifest.name, Path(manifest.model_dir), manifest.repo_id or (spec.repo if spec else None))
        if manifest.quantization not in (None, "none"):
            ref = ModelRef(**{**ref.__dict__, "quantized": manifest.quantization})
        if manifest.source_kind == "gguf":
            ref = ModelRef(**{**ref.__dict__, **_import_source(manifest)})
        return ref
    if spec is not None:
        return ModelRef(arg, "catalog", spec.name, spec, None, spec.repo, spec.name, _head_dim(spec),
                        True if spec.reasoning else None, None)
    if arg.count("/") == 1 and all(arg.split("/")) and not arg.startswith((".", "/", "~")):
        return ModelRef(arg, "hub", arg, None, None, arg, None, None, None, None)
    if "/" in arg or arg.startswith((".", "~")):
        store.resolve_model_dir(arg)  # raises NotFoundError with the fix (a path that is not a model)
    raise _unknown(arg)


def _unknown(arg: str) -> Exception:
    """MODEL is no path, catalog name, stored model or hub id: say what it may have meant."""
    from dsr1 import store
    from dsr1.errors import NotFoundError

    import difflib

    names = [m.name for m in catalog.models()] + [a for m in catalog.models() for a in m.aliases]
    names += [m.name for m in store.list_models()]
    close = difflib.get_close_matches(arg.lower(), names, n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    hint += "`dsr1 models` lists the catalog, `dsr1 list` the store; a hub repo is OWNER/NAME"
    return NotFoundError(f"unknown model '{arg}': not a catalog name, a stored model, a directory or a .gguf file",
                         hint=hint)


_SAMPLE = 1 << 20


def fingerprint(path: str | None) -> str | None:
    """What identifies a model's files across nodes, in seconds: each file's relative name and size,
    and 1 MiB read at its start, middle and end. Two copies of one revision agree; a different
    revision, a fine-tune with the same shapes (its tensors differ in every sample) or a truncated
    copy does not. Not a substitute for `dsr1 verify` (which hashes everything); None when the
    model is not local."""
    import hashlib

    if path is None:
        return None
    root = Path(path)
    files = [root] if root.is_file() else sorted(
        (p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)),
        key=lambda p: p.relative_to(root).as_posix())
    h = hashlib.sha256()
    for f in files:
        rel = f.name if f == root else f.relative_to(root).as_posix()
        size = f.stat().st_size
        h.update(f"{rel}\0{size}\0".encode())
        with open(f, "rb") as fh:
            for at in sorted({0, max(0, size // 2 - _SAMPLE // 2), max(0, size - _SAMPLE)}):
                fh.seek(at)
                h.update(fh.read(_SAMPLE))
    return h.hexdigest()[:16]
