"""`dsr1 pull` from a hub: the real huggingface_hub client against a real HTTP server on 127.0.0.1.

The server (tests/fakehub.py) speaks the hub protocol huggingface_hub 2.4 uses, so
these tests exercise dsr1's downloader, resume, verification and error mapping
end to end. Fault tests: connection drops, corrupt bytes, kill -9 mid-download,
a full (size-limited tmpfs) disk, 404, 401/403, an unreachable endpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dsr1 import store
from dsr1.errors import AuthError, DiskSpaceError, IntegrityError, NetworkError, NotFoundError, UsageError
from tests.fakehub import FakeHub
from tests import interrupt

REPO_ROOT = Path(__file__).resolve().parent.parent
REPO = "acme/tiny-model"
CONFIG = json.dumps({"model_type": "llama", "hidden_size": 8}).encode()


def model_files(weights: int = 3 << 20, seed: int = 0) -> dict[str, bytes]:
    rnd = os.urandom if seed == 0 else (lambda n: bytes((i * seed) % 251 for i in range(n)))
    return {
        "config.json": CONFIG,
        "tokenizer.json": b'{"version": "1.0"}' * 1000,  # 19 KB: an LFS file on the hub
        "tokenizer_config.json": b"{}",
        "model.safetensors": rnd(weights),
        "README.md": b"# not needed",
        "pytorch_model.bin": b"pickle" * 100,  # skipped: safetensors exist
        "onnx/model.onnx": b"x" * 100,  # sub-folder formats are skipped
    }


@pytest.fixture
def hub(monkeypatch):
    h = FakeHub().start()
    monkeypatch.setenv("HF_ENDPOINT", h.endpoint)
    yield h
    h.stop()


def cli(*args: str):
    from dsr1.cli import build_app

    return CliRunner().invoke(build_app(), list(args))


def subprocess_env(extra: dict | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    env.update(extra or {})
    return env


def test_pull_happy_path_cache_layout_manifest_and_reuse(hub):
    files = model_files()
    sha = hub.add_repo(REPO, files)
    r = cli("pull", REPO, "--quant", "none", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["resolved_revision"] == sha and out["name"] == "tiny-model"
    # Only what a model needs: no README, no pickle, no sub-folder formats.
    m = store.load("tiny-model")
    assert sorted(f.path for f in m.files) == ["config.json", "model.safetensors", "tokenizer.json",
                                               "tokenizer_config.json"]
    assert m.resolved_revision == sha and m.revision == "main" and m.endpoint == hub.endpoint
    assert hub.sent["README.md"] == 0 and hub.sent["pytorch_model.bin"] == 0
    # Standard HF cache layout: other tools find the files without the network.
    from huggingface_hub import hf_hub_download

    from dsr1 import settings

    # huggingface_hub reads HF_HOME once at import (an earlier test's value), so name the
    # cache this test's HF_HOME points at, as any tool sharing the cache would.
    cached = hf_hub_download(REPO, "model.safetensors", local_files_only=True, cache_dir=settings.hf_hub_cache())
    assert Path(cached).read_bytes() == files["model.safetensors"]
    assert store.resolve_model_dir("tiny-model") == Path(m.model_dir)
    # Again: nothing re-downloaded (files are re-hashed, not re-fetched).
    before = sum(hub.sent.values())
    r = cli("pull", REPO, "--quant", "none", "--json")
    assert r.exit_code == 0 and sum(hub.sent.values()) == before
    assert json.loads(r.stdout)["downloaded_bytes"] == 0
    # list / verify / rm
    listed = json.loads(cli("list", "--json").stdout)
    assert [x["name"] for x in listed["models"]] == ["tiny-model"]
    assert cli("verify", "tiny-model").exit_code == 0
    r = cli("rm", "tiny-model", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["kept_files_at"] == m.model_dir
    assert json.loads(cli("list", "--json").stdout)["models"] == []
    assert Path(cached).exists()  # the shared cache is left alone


def test_revision_tag_is_resolved_and_recorded(hub, tmp_path):
    hub.add_repo(REPO, model_files(1 << 16, seed=3))
    tag_sha = hub.add_repo(REPO, model_files(1 << 16, seed=5), revision="v1.0")
    r = cli("pull", REPO, "--revision", "v1.0", "--quant", "none", "--json", "--local-dir", str(tmp_path / "ld"))
    assert r.exit_code == 0, r.output
    m = store.load("tiny-model")
    assert m.revision == "v1.0" and m.resolved_revision == tag_sha
    assert (tmp_path / "ld" / "model.safetensors").read_bytes() == model_files(1 << 16, seed=5)["model.safetensors"]
    assert Path(m.model_dir) == (tmp_path / "ld").resolve()


def test_connection_drops_are_resumed_with_range(hub):
    files = model_files(4 << 20)
    hub.add_repo(REPO, files)
    hub.drops["model.safetensors"] = [1 << 20, 3 << 20]
    r = cli("pull", REPO, "--quant", "none", "--json")
    assert r.exit_code == 0, r.output
    import hashlib

    lfs = "/lfs/" + hashlib.sha256(files["model.safetensors"]).hexdigest()
    ranges = [rng for (meth, path, rng) in hub.requests if path == lfs and meth == "GET"]
    assert ranges == [None, f"bytes={1 << 20}-", f"bytes={3 << 20}-"]
    assert hub.sent["model.safetensors"] == len(files["model.safetensors"])  # not one byte twice
    assert cli("verify", "tiny-model").exit_code == 0


def test_server_ignoring_range_restarts_file_cleanly(hub):
    files = model_files(2 << 20)
    hub.add_repo(REPO, files)
    hub.drops["model.safetensors"] = [1 << 20]
    hub.ignore_range = True  # like olah: answers 200 with the whole file to a Range request
    assert cli("pull", REPO, "--quant", "none").exit_code == 0
    assert cli("verify", "tiny-model").exit_code == 0


def test_corrupt_bytes_from_server_are_refetched(hub):
    hub.add_repo(REPO, model_files(1 << 20))
    hub.corrupt_once.add("model.safetensors")
    r = cli("pull", REPO, "--quant", "none", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["refetched_corrupt"] == 1
    assert cli("verify", "tiny-model").exit_code == 0


def test_corrupt_stored_file_fails_verify_and_pull_repairs_it(hub):
    hub.add_repo(REPO, model_files(1 << 20))
    assert cli("pull", REPO, "--quant", "none").exit_code == 0
    blob = (Path(store.load("tiny-model").model_dir) / "model.safetensors").resolve()
    data = bytearray(blob.read_bytes())
    data[1000] ^= 1
    blob.write_bytes(bytes(data))
    r = cli("verify", "tiny-model", "--json")
    assert r.exit_code == IntegrityError.exit_code
    assert json.loads(r.stdout)["problems"][0]["path"] == "model.safetensors"
    assert "dsr1 pull acme/tiny-model --name tiny-model" in r.stderr
    r = cli("pull", REPO, "--quant", "none", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["refetched_corrupt"] == 1
    assert cli("verify", "tiny-model").exit_code == 0


def test_repo_not_found_suggests_catalog_names(hub):
    r = cli("pull", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7", "--quant", "none")
    assert r.exit_code == NotFoundError.exit_code
    assert "not found at " + hub.endpoint in r.stderr and "r1-distill-qwen-7b" in r.stderr


def test_unknown_catalog_name_suggests_closest():
    r = cli("pull", "r1-distill-qwen-7", "--quant", "none")
    assert r.exit_code == NotFoundError.exit_code and "r1-distill-qwen-7b" in r.stderr


def test_revision_not_found(hub):
    hub.add_repo(REPO, model_files(1000))
    r = cli("pull", REPO, "--revision", "nope", "--quant", "none")
    assert r.exit_code == NotFoundError.exit_code and "--revision" in r.stderr


def test_gated_repo_without_token_names_hf_token(hub):
    hub.add_repo(REPO, model_files(1000), gated=True)
    r = cli("pull", REPO, "--quant", "none")
    assert r.exit_code == AuthError.exit_code
    assert "gated" in r.stderr and "HF_TOKEN" in r.stderr
    assert ("GET", "/lfs/") not in [(m, p[:5]) for m, p, _ in hub.requests]


def test_gated_repo_with_refused_and_accepted_token(hub, monkeypatch):
    hub.add_repo(REPO, model_files(1 << 16), gated=True)
    hub.approved_tokens.add("hf_good")
    monkeypatch.setenv("HF_TOKEN", "hf_bad")
    r = cli("pull", REPO, "--quant", "none")
    assert r.exit_code == AuthError.exit_code and "refused" in r.stderr
    monkeypatch.setenv("HF_TOKEN", "hf_good")
    assert cli("pull", REPO, "--quant", "none").exit_code == 0


def test_unreachable_endpoint_names_it_and_the_fix():
    r = cli("pull", REPO, "--quant", "none", "--endpoint", "http://127.0.0.1:9")
    assert r.exit_code == NetworkError.exit_code
    assert "http://127.0.0.1:9" in r.stderr and "--endpoint" in r.stderr and "HF_ENDPOINT" in r.stderr


def test_pickle_only_repo_refused_unless_allowed(hub):
    hub.add_repo(REPO, {"config.json": CONFIG, "pytorch_model.bin": b"p" * 20000})
    r = cli("pull", REPO, "--quant", "none")
    assert r.exit_code == UsageError.exit_code and "--allow-pickle" in r.stderr
    r = cli("pull", REPO, "--quant", "none", "--allow-pickle", "--json")
    assert r.exit_code == 0, r.output
    assert [f.path for f in store.load("tiny-model").files] == ["config.json", "pytorch_model.bin"]


@pytest.mark.parametrize("bad", ["../escape", "a/b", "..", "UPPER", "x" * 101, ".hidden"])
def test_names_cannot_escape_the_store(hub, bad):
    hub.add_repo(REPO, model_files(1000))
    r = cli("pull", REPO, "--quant", "none", "--name", bad)
    assert r.exit_code == UsageError.exit_code and "--name" in r.stderr
    assert not any(p.name != "models" for p in store.store_root().parent.rglob("*") if "escape" in p.name)


def test_disk_preflight_stops_before_downloading(hub, tmp_path, monkeypatch):
    hub.add_repo(REPO, model_files(4 << 20))
    mnt = tmp_path / "tiny-disk"
    mounted = _mount_tmpfs(mnt, "2m")
    if not mounted:  # without root: the one narrow seam, pretend the disk is small
        import shutil as _shutil

        real = _shutil.disk_usage
        monkeypatch.setattr("dsr1.fsutil.shutil.disk_usage", lambda p: real(p)._replace(free=1 << 20))
    try:
        r = cli("pull", REPO, "--quant", "none", "--local-dir", str(mnt / "m"))
        assert r.exit_code == DiskSpaceError.exit_code, r.output
        assert "GB free" in r.stderr and "--local-dir" in r.stderr
        assert not any(p.startswith("/lfs/") for _, p, _ in hub.requests)
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(mnt)])


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_disk_full_mid_download_then_resume(hub, tmp_path):
    """A real size-limited filesystem (tmpfs) fills up mid-download (another writer grabs the
    space after the preflight passed); once space is freed the same command continues."""
    import threading

    mnt = tmp_path / "small"
    if not _mount_tmpfs(mnt, "8m"):
        pytest.skip("cannot mount a tmpfs here (needs root); test_disk_preflight covers the check")
    try:
        files = model_files(6 << 20)
        hub.add_repo(REPO, files)
        hub.throttle = 4 << 20
        partial = mnt / "model" / ".cache" / "dsr1" / "model.safetensors.dsr1.incomplete"
        filler = mnt / "filler"

        def fill_when_started():
            deadline = time.time() + 20
            while time.time() < deadline:
                if partial.exists() and partial.stat().st_size >= 1 << 20:
                    try:
                        with open(filler, "wb") as f:
                            while True:
                                f.write(b"\0" * (64 << 10))
                    except OSError:
                        return  # the disk is full
                time.sleep(0.01)

        t = threading.Thread(target=fill_when_started)
        t.start()
        r = cli("pull", REPO, "--quant", "none", "--local-dir", str(mnt / "model"))
        t.join()
        assert r.exit_code == DiskSpaceError.exit_code, r.output
        assert "disk full" in r.stderr and "run the same command again" in r.stderr
        kept = partial.stat().st_size
        assert 0 < kept < len(files["model.safetensors"])
        assert not (store.store_root() / "tiny-model" / "manifest.json").exists()
        filler.unlink()  # free the space
        hub.throttle = None
        hub.requests.clear()
        r = cli("pull", REPO, "--quant", "none", "--local-dir", str(mnt / "model"), "--json")
        assert r.exit_code == 0, r.output
        gets = [rng for meth, path, rng in hub.requests if meth == "GET" and path.startswith("/lfs/")]
        assert f"bytes={kept}-" in gets  # continued from the kept bytes, not from 0
        assert (mnt / "model" / "model.safetensors").read_bytes() == files["model.safetensors"]
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def test_kill_9_mid_download_then_resume_refetches_less_than_a_chunk(hub, tmp_path):
    from huggingface_hub import constants

    size = 48 << 20
    files = model_files(size)
    hub.add_repo(REPO, files)
    hub.throttle = 24 << 20  # ~2 s for the file, so the kill lands mid-download
    env = subprocess_env({"DSR1_HOME": os.environ["DSR1_HOME"], "HF_HOME": os.environ["HF_HOME"],
                          "HF_ENDPOINT": hub.endpoint})
    cmd = [sys.executable, "-m", "dsr1", "pull", REPO, "--quant", "none", "--quiet"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    blobs = Path(os.environ["HF_HOME"]) / "hub" / "models--acme--tiny-model" / "blobs"
    deadline = time.time() + 60
    partial = None
    while time.time() < deadline:
        found = list(blobs.glob("*.dsr1.incomplete")) if blobs.is_dir() else []
        if found and found[0].stat().st_size > 8 << 20:
            partial = found[0]
            break
        time.sleep(0.05)
    assert partial is not None, proc.stderr.read() if proc.poll() is not None else "no partial file appeared"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = partial.stat().st_size
    assert 0 < kept < size
    assert store.list_models() == []  # killed before the manifest: nothing looks complete
    sent_first = hub.sent["model.safetensors"]
    hub.throttle = None
    r = subprocess.run(cmd[:-1] + ["--json"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["resumed_bytes"] == kept
    refetched = hub.sent["model.safetensors"] - size
    assert 0 <= refetched < constants.DOWNLOAD_CHUNK_SIZE, (sent_first, kept, refetched)
    assert store.verify("tiny-model").ok
    assert not list(blobs.glob("*.incomplete"))


def test_hub_client_leftover_partial_is_adopted_and_cleaned(hub):
    """huggingface_hub leaves `<etag>.<uuid>.incomplete` after a kill; dsr1 continues it."""
    files = model_files(2 << 20)
    hub.add_repo(REPO, files)
    import hashlib

    sha = hashlib.sha256(files["model.safetensors"]).hexdigest()
    blobs = Path(os.environ["HF_HOME"]) / "hub" / "models--acme--tiny-model" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / f"{sha}.1a2b3c4d.incomplete").write_bytes(files["model.safetensors"][: 1 << 20])
    (blobs / f"{sha}.99999999.incomplete").write_bytes(files["model.safetensors"][:1000])
    r = cli("pull", REPO, "--quant", "none", "--json")
    assert r.exit_code == 0, r.output
    assert hub.sent["model.safetensors"] == (2 << 20) - (1 << 20)
    assert not list(blobs.glob("*.incomplete"))


def test_quant_precedence_flag_env_profile(monkeypatch):
    from dsr1.pull import resolve_quant

    assert resolve_quant("nf4", None) == ("nf4", "flag")
    monkeypatch.setenv("DSR1_QUANT", "int8")
    assert resolve_quant(None, None) == ("int8", "env")
    monkeypatch.delenv("DSR1_QUANT")
    # This CPU machine gets the cpu profile, which runs the demo model in bf16: no quantization.
    assert resolve_quant(None, None, "smollm2-135m") == ("none", "profile")
    # bitsandbytes is the embedded engine's quantizer: a profile served by SGLang (enterprise: R1 in
    # int4 means an AWQ checkpoint) gets nothing from pull; the embedded single-gpu profile does when
    # bf16 does not fit its 24 GB (planned on that profile's hardware from this CPU machine).
    assert resolve_quant(None, "enterprise") == ("none", "profile")
    assert resolve_quant(None, "single-gpu", "r1-distill-qwen-14b") == ("int8", "profile")
    with pytest.raises(UsageError, match="unknown quantization"):
        resolve_quant("fp3", None)


def test_catalog_name_resolves_to_its_repo(hub):
    from dsr1 import catalog

    spec = catalog.get("smollm2-135m")
    sha = hub.add_repo(spec.repo, model_files(1 << 16, seed=7))
    r = cli("pull", "smollm2-135m", "--quant", "none", "--json")
    assert r.exit_code == 0, r.output
    m = store.load("smollm2-135m")
    assert m.repo_id == spec.repo and m.resolved_revision == sha and m.source == "smollm2-135m"


def test_endpoint_flag_beats_hf_endpoint(hub, monkeypatch):
    """huggingface_hub reads HF_ENDPOINT once at import; dsr1 passes endpoint= explicitly."""
    hub.add_repo(REPO, model_files(1 << 16))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # unreachable
    r = cli("pull", REPO, "--quant", "none", "--endpoint", hub.endpoint, "--json")
    assert r.exit_code == 0, r.output
    assert store.load("tiny-model").endpoint == hub.endpoint


def test_ctrl_c_exits_130_and_keeps_the_partial_file(hub):
    size = 16 << 20
    hub.add_repo(REPO, model_files(size))
    hub.throttle = 8 << 20
    env = subprocess_env({"DSR1_HOME": os.environ["DSR1_HOME"], "HF_HOME": os.environ["HF_HOME"],
                          "HF_ENDPOINT": hub.endpoint})
    proc = interrupt.popen([sys.executable, "-m", "dsr1", "pull", REPO, "--quant", "none", "--quiet"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    blobs = Path(os.environ["HF_HOME"]) / "hub" / "models--acme--tiny-model" / "blobs"
    deadline = time.time() + 60
    while time.time() < deadline:
        found = list(blobs.glob("*.dsr1.incomplete")) if blobs.is_dir() else []
        if found and found[0].stat().st_size > 2 << 20:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "interrupted" in err
    assert 0 < found[0].stat().st_size < size
    assert store.list_models() == []


def _sharded(n: int, size: int) -> dict[str, bytes]:
    files = {"config.json": CONFIG, "model.safetensors.index.json": b'{"weight_map": {}}'}
    for i in range(n):
        files[f"model-{i + 1:05d}-of-{n:05d}.safetensors"] = os.urandom(size)
    return files


def test_shards_download_in_parallel_and_each_resumes_after_drops(hub):
    files = _sharded(3, 2 << 20)
    hub.add_repo(REPO, files)
    for name in files:
        if name.endswith(".safetensors"):
            hub.drops[name] = [1 << 20]
    r = cli("pull", REPO, "--quant", "none", "--json")
    assert r.exit_code == 0, r.output
    assert sorted(f.path for f in store.load("tiny-model").files) == sorted(files)
    for name, data in files.items():
        if name.endswith(".safetensors"):
            assert hub.sent[name] == len(data)  # dropped once, resumed, nothing fetched twice
    assert store.verify("tiny-model").ok


def test_one_failing_shard_stops_the_others_and_keeps_their_partials(hub):
    import hashlib

    files = _sharded(3, 8 << 20)
    hub.add_repo(REPO, files)
    hub.throttle = 2 << 20  # each shard alone would take 4 s
    gone = hashlib.sha256(files["model-00003-of-00003.safetensors"]).hexdigest()
    del hub.blobs[gone]  # the CDN lost one shard: 404
    t0 = time.time()
    r = cli("pull", REPO, "--quant", "none")
    assert r.exit_code == NotFoundError.exit_code, r.output
    assert time.time() - t0 < 3.5  # the other workers were cancelled, not waited for
    blobs = Path(os.environ["HF_HOME"]) / "hub" / "models--acme--tiny-model" / "blobs"
    assert len(list(blobs.glob("*.dsr1.incomplete"))) >= 1
    assert store.list_models() == []


def test_sink_write_behind_keeps_every_byte(tmp_path):
    """Write-behind (sync_file_range every 16 MiB) must be available on Linux and must not
    disturb the file's bytes or the running hash, including across a resumed prefix."""
    import hashlib

    from dsr1 import transfer

    assert sys.platform != "linux" or transfer._sync_file_range() is not None
    data = os.urandom(5 << 20) * 8  # 40 MiB: two write-behind rounds and a tail
    part = tmp_path / "blob.part"
    part.write_bytes(data[:3 << 20])  # a kept prefix, as after a kill

    class Count(transfer.Progress):
        n = 0

        def advance(self, n):
            self.n += n

    sink = transfer.Sink(part, True, Count())
    for i in range(3 << 20, len(data), 1 << 20):
        sink.write(memoryview(data)[i:i + (1 << 20)])
    sink.close()
    assert part.read_bytes() == data
    assert sink.hasher.hexdigest() == hashlib.sha256(data).hexdigest()


def test_workers_bounds_files_downloaded_at_once(hub):
    files = {"config.json": CONFIG, **{f"model-0000{i}-of-00004.safetensors": os.urandom(1 << 20) for i in range(1, 5)}}
    hub.add_repo(REPO, files)
    hub.throttle = 8 << 20  # 1 MiB each takes ~0.12 s: long enough for parallel bodies to overlap
    r = cli("pull", REPO, "--quant", "none", "--workers", "1", "--json")
    assert r.exit_code == 0, r.output
    assert hub.max_bodies_in_flight == 1
    cli("rm", "tiny-model")
    hub.max_bodies_in_flight = 0
    r = cli("pull", REPO, "--quant", "none", "--local-dir", str(Path(os.environ["DSR1_HOME"]) / "ld"), "--json")
    assert r.exit_code == 0, r.output
    assert hub.max_bodies_in_flight > 1  # the default (4) really runs files side by side
    r = cli("pull", REPO, "--workers", "0")
    assert r.exit_code == 2 and "--workers" in r.output


def test_a_failing_disk_write_is_reported_not_retried_as_a_dropped_connection(hub, monkeypatch):
    """EIO cannot be produced on demand here, so the partial file's write() is the one seam:
    the download must stop at once with dsr1's error, not retry five times and blame the network."""
    import errno

    from dsr1 import transfer

    hub.add_repo(REPO, model_files())
    real_init = transfer.Sink.__init__

    def failing_init(self, *a, **k):
        real_init(self, *a, **k)

        class Broken:
            def __init__(self, fh):
                self._fh = fh

            def write(self, data):
                raise OSError(errno.EIO, "Input/output error")

            def __getattr__(self, name):
                return getattr(self._fh, name)

        self.fh = Broken(self.fh)

    monkeypatch.setattr(transfer.Sink, "__init__", failing_init)
    r = cli("pull", REPO, "--quant", "none", "--workers", "1")
    assert r.exit_code == 1, r.output
    assert "cannot write" in r.output and "Input/output error" in r.output and "stalled" not in r.output
    assert hub.sent["model.safetensors"] <= 3 << 20  # one attempt, not five


def test_pull_of_a_catalog_model_fetches_the_checkpoint_its_plan_loads(hub):
    """On the base tier (2x A100) the 70B distill is planned at int4 from its AWQ checkpoint: `dsr1 pull` fetches
    that repository (not the 141 GB BF16 one), and serve's plan then loads the stored copy."""
    from dsr1 import plan

    repo = "casperhansen/deepseek-r1-distill-llama-70b-awq"
    hub.add_repo(repo, model_files(1 << 16))
    r = cli("pull", "r1-distill-llama-70b", "--profile", "base", "--endpoint", hub.endpoint, "--json")
    assert r.exit_code == 0, r.output
    m = store.load("r1-distill-llama-70b-int4-awq")
    assert m.repo_id == repo and m.quantization == "none"
    p = plan.make_plan("r1-distill-llama-70b", "base", plan.Overrides(engine_port=1))
    assert (p.precision, p.checkpoint, p.model_path, p.needs_pull) == ("int4", repo, m.model_dir, False)
