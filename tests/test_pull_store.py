"""The model store: names, manifest-last commits, list/rm, resolve_model_dir, verify; CLI import cost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsr1 import store
from dsr1.errors import IntegrityError, NotFoundError, UsageError

REPO_ROOT = Path(__file__).resolve().parent.parent


def _fake_model_dir(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text('{"model_type": "llama"}')
    (root / "model.safetensors").write_bytes(os.urandom(4096))
    return root


def _register(name: str, model_dir: Path) -> store.Manifest:
    m = store.Manifest(name=name, source=str(model_dir), source_kind="dir", model_dir=str(model_dir),
                       files=store.record_files(model_dir))
    store.write_manifest(m)
    return m


@pytest.mark.parametrize("name", ["ok", "r1-distill-qwen-7b", "a.b_c-1", "x" * 100])
def test_valid_names(name):
    assert store.validate_name(name) == name


@pytest.mark.parametrize("name", ["", "..", "../x", "a/b", "/abs", ".hidden", "-dash", "Caps", "x" * 101,
                                  "a\\b", "a b", "a..b"])
def test_invalid_names_are_usage_errors(name):
    with pytest.raises(UsageError):
        store.entry_dir(name)


def test_manifest_is_the_commit_point(tmp_path):
    d = _fake_model_dir(tmp_path / "m")
    entry = store.entry_dir("half")
    entry.mkdir(parents=True)
    (entry / "model").mkdir()  # an interrupted pull: files but no manifest
    assert store.list_models() == []
    with pytest.raises(NotFoundError, match="no stored model"):
        store.resolve_model_dir("half")
    _register("whole", d)
    assert [m.name for m in store.list_models()] == ["whole"]
    data = json.loads((store.entry_dir("whole") / "manifest.json").read_text())
    assert data["files"][1]["path"] == "model.safetensors" and len(data["files"][1]["sha256"]) == 64
    assert data["dsr1_version"] and data["created"]
    assert not list(store.entry_dir("whole").glob(".*tmp"))  # temp file renamed away


def test_resolve_model_dir_by_name_or_path(tmp_path):
    d = _fake_model_dir(tmp_path / "m")
    _register("mine", d)
    assert store.resolve_model_dir("mine") == d
    assert store.resolve_model_dir(d) == d.resolve()
    with pytest.raises(NotFoundError, match="no stored model") as exc:
        store.resolve_model_dir("other")
    assert "dsr1 pull other" in exc.value.hint
    with pytest.raises(NotFoundError, match="not a model directory"):
        store.resolve_model_dir(tmp_path)
    with pytest.raises(UsageError):
        store.resolve_model_dir("Bad Name")
    with pytest.raises(NotFoundError, match="no model directory"):
        store.resolve_model_dir("../no-such-dir-xyz")


def test_resolve_reports_missing_weights(tmp_path):
    d = _fake_model_dir(tmp_path / "m")
    _register("gone", d)
    (d / "config.json").unlink()
    with pytest.raises(IntegrityError, match="missing or incomplete"):
        store.resolve_model_dir("gone")


def test_verify_detects_corruption_and_missing_files(tmp_path):
    d = _fake_model_dir(tmp_path / "m")
    _register("v", d)
    assert store.verify("v").ok
    with open(d / "model.safetensors", "r+b") as f:
        f.seek(100)
        f.write(b"\xff")
    r = store.verify("v")
    assert not r.ok and r.problems[0]["path"] == "model.safetensors" and "sha256" in r.problems[0]["problem"]
    (d / "config.json").unlink()
    assert {p["problem"] for p in store.verify("v").problems} >= {"missing"}


def test_rm_removes_entry_but_not_registered_weights(tmp_path):
    d = _fake_model_dir(tmp_path / "m")
    _register("r", d)
    store.remove("r")
    assert store.list_models() == [] and d.is_dir()
    with pytest.raises(NotFoundError):
        store.remove("r")


def test_clean_stale_removes_leftovers_of_dead_writers_only(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    entry = store.entry_dir("x")
    (entry / f".tmp-{dead}" / "imported").mkdir(parents=True)
    (entry / f".manifest.json.{dead}.tmp").write_text("{")
    (store.store_root() / f".trash-y-{dead}").mkdir()
    live = entry / f".tmp-{os.getppid()}"  # a running process (pytest's parent) owns this one
    live.mkdir()
    removed = store.clean_stale()
    assert len(removed) == 3 and not (entry / f".tmp-{dead}").exists() and live.exists()


def test_corrupt_manifest_is_a_config_error(tmp_path):
    from dsr1.errors import ConfigError

    entry = store.entry_dir("bad")
    entry.mkdir(parents=True)
    (entry / "manifest.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON") as exc:
        store.load("bad")
    assert "dsr1 rm bad" in exc.value.hint


def test_help_and_list_import_nothing_heavy():
    code = ("import sys; from dsr1.cli import main\n"
            "try: main(['list', '--json'])\nexcept SystemExit: pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'bitsandbytes', 'accelerate', 'huggingface_hub') "
            "if m in sys.modules]\nprint('HEAVY', heavy)")
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out
