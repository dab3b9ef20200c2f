"""bitsandbytes quantization (int8, nf4) of a model directory, checked by reloading it.

A quantized model is only good if it survives save and reload. That is not a given:
with bitsandbytes 0.50.2 on a CPU with AVX512-BF16, the first forward pass of an nf4
model repacks each 4-bit weight and keeps its absmax scales transposed in bf16; on
save_pretrained bitsandbytes undoes the weight repacking but restores the scales only
when double quantization is on, so file and in-memory model both end up wrong (mean
NLL 16.5 instead of 2.5 on the demo model). Two defences here:
  * nf4 uses double quantization, with which the round trip is right;
  * two checks before anything is stored, on a fixed English paragraph: (A) the reloaded
    directory's logits equal the in-memory model's (after save), and (B) its mean NLL is
    within 5% of the in-memory model's before save, so a save that corrupts the in-memory
    model as well cannot hide. This is the guard for the next such bug;
    tests/test_pull_models.py fires it with the real bug above.

Peak memory: transformers quantizes each weight as it is loaded, so the process holds
the quantized model plus one checkpoint shard in 16-bit, then the reloaded copy for the
check: about 2x the quantized size + the largest shard (measured in docs/performance.md).
"""

from __future__ import annotations

import importlib.metadata
import resource
import shutil
from dataclasses import dataclass
from pathlib import Path

from dsr1.errors import HardwareError, IntegrityError, UsageError

METHODS = ("none", "int8", "nf4")
# Reloaded logits must match in-memory ones this closely (same kernels, same weights: in
# practice they are identical; a broken round trip is off by whole units).
LOGIT_ATOL = 1e-2
# Reloaded mean NLL vs the in-memory model before save: the real nf4 bug moved it 2.47 -> 16.9.
NLL_RTOL = 0.05
# Bytes of output per byte of 16-bit input, for the disk preflight (weights dominate).
OUTPUT_RATIO = {"none": 0.0, "int8": 0.55, "nf4": 0.32}

NLL_TEXT = (
    "The history of science is the study of the development of science and scientific knowledge, "
    "including both the natural and social sciences. Science is a body of empirical, theoretical, and "
    "practical knowledge about the natural world, produced by scientists who emphasize the observation, "
    "explanation, and prediction of real-world phenomena. Over the centuries, people in many places "
    "made careful records of the stars, invented tools to measure time and distance, and wrote down "
    "what they learned so that others could test it and build upon it."
)


@dataclass
class QuantResult:
    method: str
    out_dir: str
    size_bytes: int
    memory_bytes: int  # model.get_memory_footprint() after quantization
    max_logit_diff: float  # reloaded vs in-memory (after save) on NLL_TEXT
    nll_before_save: float  # mean NLL of NLL_TEXT, in memory, before save
    nll_after_reload: float
    peak_rss_bytes: int


def bnb_config(method: str, double_quant: bool = True):
    from transformers import BitsAndBytesConfig
    import torch

    if method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if method == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                                  bnb_4bit_compute_dtype=torch.bfloat16)
    raise UsageError(f"unknown quantization {method!r}", hint=f"use --quant {'|'.join(METHODS)}")


def _check_bnb() -> None:
    try:
        importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        raise HardwareError("bitsandbytes is not installed, so --quant int8/nf4 cannot run",
                            hint="pip install bitsandbytes, or pull with --quant none") from None


def _forward(model, tok, text: str = NLL_TEXT):
    """(mean NLL, logits) of one forward pass over text."""
    import torch

    ids = tok(text, return_tensors="pt").input_ids.to(model.device)
    with torch.no_grad():
        out = model(ids, labels=ids)
    return float(out.loss), out.logits.float().cpu()


def mean_nll(model, tok, text: str = NLL_TEXT) -> float:
    """Mean negative log-likelihood per token of `text` (lower is better)."""
    import torch

    ids = tok(text, return_tensors="pt").input_ids.to(model.device)
    with torch.no_grad():
        out = model(ids, labels=ids)
    return float(out.loss)


def load(model_dir: Path, method: str = "none", double_quant: bool = True):
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": torch.bfloat16}
    if method != "none":
        kwargs["quantization_config"] = bnb_config(method, double_quant)
        kwargs["device_map"] = "cuda:0" if torch.cuda.is_available() else "cpu"
    return AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)


def load_quantized(model_dir: Path):
    """Load a saved bitsandbytes model: its quantization config comes from its config.json."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16,
                                                device_map="cuda:0" if torch.cuda.is_available() else "cpu")


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def quantize(src_dir: Path, out_dir: Path, method: str, *, double_quant: bool = True) -> QuantResult:
    """Quantize the model at src_dir into out_dir (which must not exist), then prove the round trip."""
    if method not in ("int8", "nf4"):
        raise UsageError(f"unknown quantization {method!r}", hint="use --quant int8 or --quant nf4")
    _check_bnb()
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src_dir)
    try:
        model = load(src_dir, method, double_quant)
    except (RuntimeError, NotImplementedError, ImportError) as exc:
        raise HardwareError(f"bitsandbytes cannot quantize to {method} on this device: {exc}",
                            hint="pull with --quant none (bf16), or use a CUDA GPU; for CPU-only 4-bit "
                                 "inference a GGUF model (`dsr1 pull FILE.gguf`) also works") from None
    memory = int(model.get_memory_footprint())
    out_dir.mkdir(parents=True)
    try:
        # Two checks (see the module docstring). B: the model as quantized, before save, sets the
        # quality bar; a save that corrupts the in-memory model too cannot hide from it.
        nll_before, _ = _forward(model, tok)
        model.save_pretrained(out_dir)
        tok.save_pretrained(out_dir)
        for extra in ("generation_config.json", "chat_template.jinja"):
            if (src_dir / extra).is_file() and not (out_dir / extra).exists():
                shutil.copy2(src_dir / extra, out_dir / extra)
        # A: the file must reproduce the in-memory model exactly (same kernels, same weights).
        _, mem_logits = _forward(model, tok)
        del model
        reloaded = load_quantized(out_dir)
        nll_after, file_logits = _forward(reloaded, tok)
        diff = float((mem_logits - file_logits).abs().max())
        drift = abs(nll_after - nll_before) / nll_before
        if not torch.isfinite(file_logits).all() or diff > LOGIT_ATOL or drift > NLL_RTOL:
            raise IntegrityError(
                f"the saved {method} model does not reproduce the in-memory one (max logit difference {diff:.3g}, "
                f"NLL {nll_before:.3f} before save, {nll_after:.3f} after reload)",
                hint="nothing was stored; pull with --quant none, or try the other --quant; "
                     "this is a bitsandbytes save/reload bug worth reporting with your versions")
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return QuantResult(method=method, out_dir=str(out_dir), size_bytes=_dir_size(out_dir), memory_bytes=memory,
                       max_logit_diff=diff, nll_before_save=nll_before, nll_after_reload=nll_after,
                       peak_rss_bytes=peak)
