"""Download a hub repo's model files, resuming across process kills, verifying each file.

Why not `snapshot_download`: huggingface_hub resumes a file only within one process.
Each attempt writes a uniquely named `<etag>.<uuid>.incomplete` and deletes it on a
clean failure; after kill -9 the next run starts that file from byte 0 and the old
partial file stays behind (see huggingface_hub PR #4228 for why the name is unique).
For a 688 GB model that is the difference between losing seconds and losing hours.

So dsr1 uses huggingface_hub for everything but the byte transfer: the repo API
(`model_info`, `list_repo_tree`), URL building (`hf_hub_url`), the metadata HEAD
that follows the 302 to the CDN (`get_hf_file_metadata`), auth headers and error
classes (`hf_raise_for_status`). It streams each file itself (dsr1.transfer) into a stable partial
file next to the blob (`<blob>.dsr1.incomplete`), held under the same lock file the
hub client uses, and continues it with `Range: bytes=N-` on the next run. Finished
files land in the standard cache layout (blobs/, snapshots/<sha>/, refs/), so
transformers and other tools reuse them.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from dsr1.errors import (AuthError, DiskSpaceError, Dsr1Error, IntegrityError, NetworkError, NotFoundError,
                         UsageError)
from dsr1 import transfer
from dsr1.fsutil import atomic_symlink, atomic_write_bytes, free_bytes, fsync_dir, git_blob_sha1, sha256_file

# What a model needs (top-level files only: sub-folders such as onnx/ or original/ are other formats).
NEEDED = ("*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
          "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
          "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
          "adapter_config.json")  # a LoRA adapter repo: adapter_config.json + adapter_model.safetensors
PICKLE = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt")
PICKLE_WEIGHTS = ("pytorch_model*.bin", "pytorch_model.bin.index.json")
SUFFIX = ".dsr1.incomplete"
DEFAULT_WORKERS = 4
MAX_WORKERS = 32  # connections to one hub or mirror; more only gets a client throttled
STALE_PARTIAL_S = 7 * 24 * 3600


@dataclass
class RemoteFile:
    path: str
    size: int
    sha256: str | None  # LFS files: the hub's sha256; None for small git-tracked files
    git_oid: str

    @property
    def blob_name(self) -> str:
        # The hub cache names blobs by ETag: sha256 for LFS files, git blob id otherwise.
        return self.sha256 or self.git_oid


@dataclass
class RepoPlan:
    repo_id: str
    endpoint: str
    revision: str
    sha: str
    files: list[RemoteFile]
    skipped: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(f.size for f in self.files)


class Reporter:
    """Progress callbacks; the CLI renders them, library callers may ignore them.
    `silence_libraries`: also hide transformers' own progress bars and warnings (--quiet/--json)."""

    silence_libraries = False

    def stage(self, text: str) -> None: ...
    def start(self, total: int, done: int) -> None: ...
    def file(self, path: str) -> None: ...
    def advance(self, n: int) -> None: ...


# --------------------------------------------------------------------------- errors
@contextlib.contextmanager
def hub_errors(repo_id: str, endpoint: str, revision: str | None, token: str | None) -> Iterator[None]:
    """Turn huggingface_hub / httpx2 exceptions into dsr1's error family, each naming its fix."""
    import httpx2
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, RemoteEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    try:
        yield
    except Dsr1Error:
        raise
    except GatedRepoError:  # before RepositoryNotFoundError: it is a subclass
        page = f"{endpoint}/{repo_id}"
        if token:
            raise AuthError(f"{repo_id} is gated and your HF_TOKEN was refused for it",
                            hint=f"accept the licence at {page} with the account that owns the token, "
                                 "or set HF_TOKEN to a token of an account that has access") from None
        raise AuthError(f"{repo_id} is gated: downloading it needs a Hugging Face token",
                        hint=f"accept the licence at {page}, create a read token at "
                             "https://huggingface.co/settings/tokens, then `export HF_TOKEN=hf_...`") from None
    except RevisionNotFoundError:
        raise NotFoundError(f"revision '{revision}' not found in {repo_id}",
                            hint="pass an existing branch, tag or commit sha with --revision (default: main)") from None
    except RepositoryNotFoundError:
        from dsr1 import catalog

        close = catalog.suggestions(repo_id.split("/")[-1])
        hint = ("check the repo id" + (f"; catalog models with close names: {', '.join(close)}" if close else "")
                + ("; if it is private, set HF_TOKEN" if not token else ""))
        raise NotFoundError(f"repo '{repo_id}' not found at {endpoint}", hint=hint) from None
    except RemoteEntryNotFoundError as exc:
        raise NotFoundError(f"a file of {repo_id} disappeared from {endpoint}: {exc}",
                            hint="the revision changed while pulling; run the same command again") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            raise AuthError(f"{endpoint} refused access to {repo_id} (HTTP {status})",
                            hint="check HF_TOKEN (an expired or wrong token is refused)" if token
                            else "set HF_TOKEN=hf_... if the repo is private or gated") from None
        raise NetworkError(f"{endpoint} answered HTTP {status} for {repo_id}",
                           hint="retry later; to use another mirror set HF_ENDPOINT or pass --endpoint URL") from None
    except (httpx2.TransportError, ConnectionError, TimeoutError) as exc:
        raise NetworkError(f"cannot reach the hub endpoint {endpoint} ({type(exc).__name__}: {exc})",
                           hint="check the network connection; to use a mirror set HF_ENDPOINT=URL "
                                "or pass --endpoint URL (e.g. https://hf-mirror.com)") from None


# --------------------------------------------------------------------------- plan
def _select(paths: list[str], allow_pickle: bool) -> tuple[list[str], list[str]]:
    top = [p for p in paths if "/" not in p]
    has_safetensors = any(fnmatch.fnmatch(p, "*.safetensors") for p in top)
    patterns = list(NEEDED)
    if not has_safetensors:
        pickles = [p for p in top if any(fnmatch.fnmatch(p, pat) for pat in PICKLE)]
        if pickles and not allow_pickle:
            raise UsageError(
                f"this repo ships only pickle weights ({', '.join(pickles[:3])}), which can run code when loaded",
                hint="pull a safetensors version of the model, or pass --allow-pickle if you trust this repo")
        patterns += PICKLE_WEIGHTS
    chosen = [p for p in top if any(fnmatch.fnmatch(p, pat) for pat in patterns)]
    return chosen, [p for p in paths if p not in chosen]


def _select_gguf(paths: list[str], quant: str, repo_id: str) -> tuple[list[str], list[str]]:
    """The one GGUF set of a repo that `quant` names (Unsloth's DeepSeek-R1-UD-IQ1_S/...-00001-of-00003.gguf,
    a single NAME.Q4_K_M.gguf ...): a folder of that name, or files whose name ends in it. Every shard
    the names promise must be listed."""
    from dsr1.gguf_files import SHARD_RE

    q = quant.lower()
    sets: dict[str, list[str]] = {}
    for p in paths:
        if not p.lower().endswith(".gguf") or "mmproj" in p.lower():
            continue
        folder, _, fname = p.rpartition("/")
        m = SHARD_RE.match(fname)
        stem = (m.group("stem") if m else fname[:-5]).lower()
        if q == folder.rsplit("/", 1)[-1].lower() or stem.endswith(("-" + q, "." + q, "_" + q)) or stem == q:
            sets.setdefault(f"{folder}/{stem}", []).append(p)
    if not sets:
        found = sorted({(p.rpartition("/")[0] or SHARD_RE.sub(r"\g<stem>", p.rpartition("/")[2]))
                        for p in paths if p.lower().endswith(".gguf")})
        raise NotFoundError(f"{repo_id} has no GGUF named {quant!r}",
                            hint=f"its GGUF files: {', '.join(found[:12]) or 'none'}" if found else
                                 f"{repo_id} holds no .gguf files")
    if len(sets) > 1:
        raise UsageError(f"{quant!r} names {len(sets)} GGUF sets in {repo_id}: {', '.join(sorted(sets))}",
                         hint="name the quantization exactly as its folder or file is named")
    (chosen,) = sets.values()
    chosen.sort()
    m = SHARD_RE.match(chosen[0].rpartition("/")[2])
    if m:
        count = int(m.group("count"))
        want = [chosen[0].rpartition("/")[0] + ("/" if "/" in chosen[0] else "") +
                f"{m.group('stem')}-{i:05d}-of-{m.group('count')}.gguf" for i in range(1, count + 1)]
        missing = [w for w in want if w not in chosen]
        if missing:
            raise IntegrityError(f"{repo_id}'s {quant} set lists {len(chosen)} of its {count} shards; missing: "
                                 f"{', '.join(missing[:4])}", hint="the upload is incomplete: try another revision "
                                                                    "or quantization")
        chosen = want
    return chosen, [p for p in paths if p not in chosen]


def plan(repo_id: str, *, endpoint: str, token: str | None, revision: str | None = None,
         allow_pickle: bool = False, gguf: str | None = None) -> RepoPlan:
    """Resolve the revision to a commit sha and list the files a model needs, with their hashes.
    With `gguf` (a quantization name): the files of that GGUF set instead, every shard."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    api = HfApi(endpoint=endpoint, token=token or False)
    with hub_errors(repo_id, endpoint, revision, token):
        info = api.model_info(repo_id, revision=revision or "main")  # olah only serves /revision/REV
        sha = info.sha
        entries = [e for e in api.list_repo_tree(repo_id, revision=sha, recursive=True) if isinstance(e, RepoFile)]
    by_path = {e.path: e for e in entries}
    if gguf is not None:
        chosen, skipped = _select_gguf(sorted(by_path), gguf, repo_id)
    else:
        chosen, skipped = _select(sorted(by_path), allow_pickle)
    adapter = "adapter_config.json" in chosen and "adapter_model.safetensors" in chosen
    if gguf is None and not adapter and (not any(p.endswith((".safetensors", ".bin")) for p in chosen) or "config.json" not in chosen):
        raise NotFoundError(f"{repo_id}@{sha[:12]} has no config.json and model weights (nor a LoRA adapter) at its "
                            f"top level",
                            hint="pass a transformers model repo, or a GGUF repo with its quantization: "
                                 "`dsr1 pull OWNER/NAME-GGUF:Q4_K_M`")
    files = []
    for p in chosen:
        e = by_path[p]
        files.append(RemoteFile(path=p, size=e.lfs.size if e.lfs else e.size,
                                sha256=e.lfs.sha256 if e.lfs else None, git_oid=e.blob_id))
    return RepoPlan(repo_id=repo_id, endpoint=endpoint, revision=revision or "main", sha=sha, files=files,
                    skipped=skipped)


# --------------------------------------------------------------------------- layout
@dataclass
class Layout:
    """Where each file goes: the Hugging Face cache (default) or a --local-dir."""

    plan: RepoPlan
    cache_dir: Path | None = None
    local_dir: Path | None = None

    @property
    def storage(self) -> Path:
        from huggingface_hub.file_download import repo_folder_name

        return self.cache_dir / repo_folder_name(repo_id=self.plan.repo_id, repo_type="model")

    @property
    def model_dir(self) -> Path:
        if self.local_dir is not None:
            return self.local_dir
        return self.storage / "snapshots" / self.plan.sha

    def final(self, f: RemoteFile) -> Path:
        if self.local_dir is not None:
            return self.local_dir / f.path
        return self.storage / "blobs" / f.blob_name

    def partial(self, f: RemoteFile) -> Path:
        if self.local_dir is not None:
            return self.local_dir / ".cache" / "dsr1" / (f.path + SUFFIX)
        return self.storage / "blobs" / (f.blob_name + SUFFIX)

    def lock(self, f: RemoteFile) -> Path:
        if self.local_dir is not None:
            return self.local_dir / ".cache" / "dsr1" / (f.path + ".lock")
        # The hub client's own lock path, so dsr1 and huggingface_hub never write one blob at once.
        return self.cache_dir / ".locks" / self.storage.name / (f.blob_name + ".lock")

    def hub_incompletes(self, f: RemoteFile) -> list[Path]:
        if self.local_dir is not None:
            return []
        return sorted(p for p in (self.storage / "blobs").glob(f"{f.blob_name}.*.incomplete")
                      if not p.name.endswith(SUFFIX))

    def link(self, f: RemoteFile) -> None:
        """Snapshot pointer -> blob, as huggingface_hub lays out its cache."""
        if self.local_dir is not None:
            return
        pointer = self.model_dir / f.path
        atomic_symlink(os.path.relpath(self.final(f), pointer.parent), pointer)

    def write_ref(self) -> None:
        p = self.plan
        if self.local_dir is None and p.revision != p.sha:
            atomic_write_bytes(self.storage / "refs" / p.revision, p.sha.encode())


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # same primitive as filelock's UnixFileLock
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _partial_bytes(layout: Layout, f: RemoteFile) -> int:
    sizes = [p.stat().st_size for p in [layout.partial(f), *layout.hub_incompletes(f)] if p.exists()]
    return min(max(sizes, default=0), f.size)


def _complete(layout: Layout, f: RemoteFile) -> bool:
    final = layout.final(f)
    return final.is_file() and final.stat().st_size == f.size


# --------------------------------------------------------------------------- preflight
def preflight(layout: Layout, extra: int = 0, extra_label: str = "") -> dict:
    """Stop before downloading when the disk cannot hold what is left to fetch (+ extra output)."""
    todo = [f for f in layout.plan.files if not _complete(layout, f)]
    need = sum(f.size - _partial_bytes(layout, f) for f in todo)
    target = layout.local_dir or layout.cache_dir
    free = free_bytes(target)
    margin = max(1 << 20, need // 100)  # filesystem overhead, metadata, the manifest
    if need + extra + margin > free:
        parts = f"{need / 1e9:.2f} GB left to download" + (f" + {extra / 1e9:.2f} GB {extra_label}" if extra else "")
        raise DiskSpaceError(
            f"not enough disk at {target}: need {(need + extra) / 1e9:.2f} GB ({parts}), {free / 1e9:.2f} GB free",
            hint=f"free {(need + extra + margin - free) / 1e9:.2f} GB there, or download elsewhere with "
                 "--local-dir DIR or HF_HOME=DIR")
    return {"to_download": need, "extra": extra, "free": free}


# --------------------------------------------------------------------------- fetch
def _verify_partial(path: Path, f: RemoteFile, digest: str | None) -> bool:
    if f.sha256 is not None:
        return digest == f.sha256
    return git_blob_sha1(path) == f.git_oid


def fetch_file(layout: Layout, f: RemoteFile, *, token: str | None, reporter: Reporter,
               timeout: float = 30.0, cancel: threading.Event | None = None) -> dict:
    """Make layout.final(f) hold f's verified bytes. Returns what it did (bytes fetched, reused)."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    p = layout.plan
    stats = {"path": f.path, "fetched": 0, "resumed_from": 0, "refetched_bad": 0}
    with _locked(layout.lock(f)):
        if _complete(layout, f):
            final = layout.final(f)
            if _verify_partial(final, f, sha256_file(final) if f.sha256 else None):
                layout.link(f)
                return stats
            stats["refetched_bad"] += 1  # a stored blob went bad: fetch it again
            reporter.advance(-f.size)
            final.unlink()
        partial = layout.partial(f)
        partial.parent.mkdir(parents=True, exist_ok=True)
        # The hub client's own partial files (unique names, abandoned after a kill): adopt the
        # largest as our starting point, delete the rest. We hold the blob's lock, so none is live.
        for inc in layout.hub_incompletes(f):
            if inc.stat().st_size > (partial.stat().st_size if partial.exists() else 0):
                os.replace(inc, partial)
            else:
                inc.unlink(missing_ok=True)
        if partial.exists() and partial.stat().st_size > f.size:
            partial.unlink()
        for attempt in range(2):
            reporter.file(f.path)
            url = hf_hub_url(p.repo_id, f.path, revision=p.sha, endpoint=p.endpoint)
            with hub_errors(p.repo_id, p.endpoint, p.revision, token):
                meta = get_hf_file_metadata(url, token=token or False, endpoint=p.endpoint, retry_on_errors=True)
                location = meta.location
                sink = transfer.Sink(partial, f.sha256 is not None, reporter)
                stats["resumed_from"] = max(stats["resumed_from"], sink.pos) if attempt == 0 else stats["resumed_from"]
                begin = sink.pos
                try:
                    transfer.stream(location, transfer.auth_headers(location, p.endpoint, token), sink, f.size, timeout,
                                    cancel)
                finally:
                    stats["fetched"] += sink.pos - begin
                    sink.close()
            digest = sink.hasher.hexdigest() if sink.hasher is not None else None
            if _verify_partial(partial, f, digest):
                break
            # Corrupt bytes (a bad mirror, a flipped bit on disk): start this file over once.
            stats["refetched_bad"] += 1
            reporter.advance(-f.size)
            partial.unlink()
        else:
            raise IntegrityError(f"{f.path} from {p.endpoint} failed its sha256 check twice",
                                 hint="the mirror serves corrupt data: try another --endpoint or retry later")
        final = layout.final(f)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(partial, final)
        fsync_dir(final.parent)
        layout.link(f)
    return stats


def clean_stale(layout: Layout) -> list[str]:
    """Delete partial files nobody can resume: hub-client leftovers whose blob lock is free,
    and dsr1 partials untouched for STALE_PARTIAL_S. Returns the removed paths."""
    removed = []
    if layout.local_dir is not None:
        base = layout.local_dir / ".cache" / "dsr1"
        candidates = list(base.rglob("*" + SUFFIX)) if base.is_dir() else []
    else:
        blobs = layout.storage / "blobs"
        candidates = list(blobs.glob("*.incomplete")) if blobs.is_dir() else []
    now = time.time()
    for path in candidates:
        ours = path.name.endswith(SUFFIX)
        if ours and now - path.stat().st_mtime < STALE_PARTIAL_S:
            continue
        blob = path.name.split(".")[0]
        lock = (layout.cache_dir / ".locks" / layout.storage.name / (blob + ".lock")) if layout.local_dir is None \
            else path.with_name(path.name[: -len(SUFFIX)] + ".lock")
        lock.parent.mkdir(parents=True, exist_ok=True)
        with open(lock, "a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a download is writing it right now
            try:
                path.unlink(missing_ok=True)
                removed.append(str(path))
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
    return removed


def _fetch_all(layout: Layout, token: str | None, reporter: Reporter, workers: int) -> list[dict]:
    import concurrent.futures  # here: `dsr1 --help` imports this module (for Reporter)

    files = sorted(layout.plan.files, key=lambda f: -f.size)  # big files first: the tail ends sooner
    if workers <= 1 or len(files) <= 1:
        return [fetch_file(layout, f, token=token, reporter=reporter) for f in files]
    cancel = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(workers, len(files)),
                                               thread_name_prefix="dsr1-fetch") as pool:
        futures = [pool.submit(fetch_file, layout, f, token=token, reporter=reporter, cancel=cancel) for f in files]
        try:
            return [fut.result() for fut in concurrent.futures.as_completed(futures)]
        except BaseException:
            # First error or Ctrl-C: the other workers stop at their next read (their partial
            # files are flushed and kept); leaving the `with` waits for them.
            cancel.set()
            for fut in futures:
                fut.cancel()
            raise


@dataclass
class DownloadResult:
    plan: RepoPlan
    model_dir: Path
    fetched: int
    reused: int
    resumed: int
    refetched_bad: int
    cleaned: list[str]


def download(plan_: RepoPlan, *, token: str | None, cache_dir: Path | None = None, local_dir: Path | None = None,
             reporter: Reporter | None = None, extra_space: int = 0, extra_label: str = "",
             workers: int = DEFAULT_WORKERS) -> DownloadResult:
    """Fetch every file of the plan (resuming partial files), verify each, lay out the snapshot.

    Up to `workers` files at once: sharded checkpoints (DeepSeek-R1 has 163 shards) download
    faster over several connections, as with huggingface_hub's own max_workers=8."""
    reporter = reporter or Reporter()
    layout = Layout(plan_, cache_dir=cache_dir, local_dir=local_dir)
    preflight(layout, extra_space, extra_label)
    done = sum(f.size for f in plan_.files if _complete(layout, f))
    partial = sum(_partial_bytes(layout, f) for f in plan_.files if not _complete(layout, f))
    reporter.start(plan_.total, done + partial)
    stats = _fetch_all(layout, token, reporter, workers)
    fetched = sum(s["fetched"] for s in stats)
    resumed = sum(s["resumed_from"] for s in stats)
    bad = sum(s["refetched_bad"] for s in stats)
    layout.write_ref()
    cleaned = clean_stale(layout)
    return DownloadResult(plan=plan_, model_dir=layout.model_dir, fetched=fetched, reused=done, resumed=resumed,
                          refetched_bad=bad, cleaned=cleaned)
