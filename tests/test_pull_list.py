"""`dsr1 list`: what identifies each stored model is shown whole, even in an 80-column terminal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsr1 import store

REPO = Path(__file__).resolve().parent.parent
LONG_REPO = "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B"


def _dsr1(*args: str, cwd: Path = REPO, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return subprocess.run([sys.executable, "-m", "dsr1", *args], env=full, cwd=cwd, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_list_shows_the_gguf_file_name_whole_at_80_columns(demo_gguf, tmp_path):
    # As the README demo does it, but from the file's folder with a relative path: --json still has the full path.
    pulled = _dsr1("pull", demo_gguf.name, "--name", "smollm2-135m", "--quant", "none", cwd=demo_gguf.parent)
    assert pulled.returncode == 0, pulled.stderr[-2000:]
    # and a hub model with a long repo id next to it (registered through the store API)
    store.write_manifest(store.Manifest(name="r1-distill-qwen-32b", source=LONG_REPO, source_kind="hub",
                                        repo_id=LONG_REPO, resolved_revision="0123456789abcdef" * 2 + "01234567",
                                        model_dir=str(tmp_path), files=[]))

    out = _dsr1("list", COLUMNS="80")
    assert out.returncode == 0, out.stderr
    assert demo_gguf.name in out.stdout  # SmolLM2-135M-Instruct.Q4_1.gguf, not SmolLM2-135M-I…
    assert LONG_REPO in out.stdout
    assert "…" not in out.stdout
    assert max(len(line) for line in out.stdout.splitlines()) <= 80

    data = json.loads(_dsr1("list", "--json").stdout)
    rows = {m["name"]: m for m in data["models"]}
    assert rows["smollm2-135m"]["source_path"] == str(demo_gguf.resolve())
    assert rows["smollm2-135m"]["source"] == demo_gguf.name  # what the user typed, as before
    assert rows["r1-distill-qwen-32b"]["source_path"] is None and rows["r1-distill-qwen-32b"]["repo_id"] == LONG_REPO
