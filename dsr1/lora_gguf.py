"""LoRA adapters for llama-server, which reads them as GGUF files (`--lora FILE`).

A GGUF adapter (`general.type = "adapter"`, `adapter.type = "lora"`) is used as it is. A PEFT
adapter (the safetensors folder vLLM, SGLang and the embedded engine take) is converted once with
llama.cpp's own `convert_lora_to_gguf.py`, kept by `dsr1 engine install llamacpp` beside its HF
converter (ENGINE_DIR/convert), so the file is one this llama-server reads. The converter needs the
base model's config.json (not its weights): the adapter's `base_model_name_or_path` when that is a
folder here, else the stored model's embedded copy. Converted files are kept under
DSR1_HOME/cache/lora-gguf, named by the adapter's content, and written atomically.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from dsr1.errors import NotFoundError, ServerError, UsageError


def is_gguf_adapter(path: Path) -> bool:
    from dsr1 import gguf_meta

    try:
        with open(path, "rb") as f:
            fields = gguf_meta.parse(f.read(1 << 20), tensors=False).fields
    except (OSError, ValueError):
        return False
    kind = fields.get("general.type")
    adapter = fields.get("adapter.type")
    return bool(kind and kind.value == "adapter" and adapter and adapter.value == "lora")


def converted_path(adapter_dir: Path) -> Path:
    """Where the GGUF of a PEFT adapter goes: named by its config's and weights' bytes."""
    from dsr1 import settings

    h = hashlib.sha256()
    for f in sorted(adapter_dir.glob("adapter_*")):
        if f.is_file():
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return settings.home() / "cache" / "lora-gguf" / f"{adapter_dir.name}-{h.hexdigest()[:16]}.gguf"


def base_config_dir(adapter, model_dirs: list[Path]) -> Path:
    """A folder with the base model's config.json, for the converter."""
    candidates = ([Path(adapter.base_model).expanduser()] if adapter.base_model else []) + model_dirs
    for d in candidates:
        if (d / "config.json").is_file():
            return d
    raise UsageError(f"--lora {adapter.path}: llama-server takes GGUF adapters, and converting this PEFT adapter "
                     f"needs its base model's config.json, which is not here (adapter_config.json names "
                     f"{adapter.base_model!r})",
                     hint="pass a GGUF adapter (convert_lora_to_gguf.py --base BASE_DIR), or serve the safetensors "
                          "model with --engine embedded or vllm")


def converter(binary: str | None = None) -> Path:
    """llama.cpp's convert_lora_to_gguf.py from the install that runs: beside its llama-server binary
    (ENGINE_DIR/bin/llama-server -> ENGINE_DIR/convert), else dsr1's own engine folder."""
    import shutil

    from dsr1.engines import envs

    places = []
    found = shutil.which(binary) if binary else None
    if found:
        places.append(Path(found).resolve().parent.parent / "convert")
    places.append(envs.engine_dir("llamacpp") / "convert")
    for d in places:
        if (d / "convert_lora_to_gguf.py").is_file():
            return d / "convert_lora_to_gguf.py"
    raise NotFoundError(f"llama.cpp's convert_lora_to_gguf.py is not in {' or '.join(map(str, places))}",
                        hint="install llama.cpp with `dsr1 engine install llamacpp` (it keeps its converters), "
                             "or pass a GGUF adapter")


def convert(adapter_dir: Path, base_dir: Path, out: Path, progress=lambda m: None, binary: str | None = None) -> Path:
    """The PEFT adapter at `adapter_dir` as a GGUF at `out` (kept when already there)."""
    if out.is_file():
        return out
    script = converter(binary)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    progress(f"converting LoRA adapter {adapter_dir} to GGUF for llama-server")
    r = subprocess.run([sys.executable, str(script), "--base", str(base_dir), "--outtype", "f32", "--outfile",
                        str(tmp), str(adapter_dir)], capture_output=True, text=True, timeout=1800)
    if r.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-12:])
        raise ServerError(f"llama.cpp's convert_lora_to_gguf.py failed on {adapter_dir}:\n{tail}",
                          hint="check the adapter matches the base model (`dsr1 pull ADAPTER --base MODEL` checks)")
    os.replace(tmp, out)
    return out
