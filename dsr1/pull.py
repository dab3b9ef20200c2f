"""`dsr1 pull` as a library call: get a model into the store, verified, optionally quantized.

    pull(source, ...) -> PullResult

`source` is a catalog name, a hub repo id (org/name), a local .gguf file or a local
model directory. Steps: download (resumable, verified) or import -> optionally
quantize into the store's model/ dir (checked by reload) -> hash -> manifest last.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

from dsr1 import lora, settings, store
from dsr1.download import DEFAULT_WORKERS, MAX_WORKERS, Reporter
from dsr1.errors import DiskSpaceError, NotFoundError, UsageError
from dsr1.quantize import METHODS, OUTPUT_RATIO


@dataclass
class Source:
    kind: str  # catalog | hub | gguf | dir
    ref: str
    repo_id: str | None = None
    path: Path | None = None
    default_name: str = ""
    adapter: bool = False  # a LoRA adapter directory (adapter_config.json, no config.json)
    gguf: str | None = None  # OWNER/NAME:QUANT: that GGUF set of a hub repo


@dataclass
class PullResult:
    name: str
    model_dir: str
    source: str
    source_kind: str
    resolved_revision: str | None
    quantization: str
    quantization_source: str
    total_bytes: int
    downloaded_bytes: int = 0
    reused_bytes: int = 0
    resumed_bytes: int = 0
    refetched_corrupt: int = 0
    cleaned: list[str] = field(default_factory=list)
    checks: dict = field(default_factory=dict)
    manifest: str = ""
    kind: str = "model"  # model | lora
    lora_base: str | None = None  # a stored adapter's base model
    format: str = "safetensors"  # or gguf: stored as it came (model_dir holds the file or shards)
    gguf_quant: str | None = None
    embedded_dir: str | None = None  # a GGUF's bf16 copy for the embedded engine, when one was made


def classify(source: str) -> Source:
    from dsr1 import catalog

    p = Path(source).expanduser()
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise UsageError(f"{p} is a file but not a .gguf", hint="pass a .gguf file, a model directory, a catalog "
                                                                   "name (`dsr1 models`) or a hub repo id org/name")
        return Source("gguf", source, path=p.resolve(), default_name=store.sanitize(p.stem))
    if p.is_dir():
        if (p / "adapter_config.json").is_file() and not (p / "config.json").is_file():
            return Source("dir", source, path=p.resolve(), default_name=store.sanitize(p.resolve().name), adapter=True)
        if not (p / "config.json").is_file():
            raise UsageError(f"{p} is a directory without config.json",
                             hint="pass a transformers model directory, or a LoRA adapter (adapter_config.json)")
        return Source("dir", source, path=p.resolve(), default_name=store.sanitize(p.resolve().name))
    if source.lower().endswith(".gguf") or source.startswith((".", "/", "~")):
        raise NotFoundError(f"no such file or directory: {source}", hint="check the path")
    spec = catalog.find(source)
    if spec is not None:
        return Source("catalog", source, repo_id=spec.repo, default_name=spec.name)
    repo, colon, quant = source.partition(":")
    if colon and repo.count("/") == 1 and all(repo.split("/")) and quant:  # a GGUF repo and the quantization
        stem = re.sub(r"[-_.]gguf$", "", repo.split("/")[1], flags=re.I)
        return Source("hub", source, repo_id=repo, default_name=store.sanitize(f"{stem}-{quant}"), gguf=quant)
    if source.count("/") == 1 and all(source.split("/")):
        return Source("hub", source, repo_id=source, default_name=store.sanitize(source.split("/")[1]))
    catalog.get(source)  # raises NotFoundError with the closest catalog names
    raise AssertionError("unreachable")


def resolve_quant(quant: str | None, profile: str | None, model: str | None = None) -> tuple[str, str]:
    """--quant flag > DSR1_QUANT > what the deployment plan quantizes to > none.

    For a catalog model the plan (dsr1.plan, the one serve runs) decides: bitsandbytes
    int8/nf4 when the embedded engine runs it and bf16 does not fit; vLLM and SGLang load
    unquantized or AWQ checkpoints, so nothing. Otherwise the profile's precision, when the
    profile's engine is the embedded one."""
    profile_value = None
    if quant is None and settings.resolve("quant").value is None:
        profile_value = _planned_quant(profile, model)
    r = settings.resolve("quant", flag=quant, profile=profile_value, default="none", kind=str)
    if r.value not in METHODS:
        raise UsageError(f"unknown quantization {r.value!r}", hint=f"use --quant {'|'.join(METHODS)}")
    return r.value, r.source


def _planned_quant(profile: str | None, model: str | None) -> str:
    from dsr1 import plan, sizing
    from dsr1.errors import Dsr1Error

    if model is not None:
        try:
            return plan.make_plan(model, profile, plan.Overrides(engine_port=1)).quant
        except Dsr1Error:  # nothing fits here: the profile's own precision below
            pass
    gpus, host = plan.probe()
    prof = plan.choose_profile(profile, gpus, host)[0].settings
    return sizing.PULL_QUANT.get(prof.precision, "none") if prof.engine == "embedded" else "none"


def _planned_checkpoint(src: Source, profile: str | None, reporter: Reporter) -> Source:
    """A catalog model whose plan here loads another checkpoint (a 4-bit one for vLLM/SGLang,
    dsr1/data/checkpoints.toml): pull that one, under the name serve looks for, instead of weights
    the plan would not load."""
    from dsr1 import plan
    from dsr1.errors import Dsr1Error

    try:
        p = plan.make_plan(src.default_name, profile, plan.Overrides(engine_port=1))
    except Dsr1Error:
        return src
    if not p.checkpoint or p.checkpoint == src.repo_id or p.engine == "embedded":
        return src
    reporter.stage(f"the plan for {src.default_name} ({p.engine}, {p.gguf_quant or p.precision}) loads {p.checkpoint}: "
                   f"pulling it")
    if p.checkpoint_format == "gguf":  # OWNER/NAME:QUANT
        return replace(classify(p.checkpoint), default_name=store.sanitize(f"{src.default_name}-{p.gguf_quant}"))
    return Source("hub", p.checkpoint, repo_id=p.checkpoint,
                  default_name=f"{src.default_name}-{p.precision}-{p.checkpoint_format}")


def pull(source: str, *, name: str | None = None, revision: str | None = None, endpoint: str | None = None,
         quant: str | None = None, profile: str | None = None, local_dir: Path | None = None,
         allow_pickle: bool = False, reporter: Reporter | None = None, workers: int = DEFAULT_WORKERS,
         base: str | None = None, merge_lora: bool = False) -> PullResult:
    """Store a model (or, for a LoRA adapter, the adapter checked against `base`; with `merge_lora`
    the base with the adapter merged in, as a model of its own)."""
    reporter = reporter or Reporter()
    if not 1 <= workers <= MAX_WORKERS:
        raise UsageError(f"--workers {workers} is out of range", hint=f"use 1 to {MAX_WORKERS} (default {DEFAULT_WORKERS})")
    src = classify(source)
    if revision is not None and src.kind in ("gguf", "dir"):
        raise UsageError("--revision applies to hub downloads only", hint="drop --revision for local files")
    if name is not None:
        store.validate_name(name)  # fail before any work
    if (base or merge_lora) and src.kind in ("dir", "gguf") and not src.adapter:
        raise UsageError("--base and --merge-lora are for LoRA adapters", hint=f"{source} is a model; drop them")
    if src.adapter and not merge_lora:
        if quant not in (None, "none"):
            raise UsageError("--quant applies to models, not to a LoRA adapter", hint="add --merge-lora to quantize "
                                                                                     "the merged model")
        quant = "none"
    if src.kind == "catalog" and quant is None and name is None:
        src = _planned_checkpoint(src, profile, reporter)
    if src.gguf and quant not in (None, "none"):
        raise UsageError(f"--quant {quant} quantizes safetensors models; {source} is a GGUF, already quantized",
                         hint="drop --quant (llama-server serves the GGUF as it is)")
    if (src.gguf or src.kind == "gguf") and quant is None:
        quant = "none"  # a GGUF is kept as it came; only an explicit --quant turns it into a bitsandbytes model
    method, method_source = resolve_quant(quant, profile, src.default_name if src.kind == "catalog" else None)
    stem = src.default_name
    if src.adapter and merge_lora:
        stem = f"{store.sanitize(Path(base).name if base else 'merged')}-{src.default_name}"
    name = store.validate_name(name or (stem + ("" if method == "none" else f"-{method}")))
    entry = store.entry_dir(name)
    store.clean_stale()
    entry.mkdir(parents=True, exist_ok=True)
    result = PullResult(name=name, model_dir="", source=source, source_kind=src.kind, resolved_revision=None,
                        quantization=method, quantization_source=method_source, total_bytes=0)
    manifest = store.Manifest(name=name, source=src.ref, source_kind="hub" if src.repo_id else src.kind,
                              model_dir="", files=[], quantization=method,
                              source_path=str(src.path) if src.path else None)
    work = entry / f".tmp-{os.getpid()}"
    try:
        if src.repo_id:
            model_dir = _from_hub(src, revision, endpoint, local_dir, allow_pickle, method, reporter, result, manifest,
                                  workers)
        elif src.kind == "gguf" and method == "none":  # kept as it came; llama-server serves it as is
            model_dir = _keep_gguf(src, entry, reporter, manifest)
        elif src.kind == "gguf":  # a bitsandbytes model was asked for: import, then quantize below
            model_dir = _from_gguf(src, work, method, reporter, manifest)
        else:
            model_dir = src.path
            manifest.files = None  # hashed below
        if lora.is_adapter(Path(model_dir)) and not (Path(model_dir) / "config.json").is_file():
            model_dir = _adapter(Path(model_dir), base, merge_lora, work, entry, reporter, manifest)
            if manifest.kind == "lora":  # a profile's precision is for models: an adapter is stored as is
                method = manifest.quantization = result.quantization = "none"
        elif base or merge_lora:
            raise UsageError("--base and --merge-lora are for LoRA adapters", hint=f"{source} is a model; drop them")
        if method != "none":
            model_dir = _quantize(model_dir, work, entry, method, reporter, result, manifest)
        if manifest.is_gguf and not _llama_server_here() and _can_embed(manifest, reporter):
            # What serve will run here is the embedded engine: its copy is part of this pull (a GGUF it
            # cannot import faithfully is refused now, with nothing stored, not at serve time).
            reporter.stage("llama-server is not installed (`dsr1 engine install llamacpp` serves the GGUF as it is): "
                           "the embedded engine will serve it")
            from dsr1 import gguf_store

            with _silenced(reporter):
                gguf_store.record_embedded(manifest, *gguf_store.make_embedded(manifest.gguf_path, entry, reporter))
        if not manifest.files:
            reporter.stage("hashing files for the manifest")
            manifest.files = store.record_files(model_dir)
        manifest.model_dir = str(model_dir)
        reporter.stage("writing manifest")
        result.manifest = str(store.write_manifest(manifest))  # the commit point
        from dsr1.gguf_store import GGUF_SUBDIR

        for sub in (store.MODEL_SUBDIR, GGUF_SUBDIR):
            old = entry / sub
            if old.exists() and str(old) not in (str(model_dir), manifest.embedded_dir):  # an earlier pull's
                shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result.model_dir = str(model_dir)
    result.embedded_dir = manifest.embedded_dir
    result.format, result.gguf_quant = manifest.format, manifest.gguf_quant
    result.total_bytes = manifest.total_size
    result.checks = manifest.checks
    result.kind, result.lora_base = manifest.kind, manifest.lora_base if manifest.kind == "lora" else None
    return result


def _from_hub(src, revision, endpoint, local_dir, allow_pickle, method, reporter, result, manifest, workers) -> Path:
    from dsr1 import download

    endpoint = (endpoint or settings.hf_endpoint()).rstrip("/")
    if not endpoint.startswith(("http://", "https://")):
        raise UsageError(f"--endpoint {endpoint!r} is not a URL", hint="pass e.g. --endpoint https://hf-mirror.com")
    token = settings.hf_token()
    reporter.stage(f"resolving {src.repo_id}@{revision or 'main'} at {endpoint}")
    plan = download.plan(src.repo_id, endpoint=endpoint, token=token, revision=revision, allow_pickle=allow_pickle,
                         gguf=src.gguf)
    weights = sum(f.size for f in plan.files if f.path.endswith((".safetensors", ".bin")))
    extra = int(weights * OUTPUT_RATIO[method]) if not src.gguf else 0
    dl = download.download(plan, token=token, cache_dir=None if local_dir else settings.hf_hub_cache(),
                           local_dir=local_dir.resolve() if local_dir else None, reporter=reporter,
                           extra_space=extra, extra_label=f"for the {method} output" if extra else "", workers=workers)
    result.resolved_revision = plan.sha
    result.downloaded_bytes, result.reused_bytes = dl.fetched, dl.reused
    result.resumed_bytes, result.refetched_corrupt, result.cleaned = dl.resumed, dl.refetched_bad, dl.cleaned
    manifest.repo_id, manifest.endpoint = plan.repo_id, endpoint
    manifest.revision, manifest.resolved_revision = plan.revision, plan.sha
    # Hashes straight from the hub's metadata, each checked during download.
    manifest.files = [store.FileRecord(path=f.path, size=f.size, sha256=f.sha256, git_oid=None if f.sha256 else f.git_oid)
                      for f in plan.files]
    if src.gguf:  # every shard is here and verified against the hub's hashes; now whole as a set too
        from dsr1 import gguf_files

        gset = gguf_files.read_set(Path(dl.model_dir) / plan.files[0].path)
        manifest.format, manifest.gguf_file, manifest.gguf_quant = "gguf", plan.files[0].path, gset.quant
        manifest.model_dir = str(dl.model_dir)
        manifest.checks = {"shards": len(gset.paths), "tensors": len(gset.tensors), "architecture": gset.architecture}
    return dl.model_dir


def _adapter(adapter_dir: Path, base: str | None, merge: bool, work: Path, entry: Path, reporter, manifest) -> Path:
    """A LoRA adapter: checked against its base model, then stored as an adapter, or merged into the
    base and stored as a model (`--merge-lora`)."""
    adapter = lora.read(adapter_dir)
    base = base or adapter.base_model
    if not base:
        raise UsageError(f"{adapter_dir} is a LoRA adapter: name its base model", hint="add --base MODEL "
                                                                                     "(a stored name or directory)")
    try:
        base_dir = store.resolve_model_dir(base)
    except NotFoundError as e:
        raise NotFoundError(f"the adapter's base model {base!r} is not here ({e})",
                            hint="pull the base first, or pass --base with a stored name or directory") from None
    reporter.stage(f"checking the adapter against {base_dir}")
    lora.check(adapter, base_dir)
    manifest.lora_base = str(base)
    if not merge:
        manifest.kind = "lora"
        return adapter_dir
    reporter.stage(f"merging the adapter into {base_dir} (peft)")
    with _silenced(reporter):
        lora.merge(base_dir, adapter_dir, work / "merged")
    manifest.files = None
    manifest.checks = {"merged_adapter": str(adapter_dir), "merged_into": str(base_dir)}
    return _install(work / "merged", entry)


def _silenced(reporter: Reporter):
    """--quiet/--json: hide transformers' progress bars (some are plain tqdm, which no setting
    reaches) by sending library stderr output nowhere; errors still surface as exceptions."""
    import contextlib
    import io

    if not reporter.silence_libraries:
        return contextlib.nullcontext()
    from transformers.utils import logging as tlogging

    tlogging.disable_progress_bar()
    tlogging.set_verbosity_error()
    return contextlib.redirect_stderr(io.StringIO())


def _llama_server_here() -> bool:
    from dsr1.engines import envs

    try:
        return envs.find("llamacpp") is not None
    except Exception:  # an unreadable engine record: as if not installed (the embedded copy is made)
        return False


def _can_embed(manifest, reporter) -> bool:
    """Whether the embedded engine can take this GGUF at all (transformers reads its architecture, and
    its bf16 copy fits the disk); if not the GGUF is stored alone and pull says what serves it."""
    from dsr1 import gguf_files, gguf_import, gguf_store
    from dsr1.download import free_bytes

    gset = gguf_files.read_set(manifest.gguf_path)
    why = None
    if gset.architecture not in gguf_import.supported_architectures():
        why = f"the embedded engine cannot load {gset.architecture} GGUFs"
    elif gguf_store.bf16_bytes(gset.tensors) * 1.1 > free_bytes(store.entry_dir(manifest.name)):
        why = f"its bf16 copy ({gguf_store.bf16_bytes(gset.tensors) / 1e9:.0f} GB) does not fit the disk"
    if why:
        reporter.stage(f"stored as GGUF only: {why}; serve it with llama-server (`dsr1 engine install llamacpp`)")
    return why is None


def _keep_gguf(src, entry: Path, reporter, manifest) -> Path:
    """A .gguf file, or a split set from its first shard: checked whole, copied into the store as it is."""
    from dsr1 import gguf_files, gguf_store

    gset = gguf_files.read_set(src.path)
    _servable(gset, src.path)
    shards = f"{len(gset.paths)} shards" if len(gset.paths) > 1 else "one file"
    reporter.stage(f"storing {src.path.name} ({gset.architecture}, {gset.quant}, {gset.size / 1e9:.2f} GB, {shards}) "
                   f"as GGUF")
    folder, records = gguf_store.store_set(gset, entry, reporter, before_install=_withdraw_manifest)
    st = gset.first.stat()
    manifest.format, manifest.gguf_file, manifest.gguf_quant = "gguf", gset.first.name, gset.quant
    manifest.files, manifest.model_dir = records, str(folder)
    # Size and mtime identify the source later; shards and tensors what was checked.
    manifest.checks = {"source_size": st.st_size, "source_mtime_ns": st.st_mtime_ns, "shards": len(gset.paths),
                       "tensors": len(gset.tensors), "architecture": gset.architecture}
    return folder


def _servable(gset, path: Path) -> None:
    """A GGUF neither engine can load is refused before it is copied: llama.cpp's architectures are the
    ones its gguf-py names (gguf.MODEL_ARCH_NAMES), the embedded engine's those transformers imports."""
    import gguf

    from dsr1 import gguf_import

    if gset.architecture in gguf.MODEL_ARCH_NAMES.values():
        return
    supported = gguf_import.supported_architectures()
    if gset.architecture not in supported:
        raise UsageError(f"{path} holds a '{gset.architecture}' model, which neither llama.cpp nor transformers loads",
                         hint=f"GGUF architectures the embedded engine imports: {', '.join(supported)}; llama.cpp "
                              f"runs {len(gguf.MODEL_ARCH_NAMES)} (llama, qwen2, deepseek2, ...)")


def _withdraw_manifest(entry: Path) -> None:
    from dsr1.fsutil import fsync_dir

    old_manifest = entry / store.MANIFEST
    if old_manifest.exists():
        old_manifest.unlink()
        fsync_dir(entry)


def _from_gguf(src, work, method, reporter, manifest) -> Path:
    from dsr1 import gguf_import

    from dsr1.download import free_bytes

    info = gguf_import.inspect(src.path)
    # bf16 output is roughly 3.5x a 4-bit GGUF; ask for 4x to be safe.
    need = 4 * info.size
    free = free_bytes(work.parent)
    if need > free:
        raise DiskSpaceError(f"importing {src.path} needs about {need / 1e9:.2f} GB at {work.parent}, "
                             f"{free / 1e9:.2f} GB free", hint="free space there or set DSR1_HOME to a bigger disk")
    reporter.stage(f"importing GGUF ({info.architecture}) from {src.path}")
    with _silenced(reporter):
        imported = gguf_import.import_gguf(src.path, work / "imported")
    manifest.dtype = "bfloat16"
    st = Path(src.path).stat()
    # Size and mtime identify the source later (`dsr1 serve NAME --engine llamacpp` serves it as GGUF).
    manifest.checks = {"tokenizer_tokens_checked": imported.tokenizer_checked,
                       "tokenizer_repairs": imported.tokenizer_repairs,
                       "source_size": st.st_size, "source_mtime_ns": st.st_mtime_ns}
    return work / "imported"


def _quantize(model_dir, work, entry, method, reporter, result, manifest) -> Path:
    from dsr1 import quantize

    reporter.stage(f"quantizing to {method} with bitsandbytes, then checking the reloaded model")
    with _silenced(reporter):
        q = quantize.quantize(Path(model_dir), work / "quantized", method)
    final = _install(work / "quantized", entry)
    manifest.files = None
    manifest.dtype = "bfloat16"
    manifest.checks = {"reload_max_logit_diff": q.max_logit_diff, "nll_before_save": q.nll_before_save,
                       "nll_after_reload": q.nll_after_reload, "memory_bytes": q.memory_bytes,
                       "peak_rss_bytes": q.peak_rss_bytes, "quantized_from": str(model_dir)}
    return final


def _install(built: Path, entry: Path) -> Path:
    """Move a finished model directory into the entry's model/. An older manifest is withdrawn
    first, so no crash can leave a manifest that describes other files than model/ holds."""
    from dsr1.fsutil import replace_dir

    _withdraw_manifest(entry)
    final = entry / store.MODEL_SUBDIR
    replace_dir(built, final)
    return final
