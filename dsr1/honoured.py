"""Which engines honour each `dsr1 serve` setting that not every engine has.

A setting given on the command line (or to `Deployer.serve`) that the planned engine cannot honour
is a usage error, in `--dry-run` as in a real run, instead of being dropped without a word.
Settings not listed here reach every engine (the front's: host, port, API key, queue, reasoning
field, audit log; the plan's: context, concurrency, memory share, parallel sizes as each engine
takes them).
"""

from __future__ import annotations

from dsr1.errors import UsageError

ALL = ("embedded", "vllm", "sglang", "llamacpp")
ENGINES: dict[str, tuple[str, ...]] = {
    # the embedded engine's own machinery
    "speculative": ("embedded",),
    "draft_model": ("embedded",),
    "num_speculative_tokens": ("embedded",),
    "prefix_cache_mb": ("embedded",),
    "prefill_chunk": ("embedded",),
    "stream_interval": ("embedded",),
    "fast_path": ("embedded",),
    "compile": ("embedded",),
    "max_memory": ("embedded",),
    "offload_dir": ("embedded",),
    "device_map": ("embedded",),
    "guard": ("embedded",),  # [13/14] brings guards to the front of every engine
    "guard_plugin": ("embedded",),
    # the external engines' flags
    "max_batched_tokens": ("vllm", "sglang", "llamacpp"),
    "engine_python": ("vllm", "sglang"),
    "tensor_parallel": ("vllm", "sglang"),
    "pipeline_parallel": ("vllm", "sglang"),
    "data_parallel": ("vllm", "sglang"),
    "threads": ("embedded", "llamacpp"),
    "lora": ("embedded", "vllm", "sglang"),
}


# values that ask nothing of an engine (the setting's "off"): given or not, any engine honours them
NEUTRAL = {"compile": ("off", "auto", None), "fast_path": (True,), "speculative": ("off",), "lora": ((), [])}


def asked(given: dict) -> list[str]:
    """The names in `given` (name -> value as given) that ask something of the engine."""
    return [n for n, v in given.items() if v not in NEUTRAL.get(n, ())]


def embedded_only(given: dict) -> list[str]:
    """The settings in `given` only the embedded engine honours: with --engine auto they choose it."""
    return [n for n in asked(given) if ENGINES.get(n) == ("embedded",)]


def check(engine: str, given: dict) -> None:
    """Refuse the settings in `given` (name -> value, names as `dsr1 serve`'s parameters) that `engine`
    cannot honour."""
    bad = sorted(n for n in asked(given) if engine not in ENGINES.get(n, ALL))
    if not bad:
        return
    flags = ", ".join("--" + n.replace("_", "-") for n in bad)
    takers = sorted({e for n in bad for e in ENGINES[n]})
    raise UsageError(f"{flags} cannot be honoured by {engine}: {'it is' if len(bad) == 1 else 'they are'} "
                     f"for {' and '.join(takers)}", hint=f"drop {flags}, or choose an engine that takes "
                     f"{'it' if len(bad) == 1 else 'them'} with --engine")
