"""`dsr1 serve CATALOG_NAME` pulls a model that is not stored yet, through the same
endpoint settings as `dsr1 pull` (here an endpoint where nothing listens)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_serve_pulls_a_catalog_model_first(isolated_home):
    with socket.socket() as s:  # a port that is certainly closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_ENDPOINT": endpoint}
    res = subprocess.run([sys.executable, "-m", "dsr1", "serve", "r1-distill-qwen-1.5b", "--port", "0"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert "pulling deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B first" in res.stderr
    assert res.returncode == 6, res.stderr  # NetworkError, naming the endpoint to change
    assert endpoint in res.stderr


def test_serve_unknown_name_suggests(isolated_home):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-m", "dsr1", "serve", "r1-distill-qwen-7", "--port", "0"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 4 and "fix:" in res.stderr
