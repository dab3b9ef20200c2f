"""Happy-path smoke test against olah, a real self-hosted hub mirror (PyPI `olah`).

olah runs from its own virtual environment (its dependencies are not dsr1's), created
once under DSR1_TEST_CACHE/olah-venv; without network access to PyPI the test skips.
It serves git repositories from `mirrors-path` (`DIR/models/ORG/NAME`, branch main) with
large files as git-lfs pointers whose objects sit in `.git/lfs/objects/`. olah cannot
test the error and resume paths (it answers 401 for missing files, ignores Range), so
those live in test_pull_download.py against tests/fakehub.py.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dsr1 import store

CACHE = Path(os.environ.get("DSR1_TEST_CACHE", Path(__file__).resolve().parent.parent / ".cache" / "test-models"))
OLAH = "olah==0.5.4"

pytestmark = pytest.mark.slow


def _olah_cli() -> Path:
    venv = CACHE / "olah-venv"
    cli = venv / "bin" / "olah-cli"
    if cli.exists():
        return cli
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", OLAH], check=True, capture_output=True,
                       timeout=600)
    except (subprocess.SubprocessError, OSError) as exc:
        pytest.skip(f"cannot install {OLAH} into its own venv ({exc})")
    return cli


def _git_repo_with_lfs(root: Path, files: dict[str, bytes], lfs: set[str]) -> None:
    """A git repo as olah expects; LFS objects written by hand (no git-lfs binary needed)."""
    root.mkdir(parents=True)
    git = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run(git + ["init", "-q", "-b", "main"], check=True)
    for name, data in files.items():
        if name in lfs:
            oid = hashlib.sha256(data).hexdigest()
            obj = root / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
            obj.parent.mkdir(parents=True, exist_ok=True)
            obj.write_bytes(data)
            data = f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {len(data)}\n".encode()
        (root / name).write_bytes(data)
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "init"], check=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_pull_from_olah_mirror(tmp_path):
    cli = _olah_cli()
    files = {"config.json": b'{"model_type": "llama"}', "tokenizer_config.json": b"{}",
             "model.safetensors": os.urandom(3 << 20), "README.md": b"# card"}
    _git_repo_with_lfs(tmp_path / "mirrors" / "models" / "acme" / "tiny-model", files, {"model.safetensors"})
    port = _free_port()
    config = tmp_path / "olah.toml"
    config.write_text(f'[basic]\nhost = "127.0.0.1"\nport = {port}\nrepos-path = "{tmp_path / "repos"}"\n'
                      f'mirrors-path = ["{tmp_path / "mirrors"}"]\n[accessibility]\noffline = true\n')
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([str(cli), "-c", str(config)], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/api/models/acme/tiny-model/revision/main", timeout=2).read()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    pytest.fail("olah did not start")
                time.sleep(0.3)
        from dsr1.cli import build_app

        r = CliRunner().invoke(build_app(), ["pull", "acme/tiny-model", "--quant", "none", "--endpoint", endpoint, "--json"])
        assert r.exit_code == 0, r.output
        m = store.load("tiny-model")
        assert sorted(f.path for f in m.files) == ["config.json", "model.safetensors", "tokenizer_config.json"]
        assert (Path(m.model_dir) / "model.safetensors").read_bytes() == files["model.safetensors"]
        assert m.endpoint == endpoint and len(m.resolved_revision) == 40
        assert store.verify("tiny-model").ok
    finally:
        proc.terminate()
        proc.wait(timeout=10)
