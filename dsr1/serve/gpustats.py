"""Per-GPU utilization, memory and temperature for /metrics, read from NVML at scrape time.

The same narrow seam as doctor's probe (dsr1.probe.gpu): `GpuCollector(nvml=...)` takes any
object with pynvml's functions, so tests drive it with the recorded snapshots while the server
uses the real library. NVML reports on the whole device (every process), which is what an
operator watching for a full GPU needs; torch's allocator counters only see this process.

A machine without NVML (CPU-only, or a container started without GPUs) exports no GPU series
at all: absent, not zero, so a dashboard shows "no data" rather than an idle GPU.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("dsr1.serve")


class GpuCollector(Collector):
    def __init__(self, nvml: Any = None):
        if nvml is None:
            import pynvml as nvml
        self.nvml = nvml
        self.handles: list[tuple[str, str, Any]] = []  # (index, uuid, handle)
        try:
            nvml.nvmlInit()
            for i in range(nvml.nvmlDeviceGetCount()):
                h = nvml.nvmlDeviceGetHandleByIndex(i)
                uuid = nvml.nvmlDeviceGetUUID(h)
                self.handles.append((str(i), uuid.decode() if isinstance(uuid, bytes) else uuid, h))
        except nvml.NVMLError as e:  # no driver / no GPU: nothing to export
            log.debug("NVML unavailable (%s); no GPU metrics", e)
            self.handles = []

    @property
    def available(self) -> bool:
        return bool(self.handles)

    def _read(self, fn: str, *args: Any) -> Any:
        try:
            return getattr(self.nvml, fn)(*args)
        except self.nvml.NVMLError:  # one unsupported query (e.g. temperature on some vGPUs) skips that series
            return None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["gpu", "uuid"]
        util = GaugeMetricFamily("dsr1_gpu_utilization_ratio",
                                 "Share of the last NVML sample period a kernel ran on the GPU (0-1)", labels=labels)
        used = GaugeMetricFamily("dsr1_gpu_memory_used_bytes", "GPU memory in use by every process (NVML)",
                                 labels=labels)
        total = GaugeMetricFamily("dsr1_gpu_memory_total_bytes", "GPU memory installed (NVML)", labels=labels)
        temp = GaugeMetricFamily("dsr1_gpu_temperature_celsius", "GPU core temperature (NVML)", labels=labels)
        for idx, uuid, h in self.handles:
            lv = [idx, uuid]
            rates = self._read("nvmlDeviceGetUtilizationRates", h)
            if rates is not None:
                util.add_metric(lv, rates.gpu / 100.0)
            mem = self._read("nvmlDeviceGetMemoryInfo", h)
            if mem is not None:
                used.add_metric(lv, float(mem.used))
                total.add_metric(lv, float(mem.total))
            t = self._read("nvmlDeviceGetTemperature", h, self.nvml.NVML_TEMPERATURE_GPU)
            if t is not None:
                temp.add_metric(lv, float(t))
        if self.handles:
            yield from (util, used, total, temp)
