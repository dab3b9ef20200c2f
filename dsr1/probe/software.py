"""Installed inference software, read from package metadata without importing it
(importing torch alone costs seconds; doctor must stay under half a second)."""

from __future__ import annotations

import platform
import re
from dataclasses import dataclass, field
from importlib import metadata

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
    """Read `cuda = '12.4'` from torch/version.py as a file, without importing torch."""
    try:
        dist = metadata.distribution("torch")
    except metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if str(f).replace("\\", "/") == "torch/version.py":
            try:
                text = f.locate().read_text()
            except OSError:
                return None
            match = re.search(r"^cuda\s*(?::\s*\S+)?\s*=\s*['\"]([^'\"]+)['\"]", text, re.M)
            return match.group(1) if match else None
    return None


def probe_software() -> Software:
    return Software(
        python=platform.python_version(),
        packages={name: _version(name) for name in PACKAGES},
        torch_cuda=torch_cuda_build(),
    )
