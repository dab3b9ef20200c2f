"""dsr1's local model store: DSR1_HOME/models/<name>/manifest.json (+ model/).

A stored model is its manifest. The manifest is written last, atomically, so a
crash at any earlier point leaves a directory `dsr1 list` does not show as a
model. The weights live either in the store's own `model/` directory (GGUF
imports, quantized models) or where they were downloaded (a Hugging Face cache
snapshot or a `--local-dir`), so other tools reuse the same files.

Public API other commands rely on (keep stable):
    resolve_model_dir(name_or_path) -> Path   a stored name or a model directory
    load(name) -> Manifest, find(name_or_repo_id), list_models(), remove(name), verify(name)
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from dsr1 import __version__, settings
from dsr1.errors import ConfigError, IntegrityError, NotFoundError, UsageError
from dsr1.fsutil import atomic_write_json, git_blob_sha1, sha256_file

MANIFEST = "manifest.json"
MODEL_SUBDIR = "model"
MANIFEST_VERSION = 1
# Letters, digits, '.', '_', '-'; starts with a letter or digit; no path separators,
# so `models/<name>` can never point outside the store.
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,99}$")


@dataclass
class FileRecord:
    path: str  # relative to model_dir
    size: int
    sha256: str | None = None  # None only for small git-tracked files (checked by git_oid)
    git_oid: str | None = None


@dataclass
class Manifest:
    name: str
    source: str  # what the user passed: catalog name, repo id, .gguf path, directory
    source_kind: str  # hub | gguf | dir
    model_dir: str  # absolute path holding config.json and the weights
    files: list[FileRecord]
    repo_id: str | None = None
    endpoint: str | None = None
    revision: str | None = None  # what was asked (branch, tag, sha)
    resolved_revision: str | None = None  # the commit sha it resolved to
    quantization: str = "none"  # none | int8 | nf4
    dtype: str | None = None
    checks: dict = field(default_factory=dict)  # e.g. reload-logit check figures
    dsr1_version: str = __version__
    created: str = ""
    manifest_version: int = MANIFEST_VERSION
    source_path: str | None = None  # gguf/dir: `source` as an absolute path (it may have been relative)
    kind: str = "model"  # model | lora (a LoRA adapter; model_dir holds adapter_config.json)
    lora_base: str | None = None  # lora: the base model it was checked against (stored name or path)
    # "gguf": model_dir holds the GGUF file(s) as they came, every shard; `gguf_file` is the one an
    # engine opens (the first shard), `gguf_quant` llama.cpp's name for its quantization. The embedded
    # engine needs a dequantized safetensors copy: made only when it serves the model, kept in
    # `embedded_dir` with its own file records.
    format: str = "safetensors"
    gguf_file: str | None = None
    gguf_quant: str | None = None
    embedded_dir: str | None = None
    embedded_files: list[FileRecord] | None = None

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def is_gguf(self) -> bool:
        return self.format == "gguf"

    @property
    def gguf_path(self) -> Path | None:
        return Path(self.model_dir) / self.gguf_file if self.is_gguf and self.gguf_file else None

    @property
    def embedded_ready(self) -> bool:
        """A GGUF entry's dequantized copy for the embedded engine is there."""
        return bool(self.embedded_dir) and (Path(self.embedded_dir) / "config.json").is_file()

    @property
    def label(self) -> str:
        """What identifies the model to a person: the repo id, the GGUF file's name, the directory's name.
        Short enough to show whole in a table; `source_path` has the full path."""
        if self.repo_id:
            return self.repo_id
        return Path(self.source_path or self.source).name or self.source


def store_root() -> Path:
    return settings.home() / "models"


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
        raise UsageError(
            f"invalid model name {name!r}: use 1-100 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
            hint="pass a different --name",
        )
    return name


def entry_dir(name: str) -> Path:
    path = store_root() / validate_name(name)
    # Belt and braces: the regex already rules out separators and '..'.
    if path.resolve().parent != store_root().resolve():
        raise UsageError(f"model name {name!r} escapes the store", hint="pass a different --name")
    return path


def sanitize(text: str) -> str:
    """Turn a repo id or file stem into a valid store name."""
    s = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")
    s = re.sub(r"-{2,}", "-", s)
    return (s or "model")[:100]


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def write_manifest(manifest: Manifest) -> Path:
    """The commit point of every pull: after this the model exists."""
    if not manifest.created:
        manifest.created = now_iso()
    path = entry_dir(manifest.name) / MANIFEST
    atomic_write_json(path, asdict(manifest))
    return path


def _from_json(data: dict, where: Path) -> Manifest:
    try:
        files = [FileRecord(**f) for f in data.pop("files")]
        embedded = data.pop("embedded_files", None)
        return Manifest(files=files, embedded_files=[FileRecord(**f) for f in embedded] if embedded else None, **data)
    except (TypeError, KeyError) as exc:
        raise ConfigError(f"{where} is not a valid dsr1 manifest ({exc})",
                          hint=f"remove it with `dsr1 rm {where.parent.name}` and pull again") from None


def load(name: str) -> Manifest:
    path = entry_dir(name) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise NotFoundError(f"no stored model named '{name}'", hint=_missing_hint(name)) from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc})", hint=f"`dsr1 rm {name}` and pull again") from None
    return _from_json(data, path)


def find(ref: str) -> Manifest | None:
    """The stored model named `ref`, else the one pulled from hub repo `ref` (vLLM and others serve a
    model under its repo id); None when neither. Never raises for a name that is not a valid store name."""
    if _NAME_RE.match(ref) and ".." not in ref and (store_root() / ref / MANIFEST).is_file():
        try:
            return load(ref)
        except ConfigError:
            return None
    if "/" in ref and ":" in ref:  # OWNER/NAME:QUANT, one GGUF set of a repo: pulled under that source
        return next((m for m in list_models() if m.is_gguf and m.source.lower() == ref.lower()), None)
    if "/" in ref:
        return next((m for m in list_models() if m.repo_id and m.repo_id.lower() == ref.lower()), None)
    return None


def _missing_hint(name: str) -> str:
    import difflib

    names = [m.name for m in list_models()]
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    if close:
        return f"did you mean {', '.join(close)}? (`dsr1 list` shows stored models)"
    return f"pull it first: `dsr1 pull {name}` (`dsr1 list` shows stored models)"


def list_models() -> list[Manifest]:
    root = store_root()
    if not root.is_dir():
        return []
    out = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") or not (entry / MANIFEST).is_file():
            continue  # no manifest: an interrupted pull, not a model
        try:
            out.append(load(entry.name))
        except (ConfigError, UsageError):
            continue
    return out


def remove(name: str) -> Manifest | None:
    """Remove a stored model. The entry is renamed away first, so a crash mid-delete
    never leaves something that looks like a model. Files in the Hugging Face cache
    are shared with other tools and are left alone."""
    path = entry_dir(name)
    if not path.exists():
        raise NotFoundError(f"no stored model named '{name}'", hint=_missing_hint(name))
    manifest = None
    try:
        manifest = load(name)
    except (ConfigError, NotFoundError):
        pass
    trash = path.with_name(f".trash-{name}-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)
    return manifest


def _owner_alive(name: str) -> bool:
    """Temp names carry the writer's pid (`.tmp-<pid>`, `.<file>.<pid>.tmp`): is it still running?"""
    import re as _re

    m = _re.search(r"(?:-|\.)(\d+)(?:\.tmp|\.lnk)?$", name)
    if not m:
        return False
    try:
        os.kill(int(m.group(1)), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale() -> list[Path]:
    """Remove leftovers of interrupted pulls (temp dirs and files, trash) whose writer is gone.
    Returns what was removed."""
    root = store_root()
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    candidates = [e for e in root.iterdir() if e.name.startswith((".trash-", ".tmp-"))]
    for entry in root.iterdir():
        if entry.is_dir() and not entry.name.startswith("."):
            candidates += [c for c in entry.iterdir() if c.name.startswith(".") and
                           (c.name.startswith((".tmp-", f".{MODEL_SUBDIR}.old-")) or c.name.endswith((".tmp", ".lnk")))]
    for path in candidates:
        if _owner_alive(path.name):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """The directory to load a model from: a stored model's name, or a model directory path.

    Stable API used by `dsr1 serve`. Raises NotFoundError naming `dsr1 pull` when neither.
    """
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise NotFoundError(f"{p} is not a model directory (no config.json)",
                                hint="pass a directory with config.json and weights, or a name from `dsr1 list`")
        return p.resolve()
    text = str(name_or_path)
    if "/" in text or text.startswith("."):
        if _NAME_RE.match(sanitize(text)) and (store_root() / sanitize(text) / MANIFEST).is_file():
            return resolve_model_dir(sanitize(text))
        raise NotFoundError(f"no model directory at {text}", hint=f"pull it first: `dsr1 pull {text}`")
    manifest = load(text)
    if manifest.is_gguf:
        if manifest.embedded_ready:
            return Path(manifest.embedded_dir)
        raise NotFoundError(f"stored model '{text}' is a GGUF ({manifest.gguf_quant}); the embedded engine's "
                            f"safetensors copy of it is not made yet",
                            hint=f"`dsr1 serve {text} --engine embedded` makes it; llama-server serves the GGUF as "
                                 f"it is (`dsr1 engine install llamacpp`)")
    model_dir = Path(manifest.model_dir)
    if not (model_dir / "config.json").is_file():
        raise IntegrityError(f"stored model '{text}' points at {model_dir}, which is missing or incomplete",
                             hint=f"pull it again: `dsr1 pull {manifest.source} --name {text}`")
    return model_dir


def record_files(model_dir: Path, rel_paths: list[str] | None = None,
                 progress: Callable[[int], None] | None = None) -> list[FileRecord]:
    """Hash files of a model directory for its manifest (all regular files when rel_paths is None)."""
    if rel_paths is None:
        rel_paths = sorted(str(p.relative_to(model_dir)) for p in model_dir.rglob("*")
                           if p.is_file() and not any(part.startswith(".") for part in p.relative_to(model_dir).parts))
    return [FileRecord(path=r, size=(model_dir / r).stat().st_size, sha256=sha256_file(model_dir / r, progress))
            for r in rel_paths]


@dataclass
class VerifyResult:
    name: str
    model_dir: str
    checked: int
    bytes: int
    ok: bool
    problems: list[dict]


def verify(name: str, progress: Callable[[int], None] | None = None) -> VerifyResult:
    """Re-hash every file of a stored model against its manifest.

    Returns the result; the caller decides whether a failure is an error (the CLI
    raises IntegrityError so the exit code says so)."""
    m = load(name)
    root = Path(m.model_dir)
    problems = []
    total = 0
    checks = [(root, rec) for rec in m.files]
    if m.embedded_dir and m.embedded_files:  # a GGUF's dequantized copy is checked too
        checks += [(Path(m.embedded_dir), rec) for rec in m.embedded_files]
    for base, rec in checks:
        path = base / rec.path
        if not path.is_file():
            problems.append({"path": rec.path, "problem": "missing"})
            continue
        size = path.stat().st_size
        if size != rec.size:
            problems.append({"path": rec.path, "problem": f"size {size} != {rec.size}"})
            continue
        if rec.sha256:
            got = sha256_file(path, progress)
            if got != rec.sha256:
                problems.append({"path": rec.path, "problem": f"sha256 {got[:12]}... != {rec.sha256[:12]}..."})
        elif rec.git_oid and git_blob_sha1(path) != rec.git_oid:
            problems.append({"path": rec.path, "problem": "git blob id mismatch"})
        total += size
    return VerifyResult(name=m.name, model_dir=str(root), checked=len(checks), bytes=total,
                        ok=not problems, problems=problems)
