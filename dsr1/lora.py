"""LoRA adapters (peft's format): read, check against a base model, load for the embedded engine.

An adapter directory holds `adapter_config.json` (r, lora_alpha, target_modules, ...) and
`adapter_model.safetensors` with one lora_A [r, in] and lora_B [out, r] pair per targeted
projection. Pickled weights (`adapter_model.bin`) are refused, as for models.

`check(adapter, base)` compares every pair's shape with the base model's config (hidden size,
heads, KV heads, intermediate size, layer count), so an adapter trained for another model is a
clear error before anything is served, not garbage output. The embedded engine applies each
row's adapter on top of the shared base weights (dsr1.serve.fastpath), so requests for different
adapters and the base model share one batch, as vLLM and S-LoRA do.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from dsr1.errors import ConfigError, IntegrityError, NotFoundError, UsageError

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
# the projections of a Llama/Qwen2 decoder layer the embedded engine can adapt
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KEY = re.compile(r"layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$")


@dataclass
class Adapter:
    path: Path
    r: int
    alpha: float
    targets: list[str]
    base_model: str | None  # adapter_config's base_model_name_or_path: informative only
    rslora: bool = False
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # tensor key -> shape

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r


def resolve(ref: str) -> Path:
    """An adapter directory, or a stored adapter's name (`dsr1 pull ADAPTER --base MODEL`)."""
    p = Path(ref).expanduser()
    if p.is_dir():
        return p.resolve()
    from dsr1 import store

    m = store.find(ref)
    if m is not None and m.kind == "lora":
        return Path(m.model_dir)
    if m is not None:
        raise UsageError(f"{ref} is a stored model, not a LoRA adapter", hint="pass an adapter directory or name")
    raise NotFoundError(f"no LoRA adapter {ref!r}: neither a directory nor a stored adapter",
                        hint="pull it first: `dsr1 pull ADAPTER --base MODEL`, or pass its directory")


def is_adapter(path: Path) -> bool:
    return (path / CONFIG).is_file()


def read(path: Path) -> Adapter:
    """The adapter at `path` (a directory), with its tensors' shapes; errors say what is wrong."""
    path = Path(path).expanduser()
    if not (path / CONFIG).is_file():
        raise NotFoundError(f"{path} has no {CONFIG}: not a LoRA adapter", hint="pass the folder peft's "
                                                                               "save_pretrained wrote")
    try:
        cfg = json.loads((path / CONFIG).read_text())
    except ValueError as e:
        raise ConfigError(f"{path / CONFIG} is not valid JSON: {e}") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"{path} is a {cfg.get('peft_type')} adapter; only LoRA is supported")
    if not (path / WEIGHTS).is_file():
        if (path / "adapter_model.bin").is_file():
            raise UsageError(f"{path} has pickled weights (adapter_model.bin) only",
                             hint="convert it to safetensors (peft: save_pretrained(..., safe_serialization=True))")
        raise NotFoundError(f"{path} has no {WEIGHTS}")
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):  # a regex in peft's config
        raise ConfigError(f"{path}: target_modules is a pattern ({targets!r}); list the modules",
                          hint=f"dsr1 supports {', '.join(MODULES)}")
    bad = sorted(set(targets) - set(MODULES))
    if bad:
        raise ConfigError(f"{path} adapts {', '.join(bad)}, which the embedded engine does not",
                          hint=f"supported: {', '.join(MODULES)}; or serve it with --engine vllm")
    for flag in ("fan_in_fan_out", "use_dora"):
        if cfg.get(flag):
            raise ConfigError(f"{path}: {flag} adapters are not supported")
    if cfg.get("bias", "none") != "none" or cfg.get("modules_to_save"):
        raise ConfigError(f"{path} trains biases or whole modules besides LoRA; not supported")
    from safetensors import safe_open

    shapes = {}
    with safe_open(str(path / WEIGHTS), framework="pt") as f:
        for k in f.keys():
            shapes[k] = tuple(f.get_slice(k).get_shape())
    return Adapter(path=path, r=int(cfg["r"]), alpha=float(cfg.get("lora_alpha", cfg["r"])), targets=list(targets),
                   base_model=cfg.get("base_model_name_or_path"), rslora=bool(cfg.get("use_rslora")), shapes=shapes)


def _dims(base_cfg: dict) -> tuple[int, dict[str, tuple[int, int]]]:
    """(layers, {module: (in, out)}) of a Llama/Qwen2 config."""
    hidden = base_cfg["hidden_size"]
    heads = base_cfg["num_attention_heads"]
    kv = base_cfg.get("num_key_value_heads") or heads
    hd = base_cfg.get("head_dim") or hidden // heads
    inter = base_cfg["intermediate_size"]
    return base_cfg["num_hidden_layers"], {
        "q_proj": (hidden, heads * hd), "k_proj": (hidden, kv * hd), "v_proj": (hidden, kv * hd),
        "o_proj": (heads * hd, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
        "down_proj": (inter, hidden)}


def check(adapter: Adapter, base_dir: Path) -> None:
    """Refuse an adapter whose tensors do not fit the base model at `base_dir`."""
    cfg_path = Path(base_dir) / "config.json"
    try:
        base_cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the base model's config {cfg_path}: {e}") from None
    arch = base_cfg.get("model_type")
    if arch not in ("llama", "qwen2"):
        raise ConfigError(f"LoRA on the embedded engine covers Llama and Qwen2 bases; {base_dir} is {arch!r}",
                          hint="serve it with --engine vllm, which has its own LoRA support")
    layers, dims = _dims(base_cfg)
    where = f"adapter {adapter.path} does not fit base model {base_dir}"
    seen = 0
    for key, shape in adapter.shapes.items():
        m = _KEY.search(key)
        if not m:
            raise ConfigError(f"{where}: unexpected tensor {key}")
        layer, module, ab = int(m.group(1)), m.group(3), m.group(4)
        if layer >= layers:
            raise ConfigError(f"{where}: it adapts layer {layer}, the base has {layers} layers",
                              hint="use the adapter with the base model it was trained on")
        if module not in dims:
            raise ConfigError(f"{where}: unknown module {module}")
        fan_in, fan_out = dims[module]
        want = (adapter.r, fan_in) if ab == "A" else (fan_out, adapter.r)
        if tuple(shape) != want:
            raise ConfigError(f"{where}: {key} is {list(shape)}, the base needs {list(want)} "
                              f"(hidden size {base_cfg['hidden_size']}, intermediate {base_cfg['intermediate_size']})",
                              hint="use the adapter with the base model it was trained on")
        seen += 1
    if not seen:
        raise IntegrityError(f"{adapter.path / WEIGHTS} holds no LoRA tensors")


def load(adapter: Adapter, *, layers: int, dtype, device) -> list[dict[str, tuple]]:
    """Per layer, {module: (A [r, in], B*scale [out, r])} as tensors on `device` in `dtype`."""
    from safetensors.torch import load_file

    raw = load_file(str(adapter.path / WEIGHTS), device="cpu")
    out: list[dict[str, dict[str, object]]] = [{} for _ in range(layers)]
    for key, t in raw.items():
        m = _KEY.search(key)
        if m:
            out[int(m.group(1))].setdefault(m.group(3), {})[m.group(4)] = t
    per_layer = []
    for d in out:
        per_layer.append({mod: (ab["A"].to(device=device, dtype=dtype),
                                (ab["B"].float() * adapter.scale).to(device=device, dtype=dtype))
                          for mod, ab in d.items() if "A" in ab and "B" in ab})
    return per_layer


def parse_specs(specs: list[str]) -> list[tuple[str, str]]:
    """`--lora NAME=ADAPTER` values as (name, adapter); names unique."""
    out: list[tuple[str, str]] = []
    for s in specs:
        name, sep, ref = s.partition("=")
        if not sep or not name.strip() or not ref.strip():
            raise UsageError(f"--lora {s!r}: expected NAME=ADAPTER", hint="e.g. --lora sql=./sql-adapter")
        if name in {n for n, _ in out}:
            raise UsageError(f"--lora name {name!r} given twice")
        out.append((name.strip(), ref.strip()))
    return out


def merge(base_dir: Path, adapter_dir: Path, out: Path) -> Path:
    """The base model with the adapter merged into its weights (peft's merge_and_unload), saved as
    safetensors with the base's tokenizer: one fixed fine-tune at the base model's full speed."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto")
    dtype = model.dtype
    merged = PeftModel.from_pretrained(model.float(), adapter_dir).merge_and_unload()  # merged in fp32
    merged.to(dtype).save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
    return out
