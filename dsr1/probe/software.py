"""Installed inference software, read from package metadata without importing it
(importing torch alone costs seconds; doctor must stay under half a second)."""

from __future__ import annotations

import importlib.util
import platform
import re
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "transformers", "accelerate", "bitsandbytes", "huggingface-hub", "nvidia-ml-py",
            "vllm", "sglang")


@dataclass
class Software:
    python: str
    packages: dict[str, str | None] = field(default_factory=dict)
    torch_cuda: str | None = None  # CUDA version torch was built with; None = CPU build


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def torch_cuda_build() -> str | None:
    """Read `cuda = '12.4'` from torch/version.py as a file, without importing torch.

    find_spec on a top-level package locates it without executing it; walking
    the distribution's RECORD instead costs ~0.3 s (torch ships 14k files)."""
    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    try:
        text = (Path(list(spec.submodule_search_locations)[0]) / "version.py").read_text()
    except OSError:
        return None
    match = re.search(r"^cuda\s*(?::\s*\S+)?\s*=\s*['\"]([^'\"]+)['\"]", text, re.M)
    return match.group(1) if match else None


def probe_software() -> Software:
    return Software(
        python=platform.python_version(),
        packages={name: _version(name) for name in PACKAGES},
        torch_cuda=torch_cuda_build(),
    )
