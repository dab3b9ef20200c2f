"""Pre-launch checks (dsr1.preflight) with real sockets on 127.0.0.1 and real files, through the
command a node runs (`dsr1 serve ... --check-only`, the line `--emit` writes into each script)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dsr1 import modelref, preflight
from dsr1.errors import IntegrityError, NetworkError, ServerError

REPO = Path(__file__).resolve().parent.parent


def _listener() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    return s


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dsr1(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "DSR1_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "dsr1", *args], capture_output=True, text=True, env=env, timeout=120)


def test_a_held_port_is_refused_with_the_flag_to_change():
    with _listener() as held:
        port = held.getsockname()[1]
        with pytest.raises(ServerError, match=f"port {port} on 127.0.0.1 is not free") as e:
            preflight.port_free("127.0.0.1", port, "the API", "--port")
        assert "--port" in e.value.hint
    preflight.port_free("127.0.0.1", port, "the API", "--port")  # released: free again
    preflight.port_free("127.0.0.1", 0, "the API", "--port")  # 0 = picked later: nothing to check


def test_a_port_only_closed_connections_name_is_free():
    """Right after a server stops, its port's accepted connections linger in TIME_WAIT: the servers bind
    it anyway (SO_REUSEADDR), so the check must not call it busy (a plain bind() fails there)."""
    with socket.socket() as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn's listener (dsr1 serve's front)
        held.bind(("127.0.0.1", 0))
        held.listen(8)
        port = held.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = held.accept()
        conn.close()  # the server side closes first: its end waits in TIME_WAIT
        time.sleep(0.1)
        client.close()
    with socket.socket() as plain:
        with pytest.raises(OSError):
            plain.bind(("127.0.0.1", port))  # the state the check must see past
    preflight.port_free("127.0.0.1", port, "the API", "--port")


def test_rank_zero_must_own_the_head_address():
    preflight.head_is_here("127.0.0.1")
    with pytest.raises(NetworkError, match="not an address of this machine"):
        preflight.head_is_here("192.0.2.1")  # TEST-NET-1: never assigned to a host
    with pytest.raises(NetworkError, match="does not resolve"):
        preflight.head_is_here("no-such-node.invalid")


def test_workers_wait_for_the_head_then_give_up_with_the_fix():
    port = _closed_port()
    t0 = time.monotonic()
    with pytest.raises(NetworkError, match=f"node 0 at 127.0.0.1:{port} did not accept") as e:
        preflight.head_reachable("127.0.0.1", port, wait_s=1.0, poll_s=0.2)
    assert 1.0 <= time.monotonic() - t0 < 10 and "start rank 0 first" in e.value.hint
    with pytest.raises(NetworkError, match="does not resolve from this node"):
        preflight.head_reachable("no-such-node.invalid", port, wait_s=5)

    # the head comes up 1.5 s after the worker started waiting: the worker goes on
    late = socket.socket()

    def open_later():
        time.sleep(1.5)
        late.bind(("127.0.0.1", port))
        late.listen(1)

    threading.Thread(target=open_later, daemon=True).start()
    lines: list[str] = []
    try:
        waited = preflight.head_reachable("127.0.0.1", port, wait_s=30, poll_s=0.2, progress=lines.append)
    finally:
        late.close()
    assert 1.0 <= waited < 30


def test_fingerprint_tells_copies_from_other_weights(tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    (a / "config.json").write_text('{"hidden_size": 8}')
    blob = os.urandom(3 * 2**20 + 123)
    (a / "model.safetensors").write_bytes(blob)
    b = tmp_path / "b"
    shutil.copytree(a, b)
    assert modelref.fingerprint(str(a)) == modelref.fingerprint(str(b)) and len(modelref.fingerprint(str(a))) == 16
    # same names and sizes, other weights (a fine-tune of the same shapes): bytes in the middle differ
    mid = bytearray(blob)
    mid[len(mid) // 2] ^= 0xFF
    (b / "model.safetensors").write_bytes(bytes(mid))
    assert modelref.fingerprint(str(a)) != modelref.fingerprint(str(b))
    # a truncated copy
    (b / "model.safetensors").write_bytes(blob[:-1])
    assert modelref.fingerprint(str(a)) != modelref.fingerprint(str(b))
    assert modelref.fingerprint(None) is None
    with pytest.raises(IntegrityError, match="not the same"):
        preflight.same_model(modelref.fingerprint(str(b)), modelref.fingerprint(str(a)), "m")
    with pytest.raises(IntegrityError, match="not on this node"):
        preflight.same_model(None, "abc", "m")


@pytest.fixture
def model_copy(demo_model_dir, tmp_path):
    """The demo model's small files and a token weight file: fingerprints only read files."""
    d = tmp_path / "m"
    d.mkdir()
    for f in demo_model_dir.iterdir():
        if f.suffix in (".json", ".txt", ".jinja"):
            shutil.copy(f, d / f.name)
    (d / "model.safetensors").write_bytes(os.urandom(2**20))
    return d


def test_check_only_runs_each_nodes_checks_through_the_cli(model_copy, tmp_path):
    home = tmp_path / "home"
    with _listener() as head:  # stands for rank 0's rendezvous port being open
        hp = head.getsockname()[1]
        common = ["serve", str(model_copy), "--engine", "vllm", "--nodes", "2", "--head", f"127.0.0.1:{hp}"]
        r = _dsr1(*common, "--dry-run", "--json", home=home)
        assert r.returncode == 0, r.stderr
        fp = json.loads(r.stdout)["model_fingerprint"]
        assert fp == modelref.fingerprint(str(model_copy))

        r = _dsr1(*common, "--node-rank", "1", "--expect-model", fp, "--check-only", "--json", home=home)
        assert r.returncode == 0, r.stderr
        checked = json.loads(r.stdout)["checked"]
        assert checked[0] == f"model fingerprint {fp}" and checked[1].startswith(f"node 0 reachable at 127.0.0.1:{hp}")

        r = _dsr1(*common, "--node-rank", "1", "--expect-model", "0123456789abcdef", "--check-only", home=home)
        assert r.returncode == IntegrityError.exit_code and "not the same" in r.stderr and "Traceback" not in r.stderr

        # rank 0 on the machine whose rendezvous port is already held (by `head` here)
        r = _dsr1(*common, "--node-rank", "0", "--check-only", home=home)
        assert r.returncode == ServerError.exit_code and f"port {hp}" in r.stderr, r.stderr
    # rank 0 once the port is free
    r = _dsr1(*common, "--node-rank", "0", "--port", "0", "--check-only", "--json", home=home)
    assert r.returncode == 0, r.stderr
    assert "--head 127.0.0.1:" in " ".join(json.loads(r.stdout)["checked"])


def test_serve_stops_before_the_engine_when_its_port_is_taken(model_copy, tmp_path):
    """The same checks run before `dsr1 serve --engine ...` starts anything."""
    with _listener() as held:
        port = held.getsockname()[1]
        r = _dsr1("serve", str(model_copy), "--engine", "vllm", "--port", str(port), home=tmp_path / "home")
    assert r.returncode == ServerError.exit_code and f"the API port {port}" in r.stderr, r.stderr
    assert "starting vllm" not in r.stderr


def test_emitted_scripts_check_before_they_launch(model_copy, tmp_path):
    out = tmp_path / "emit"
    r = _dsr1("serve", str(model_copy), "--engine", "vllm", "--nodes", "2", "--head", "10.0.0.1:29500",
              "--emit", str(out), home=tmp_path / "home")
    assert r.returncode == 0, r.stderr
    fp = modelref.fingerprint(str(model_copy))
    for rank in (0, 1):
        text = (out / f"node-{rank}.sh").read_text()
        check = next(line for line in text.splitlines() if line.endswith("--check-only"))
        assert f"--node-rank {rank}" in check and f"--expect-model {fp}" in check
        assert text.index("--check-only") < text.index("exec ")  # checks first, `set -e` stops the launch
