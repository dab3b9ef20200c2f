"""Loaded by every Python process benchmarks/_noamx.py starts (it puts this folder first on PYTHONPATH): torch
reports no AMX, as on a CPU without it. vLLM picks its AMX attention and GEMM kernels from
`torch.cpu._is_amx_tile_supported()` (CPUID), not from whether Linux grants the tile state, so with the
state refused alone it would still choose them instead of its AVX-512 path."""

import importlib.machinery
import sys

_AMX_KEYS = ("amx_tile", "amx_bf16", "amx_int8", "amx_fp16", "amx_complex")


class _HideAmx:
    def find_spec(self, name, path=None, target=None):
        if name != "torch.cpu":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            caps = module.get_capabilities
            module.get_capabilities = lambda: {**caps(), **dict.fromkeys(_AMX_KEYS, False)}
            module._is_amx_tile_supported = lambda: False
            module._is_amx_fp16_supported = lambda: False
            module._init_amx = lambda: False

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _HideAmx())
