"""A stand-in for the pynvml module, serving a recorded hardware snapshot.

This is the one test double in the doctor tests: real NVML cannot exist on a
machine without NVIDIA GPUs. It sits at the single seam `probe_gpus(nvml=...)`
and raises the real pynvml.NVMLError subclasses, so the code under test handles
exactly the exceptions the real library raises.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pynvml

SNAPSHOTS = Path(__file__).parent / "snapshots"


def load_snapshot(name: str) -> dict:
    return json.loads((SNAPSHOTS / f"{name}.json").read_text())


class FakeNvml:
    NVMLError = pynvml.NVMLError
    NVML_FEATURE_ENABLED = pynvml.NVML_FEATURE_ENABLED
    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
    NVML_VOLATILE_ECC = pynvml.NVML_VOLATILE_ECC
    c_nvmlGpuFabricInfo_t = pynvml.c_nvmlGpuFabricInfo_t

    def __init__(self, snapshot: dict):
        self.s = snapshot["nvml"]
        self.shutdown_called = False

    def _gpu(self, h) -> dict:
        return self.s["gpus"][h]

    @staticmethod
    def _unsupported():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

    def nvmlInit(self):
        if self.s.get("init_error"):
            raise pynvml.NVMLError(self.s["init_error"])

    def nvmlShutdown(self):
        self.shutdown_called = True

    def nvmlSystemGetDriverVersion(self):
        return self.s["driver"]

    def nvmlSystemGetCudaDriverVersion_v2(self):
        return self.s["cuda"]

    def nvmlDeviceGetCount(self):
        return len(self.s["gpus"])

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, h):
        return self._gpu(h)["name"]

    def nvmlDeviceGetUUID(self, h):
        return self._gpu(h)["uuid"]

    def nvmlDeviceGetPciInfo(self, h):
        return SimpleNamespace(busId=self._gpu(h)["bus_id"].encode())

    def nvmlDeviceGetMemoryInfo(self, h):
        g = self._gpu(h)
        return SimpleNamespace(total=g["memory_total"], free=g["memory_free"], used=g["memory_total"] - g["memory_free"])

    def nvmlDeviceGetCudaComputeCapability(self, h):
        return tuple(self._gpu(h)["cc"])

    def nvmlDeviceGetMaxPcieLinkGeneration(self, h):
        return self._gpu(h)["pcie"]["gen_max"]

    def nvmlDeviceGetCurrPcieLinkGeneration(self, h):
        return self._gpu(h)["pcie"]["gen_cur"]

    def nvmlDeviceGetMaxPcieLinkWidth(self, h):
        return self._gpu(h)["pcie"]["width_max"]

    def nvmlDeviceGetCurrPcieLinkWidth(self, h):
        return self._gpu(h)["pcie"]["width_cur"]

    def nvmlDeviceGetMigMode(self, h):
        return tuple(self._gpu(h)["mig"]) if self._gpu(h).get("mig") else self._unsupported()

    def nvmlDeviceGetEccMode(self, h):
        return tuple(self._gpu(h)["ecc"]) if self._gpu(h).get("ecc") else self._unsupported()

    def nvmlDeviceGetTotalEccErrors(self, h, error_type, counter_type):
        return self._gpu(h)["ecc_uncorrected"]

    def nvmlDeviceGetUtilizationRates(self, h):
        # not in the recorded snapshots (it changes by the second): a test sets "utilization"
        u = self._gpu(h).get("utilization")
        return SimpleNamespace(gpu=u, memory=0) if u is not None else self._unsupported()

    def nvmlDeviceGetTemperature(self, h, sensor):
        return self._gpu(h)["temperature"]

    def nvmlDeviceGetPowerUsage(self, h):
        return self._gpu(h)["power_mw"]

    def nvmlDeviceGetEnforcedPowerLimit(self, h):
        return self._gpu(h)["power_limit_mw"]

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return [SimpleNamespace(pid=p, usedGpuMemory=m) for p, m in self._gpu(h)["processes"]]

    def nvmlDeviceGetNvLinkState(self, h, link):
        active = self._gpu(h)["nvlink_active"]
        if active == 0 or link >= 18:
            self._unsupported()
        return pynvml.NVML_FEATURE_ENABLED if link < active else 0

    def nvmlDeviceGetGpuFabricInfo(self, h, ref):
        state = self._gpu(h).get("fabric_state")
        if state is None:
            self._unsupported()
        ref._obj.state = state  # ctypes.byref(struct): write through like the C call
        return 0
