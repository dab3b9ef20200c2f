"""GPUs through NVML (the nvidia-ml-py package, imported as `pynvml`).

The NVML module is the one narrow seam: `probe_gpus(nvml=...)` takes any object
with pynvml's functions, so tests drive this code with recorded hardware
snapshots (tests/snapshots/) while doctor uses the real library. Every NVML
failure becomes a Finding with a fix; nothing here raises.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from typing import Any

# NVML error codes (pynvml.NVML_ERROR_*), with the fix a user needs.
_INIT_FIXES: dict[int, tuple[str, str]] = {
    12: ("NVML library not found (no NVIDIA driver, or a container started without GPUs)",
         "install the NVIDIA driver, or start the container with --gpus all / the NVIDIA container toolkit"),
    9: ("NVIDIA driver is not loaded",
        "load it with `sudo modprobe nvidia` or reboot; check `nvidia-smi`"),
    18: ("NVIDIA driver and library versions do not match (driver upgraded without a reboot)",
         "reboot, or reload the kernel module: `sudo rmmod nvidia_uvm nvidia_drm nvidia_modeset nvidia && sudo modprobe nvidia`"),
    4: ("no permission to talk to the NVIDIA driver",
        "run as a user in the `video` group or check /dev/nvidia* permissions"),
    13: ("the NVIDIA driver is too old for this NVML call",
         "upgrade the NVIDIA driver"),
    15: ("a GPU has fallen off the bus (GPU is lost)",
         "check `dmesg` for Xid errors, then reset the GPU or reboot"),
}
# Per-direction NVLink bandwidth of one link, GB/s, by compute capability major.
# NVLink 2-4 (V100, A100, H100) run 25 GB/s each way per link; NVLink 5
# (Blackwell) doubles it. We count active links rather than trusting
# nvmlDeviceGetNvLinkVersion, which returns an enum, not a speed.
_NVLINK_GBPS_PER_DIRECTION = {7: 25, 8: 25, 9: 25, 10: 50}
_MAX_NVLINKS = 18  # NVML_NVLINK_MAX_LINKS


@dataclass
class Finding:
    level: str  # pass | warn | fail | info
    check: str
    message: str
    fix: str = ""


@dataclass
class GpuProcess:
    pid: int
    used_memory: int | None


@dataclass
class Gpu:
    index: int
    name: str
    uuid: str
    pci_bus_id: str
    memory_total: int
    memory_free: int
    compute_capability: str | None = None
    pcie_gen_max: int | None = None
    pcie_gen_current: int | None = None
    pcie_width_max: int | None = None
    pcie_width_current: int | None = None
    mig_enabled: bool | None = None
    mig_pending: bool | None = None
    ecc_enabled: bool | None = None
    ecc_uncorrected_errors: int | None = None
    temperature_c: int | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    processes: list[GpuProcess] = field(default_factory=list)
    nvlink_active_links: int = 0
    nvlink_bandwidth_gbps: float = 0.0  # both directions, all active links
    fabric_state: str | None = None  # NVSwitch fabric: completed / in_progress / not_started

    @property
    def cc_major(self) -> int:
        return int(self.compute_capability.split(".")[0]) if self.compute_capability else 0

    @property
    def supports_bf16(self) -> bool:
        return self.cc_major >= 8

    @property
    def supports_fp8(self) -> bool:
        return self.compute_capability is not None and tuple(map(int, self.compute_capability.split("."))) >= (8, 9)


@dataclass
class GpuReport:
    available: bool
    driver_version: str | None = None
    cuda_driver_version: str | None = None
    gpus: list[Gpu] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _code(exc: Exception) -> int | None:
    return getattr(exc, "value", None)


def _load_real_nvml() -> Any:
    import pynvml  # nvidia-ml-py; imports without a GPU, fails only at nvmlInit

    return pynvml


def probe_gpus(nvml: Any = None) -> GpuReport:
    """Read every GPU NVML can see. `nvml` is the seam (default: the real pynvml)."""
    try:
        nvml = nvml or _load_real_nvml()
    except ImportError:
        return GpuReport(False, findings=[Finding("warn", "nvml", "nvidia-ml-py is not installed",
                                                  "pip install nvidia-ml-py")])
    try:
        nvml.nvmlInit()
    except Exception as exc:  # NVMLError and its per-code subclasses
        msg, fix = _INIT_FIXES.get(_code(exc), (f"NVML failed to start: {exc}", "check `nvidia-smi`"))
        level = "info" if _code(exc) == 12 else "fail"
        return GpuReport(False, findings=[Finding(level, "nvml", msg, fix)])
    report = GpuReport(True)
    try:
        report.driver_version = _text(nvml.nvmlSystemGetDriverVersion())
        cuda = nvml.nvmlSystemGetCudaDriverVersion_v2()  # e.g. 12040 -> 12.4
        report.cuda_driver_version = f"{cuda // 1000}.{cuda % 1000 // 10}"
        count = nvml.nvmlDeviceGetCount()
        for index in range(count):
            report.gpus.append(_probe_one(nvml, index, report.findings))
    except Exception as exc:
        msg, fix = _INIT_FIXES.get(_code(exc), (f"NVML query failed: {exc}", "check `nvidia-smi`"))
        report.findings.append(Finding("fail", "nvml", msg, fix))
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass
    return report


def _optional(findings: list[Finding], what: str, index: int, fn, *args):
    """Call an NVML getter that a GPU or driver may not support."""
    try:
        return fn(*args)
    except Exception as exc:
        code = _code(exc)
        if code in (3, 13):  # NOT_SUPPORTED, FUNCTION_NOT_FOUND: normal on some GPUs
            return None
        if code == 4:
            findings.append(Finding("warn", f"gpu{index}.{what}", f"GPU {index}: no permission to read {what}",
                                    "run doctor as root or with access to /dev/nvidia*"))
            return None
        findings.append(Finding("warn", f"gpu{index}.{what}", f"GPU {index}: reading {what} failed: {exc}"))
        return None


def _probe_one(nvml: Any, index: int, findings: list[Finding]) -> Gpu:
    h = nvml.nvmlDeviceGetHandleByIndex(index)
    mem = nvml.nvmlDeviceGetMemoryInfo(h)
    gpu = Gpu(
        index=index,
        name=_text(nvml.nvmlDeviceGetName(h)),
        uuid=_text(nvml.nvmlDeviceGetUUID(h)),
        pci_bus_id=_text(nvml.nvmlDeviceGetPciInfo(h).busId),
        memory_total=int(mem.total),
        memory_free=int(mem.free),
    )
    opt = lambda what, fn, *a: _optional(findings, what, index, fn, *a)  # noqa: E731
    cc = opt("compute capability", nvml.nvmlDeviceGetCudaComputeCapability, h)
    gpu.compute_capability = f"{cc[0]}.{cc[1]}" if cc else None
    gpu.pcie_gen_max = opt("pcie", nvml.nvmlDeviceGetMaxPcieLinkGeneration, h)
    gpu.pcie_gen_current = opt("pcie", nvml.nvmlDeviceGetCurrPcieLinkGeneration, h)
    gpu.pcie_width_max = opt("pcie", nvml.nvmlDeviceGetMaxPcieLinkWidth, h)
    gpu.pcie_width_current = opt("pcie", nvml.nvmlDeviceGetCurrPcieLinkWidth, h)
    mig = opt("mig", nvml.nvmlDeviceGetMigMode, h)
    if mig:
        gpu.mig_enabled, gpu.mig_pending = bool(mig[0]), bool(mig[1])
    ecc = opt("ecc", nvml.nvmlDeviceGetEccMode, h)
    if ecc:
        gpu.ecc_enabled = bool(ecc[0])
        if gpu.ecc_enabled:
            gpu.ecc_uncorrected_errors = opt("ecc", nvml.nvmlDeviceGetTotalEccErrors, h,
                                             nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nvml.NVML_VOLATILE_ECC)
    gpu.temperature_c = opt("temperature", nvml.nvmlDeviceGetTemperature, h, nvml.NVML_TEMPERATURE_GPU)
    power = opt("power", nvml.nvmlDeviceGetPowerUsage, h)
    limit = opt("power", nvml.nvmlDeviceGetEnforcedPowerLimit, h)
    gpu.power_w = power / 1000 if power is not None else None
    gpu.power_limit_w = limit / 1000 if limit is not None else None
    procs = opt("processes", nvml.nvmlDeviceGetComputeRunningProcesses, h) or []
    gpu.processes = [GpuProcess(int(p.pid), getattr(p, "usedGpuMemory", None)) for p in procs]
    gpu.nvlink_active_links = _count_nvlinks(nvml, h)
    per_dir = _NVLINK_GBPS_PER_DIRECTION.get(gpu.cc_major, 25)
    gpu.nvlink_bandwidth_gbps = float(gpu.nvlink_active_links * per_dir * 2)
    gpu.fabric_state = _fabric_state(nvml, h)
    return gpu


def _count_nvlinks(nvml: Any, handle: Any) -> int:
    active = 0
    for link in range(_MAX_NVLINKS):
        try:
            if nvml.nvmlDeviceGetNvLinkState(handle, link) == nvml.NVML_FEATURE_ENABLED:
                active += 1
        except Exception:
            # Absent links raise NOT_SUPPORTED / INVALID_ARGUMENT: not active.
            continue
    return active


_FABRIC_STATES = {0: None, 1: "not_started", 2: "in_progress", 3: "completed"}


def _fabric_state(nvml: Any, handle: Any) -> str | None:
    """NVSwitch fabric registration (HGX systems). Without nvidia-fabricmanager it
    never completes and CUDA init fails with error 802."""
    try:
        info = nvml.c_nvmlGpuFabricInfo_t()
        nvml.nvmlDeviceGetGpuFabricInfo(handle, ctypes.byref(info))
        return _FABRIC_STATES.get(int(info.state))
    except Exception:
        return None
