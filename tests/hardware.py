"""Build doctor inputs from a recorded snapshot (tests/snapshots/*.json).

GPUs go through the real probe code via FakeNvml; InfiniBand ports are written
as a /sys tree and read by the real reader; the rest of the host is taken as
recorded (it is psutil's job, exercised for real on this machine elsewhere).
"""

from __future__ import annotations

from pathlib import Path

from dsr1.probe.gpu import probe_gpus
from dsr1.probe.host import Host, infiniband_ports
from dsr1.probe.software import Software
from tests.fake_nvml import FakeNvml, load_snapshot

GB = 10**9


def write_sys_tree(root: Path, ports: list[dict]) -> Path:
    for p in ports:
        d = root / "sys/class/infiniband" / p["device"] / "ports" / p["port"]
        d.mkdir(parents=True, exist_ok=True)
        (d / "state").write_text(p["state"] + "\n")
        (d / "rate").write_text(p["rate"] + "\n")
        (d / "link_layer").write_text(p["link_layer"] + "\n")
    return root


def probes_for(name: str, tmp_path: Path, snapshot: dict | None = None):
    snap = snapshot or load_snapshot(name)
    gpus = probe_gpus(nvml=FakeNvml(snap))
    h = snap["host"]
    root = write_sys_tree(tmp_path / "root", h["infiniband"])
    host = Host(cpu_model=h["cpu_model"], cores_physical=h["cores"], cores_logical=h["cores"] * 2,
                cpu_flags=h["flags"], ram_total=h["ram_gb"] * GB, ram_available=h["ram_gb"] * GB, cgroup_limit=None,
                shm_total=64 * GB, store_path="/models", disk_free=4000 * GB, disk_total=8000 * GB, disk_kind="nvme",
                infiniband=infiniband_ports(root))
    software = Software(python="3.11.7", packages={"torch": "2.5.1", "transformers": "4.57.0", "accelerate": "1.2.0",
                                                   "vllm": "0.11.0"}, torch_cuda="12.4")
    return gpus, host, software
