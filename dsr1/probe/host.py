"""CPU, memory, disk and InfiniBand, read from psutil and /proc, /sys.

`root` lets tests point the /proc and /sys readers at a recorded tree.
"""

from __future__ import annotations

import os
import platform
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import psutil

# CPU flags that change what runs fast: bf16/int8 matmul units for CPU inference.
INTERESTING_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")


@dataclass
class IbPort:
    device: str
    port: str
    state: str  # e.g. ACTIVE, DOWN
    rate: str  # e.g. "400 Gb/sec (4X NDR)"
    rate_gbps: float
    link_layer: str  # InfiniBand | Ethernet (RoCE)


@dataclass
class Host:
    cpu_model: str
    cores_physical: int
    cores_logical: int
    cpu_flags: list[str]
    ram_total: int
    ram_available: int
    cgroup_limit: int | None
    shm_total: int | None
    store_path: str
    disk_free: int
    disk_total: int
    disk_kind: str  # nvme | ssd | hdd | unknown
    infiniband: list[IbPort] = field(default_factory=list)

    @property
    def usable_ram(self) -> int:
        """RAM this process may use: the cgroup limit, when tighter than the host's RAM."""
        return min(self.ram_total, self.cgroup_limit) if self.cgroup_limit else self.ram_total

    @property
    def bf16_fast(self) -> bool:
        return any(f in self.cpu_flags for f in ("avx512_bf16", "amx_bf16"))


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _cpuinfo(root: Path) -> tuple[str, set[str]]:
    """(model name, every feature flag) from the first CPU in /proc/cpuinfo."""
    text = _read(root / "proc/cpuinfo") or ""
    model, flags = platform.processor() or "unknown", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model in ("unknown", "", platform.processor()):
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return model, flags


def cpu_info(root: Path = Path("/")) -> tuple[str, list[str]]:
    """(model name, the flags doctor shows: INTERESTING_FLAGS present)."""
    model, flags = _cpuinfo(root)
    return model, [f for f in INTERESTING_FLAGS if f in flags]


def cpu_flags(root: Path = Path("/")) -> set[str]:
    """Every feature flag Linux lists for the CPU (kernels that need more than INTERESTING_FLAGS ask here)."""
    return _cpuinfo(root)[1]


def cgroup_memory_limit(root: Path = Path("/")) -> int | None:
    """cgroup v2 memory.max, else v1 memory.limit_in_bytes. psutil shows host RAM
    inside containers, so this is the number that actually bounds us."""
    for rel in ("sys/fs/cgroup/memory.max", "sys/fs/cgroup/memory/memory.limit_in_bytes"):
        raw = _read(root / rel)
        if raw and raw != "max" and raw.isdigit():
            value = int(raw)
            if value < 1 << 60:  # v1 reports "unlimited" as a huge number
                return value
    return None


def available_ram(root: Path = Path("/")) -> int:
    """Memory this process can still take now: psutil's available, capped by what the cgroup
    limit leaves (limit - current usage), since psutil shows the host's RAM inside containers."""
    available = psutil.virtual_memory().available
    limit = cgroup_memory_limit(root)
    if limit is None:
        return available
    for rel in ("sys/fs/cgroup/memory.current", "sys/fs/cgroup/memory/memory.usage_in_bytes"):
        raw = _read(root / rel)
        if raw and raw.isdigit():
            return max(0, min(available, limit - int(raw)))
    return min(available, limit)


def disk_kind(path: Path, root: Path = Path("/")) -> str:
    """nvme / ssd / hdd for the block device holding `path`, from /sys/block."""
    try:
        dev = os.stat(path).st_dev
        sys_dev = root / f"sys/dev/block/{os.major(dev)}:{os.minor(dev)}"
        real = sys_dev.resolve()
        # Partitions live under their disk: .../block/nvme0n1/nvme0n1p1
        block = real if (real / "queue").exists() else real.parent
        name = block.name
        rotational = _read(block / "queue/rotational")
    except OSError:
        return "unknown"
    if rotational is None:
        return "unknown"
    if name.startswith("nvme"):
        return "nvme"
    return "hdd" if rotational == "1" else "ssd"


def _parse_rate(rate: str) -> float:
    try:
        return float(rate.split()[0])
    except (IndexError, ValueError):
        return 0.0


def infiniband_ports(root: Path = Path("/")) -> list[IbPort]:
    base = root / "sys/class/infiniband"
    ports: list[IbPort] = []
    if not base.is_dir():
        return ports
    for hca in sorted(base.iterdir()):
        for port in sorted((hca / "ports").glob("*")):
            state = (_read(port / "state") or "").split(":")[-1].strip()  # "4: ACTIVE"
            rate = _read(port / "rate") or ""
            ports.append(IbPort(hca.name, port.name, state, rate, _parse_rate(rate), _read(port / "link_layer") or ""))
    return ports


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def probe_host(store_path: Path, root: Path = Path("/")) -> Host:
    model, flags = cpu_info(root)
    vm = psutil.virtual_memory()
    where = _existing_parent(store_path)
    usage = shutil.disk_usage(where)
    shm = shutil.disk_usage(root / "dev/shm").total if (root / "dev/shm").exists() else None
    return Host(
        cpu_model=model,
        cores_physical=psutil.cpu_count(logical=False) or os.cpu_count() or 1,
        cores_logical=psutil.cpu_count() or 1,
        cpu_flags=flags,
        ram_total=vm.total,
        ram_available=vm.available,
        cgroup_limit=cgroup_memory_limit(root),
        shm_total=shm,
        store_path=str(store_path),
        disk_free=usage.free,
        disk_total=usage.total,
        disk_kind=disk_kind(where, root),
        infiniband=infiniband_ports(root),
    )
