"""Doctor's core: probe the machine, pick a profile, check it, recommend models.

Returns a Report dataclass; rendering lives in dsr1/commands/doctor.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dsr1 import catalog, fit, profiles, settings
from dsr1.probe.gpu import Finding, GpuReport, probe_gpus
from dsr1.probe.host import Host, probe_host
from dsr1.probe.software import Software, probe_software

GB = 1e9
SCHEMA_VERSION = 1


@dataclass
class Recommendation:
    """One row of doctor's table: `dsr1 serve MODEL --dry-run`'s plan for it, or why there is none."""

    model: str
    repo: str  # the checkpoint the plan loads (the model's own repo when it does not fit)
    precision: str
    fits: bool
    engine: str
    tensor_parallel: int
    memory_gb: float  # one replica's weights + overhead + the KV of one sequence at `context`
    context: int  # the context the plan serves
    max_context: int  # longest single sequence the KV budget holds (capped at the model's own)
    max_sequences: int  # concurrent sequences the plan runs (--max-concurrent)
    reason: str = ""
    command: str = ""
    pipeline_parallel: int = 1
    data_parallel: int = 1
    sequences_at_full_context: int = 0
    placement: str = ""  # a GGUF on llama-server: what goes to which GPU and to RAM (dsr1.gguf_place.describe)


@dataclass
class Report:
    schema_version: int
    machine: profiles.Machine
    profile: str
    profile_source: str  # selected | requested
    rejected_profiles: list[dict[str, Any]]
    gpus: GpuReport
    host: Host
    software: Software
    checks: list[Finding]
    recommendations: list[Recommendation]
    next_command: str
    can_serve: bool
    notes: list[str] = field(default_factory=list)


def recommend(spec: catalog.ModelSpec, profile_name: str | None, gpus: GpuReport, host: Host,
              installed: dict | None = None) -> Recommendation:
    """One row of doctor's table, from the planning function `dsr1 serve` runs (dsr1.plan.make_plan):
    every field equals `dsr1 serve MODEL --dry-run` on the same machine and profile."""
    from dsr1 import plan as planner
    from dsr1.errors import Dsr1Error

    try:
        p = planner.make_plan(spec.name, profile_name, planner.Overrides(engine_port=1), gpus=gpus, host=host,
                              installed=installed)
    except Dsr1Error as exc:
        why = str(exc) + (f" ({exc.hint})" if exc.hint else "")
        return Recommendation(model=spec.name, repo=spec.repo, precision="-", fits=False, engine="-",
                              tensor_parallel=0, memory_gb=0.0, context=0, max_context=0, max_sequences=0, reason=why)
    devices = p.tensor_parallel * p.pipeline_parallel
    one_seq = p.kv_bytes_per_token * p.max_model_len
    memory = (p.weights_bytes_per_device * devices + one_seq * (devices if p.device == "cuda" else 1)
              + (fit.CUDA_OVERHEAD_BYTES * devices if p.device == "cuda" else fit.CPU_RUNTIME_BYTES))
    capacity = p.kv_capacity_tokens * (p.dp_attention if p.dp_attention > 1 else 1)
    fits = p.max_model_len > 0 and not any("does not fit" in w for w in p.warnings)
    placement = ""
    if p.placement:  # GPU shares plus what stays in host RAM
        from dsr1 import gguf_place

        memory = sum(p.placement["gpu_bytes"]) + p.placement["host_bytes"]
        placement = gguf_place.describe(p.placement)
    return Recommendation(
        model=spec.name, repo=p.checkpoint or p.model_path, precision=p.gguf_quant or p.precision, fits=fits,
        engine=p.engine, placement=placement,
        tensor_parallel=p.tensor_parallel, pipeline_parallel=p.pipeline_parallel, data_parallel=p.data_parallel,
        memory_gb=round(memory / GB, 2), context=p.max_model_len, max_context=min(capacity, spec.max_context),
        max_sequences=p.max_num_seqs, sequences_at_full_context=p.sequences_at_full_context,
        reason="" if fits else "; ".join(w for w in p.warnings if "does not fit" in w),
        command=p.serve_command() if fits else "")


def next_command(model: str, profile_name: str | None, gpus: GpuReport, host: Host,
                 installed: dict | None = None) -> str:
    """`dsr1 serve MODEL`, from the same plan serve runs. `--engine` only when the user must
    choose: the engine auto picks is not installed here and the other GPU engine is."""
    from dsr1 import plan as planner
    from dsr1.errors import Dsr1Error

    try:
        p = planner.make_plan(model, profile_name, planner.Overrides(engine_port=1), gpus=gpus, host=host,
                              installed=installed)
    except Dsr1Error:
        return f"dsr1 serve {model}"
    if p.engine in ("vllm", "sglang") and p.engine_version is None:
        other = "sglang" if p.engine == "vllm" else "vllm"
        if planner.installed_engine(other, None, installed) is not None:
            return f"dsr1 serve {model} --engine {other}"
    return p.serve_command()


def checks_for(gpus: GpuReport, host: Host, sw: Software, rec_default: Recommendation | None) -> list[Finding]:
    out = list(gpus.findings)
    if gpus.available:
        out.append(Finding("pass", "nvml", f"driver {gpus.driver_version}, supports CUDA {gpus.cuda_driver_version}, {len(gpus.gpus)} GPU(s)"))
        if sw.packages.get("torch") and not sw.torch_cuda and gpus.gpus:
            out.append(Finding("fail", "torch", "torch is a CPU build on a machine with GPUs",
                               "pip install torch --index-url https://download.pytorch.org/whl/cu124"))
        elif sw.torch_cuda and gpus.cuda_driver_version:
            if tuple(map(int, sw.torch_cuda.split(".")[:2])) > tuple(map(int, gpus.cuda_driver_version.split("."))):
                out.append(Finding("fail", "torch", f"torch is built for CUDA {sw.torch_cuda}, the driver supports only {gpus.cuda_driver_version}",
                                   "upgrade the NVIDIA driver or install a torch build for an older CUDA"))
    for g in gpus.gpus:
        tag = f"gpu{g.index}"
        if g.processes:
            used = sum(p.used_memory or 0 for p in g.processes) / GB
            out.append(Finding("warn", tag, f"GPU {g.index}: {len(g.processes)} process(es) already hold {used:.1f} GB",
                               "stop them, or plan with less memory (--max-memory)"))
        if g.ecc_uncorrected_errors:
            out.append(Finding("fail", tag, f"GPU {g.index}: {g.ecc_uncorrected_errors} uncorrected ECC errors", "reset the GPU; replace it if errors persist"))
        if g.mig_enabled:
            out.append(Finding("warn", tag, f"GPU {g.index}: MIG is enabled; only a slice is usable", "nvidia-smi -i %d -mig 0" % g.index))
        if g.pcie_width_max and g.pcie_width_current and g.pcie_width_current < g.pcie_width_max:
            out.append(Finding("warn", tag, f"GPU {g.index}: PCIe link runs x{g.pcie_width_current} of x{g.pcie_width_max}", "reseat the card or check the slot"))
        if g.fabric_state in ("not_started", "in_progress"):
            out.append(Finding("fail", tag, f"GPU {g.index}: NVSwitch fabric is {g.fabric_state}; CUDA will fail with error 802",
                               "start nvidia-fabricmanager: systemctl enable --now nvidia-fabricmanager"))
        if g.temperature_c is not None and g.temperature_c >= 85:
            out.append(Finding("warn", tag, f"GPU {g.index}: {g.temperature_c} C", "check cooling"))
    if len(gpus.gpus) > 1 and all(g.nvlink_active_links == 0 for g in gpus.gpus):
        out.append(Finding("warn", "nvlink", "no active NVLink: tensor parallel traffic goes over PCIe", "prefer pipeline parallel or fewer GPUs per model"))
    for port in host.infiniband:
        if port.state != "ACTIVE":
            out.append(Finding("warn", "infiniband", f"{port.device} port {port.port} is {port.state or 'unknown'}", "check the cable and the subnet manager (ibstat)"))
    if host.cgroup_limit and host.cgroup_limit < host.ram_total:
        out.append(Finding("info", "memory", f"container memory limit {host.cgroup_limit / GB:.1f} GB of {host.ram_total / GB:.1f} GB host RAM"))
    if host.shm_total is not None and host.shm_total < 1 << 30 and gpus.gpus:
        out.append(Finding("warn", "shm", f"/dev/shm is {host.shm_total / 2**20:.0f} MiB; multi-GPU engines need more", "docker run --shm-size 16g (or --ipc=host)"))
    if host.cpu_flags and not gpus.gpus:
        fast = "bf16 matmul units (" + ", ".join(f for f in host.cpu_flags if "bf16" in f) + ")" if host.bf16_fast else "no bf16 matmul units: fp32 is used"
        out.append(Finding("info", "cpu", f"{host.cpu_model}, {host.cores_physical} cores, {fast}"))
    if rec_default is not None:
        spec = catalog.get(rec_default.model)
        need = spec.hub_size_gb * GB
        level = "pass" if host.disk_free > need * 1.1 else "fail"
        out.append(Finding(level, "disk", f"{host.disk_free / GB:.0f} GB free at {host.store_path} ({host.disk_kind}); {spec.name} needs {spec.hub_size_gb:g} GB",
                           "" if level == "pass" else "free space or set DSR1_HOME / HF_HOME to a larger disk"))
    if host.disk_kind == "hdd":
        out.append(Finding("info", "disk", "the store is on a rotational disk (or a VM disk reported as one): model loads will be slow"))
    for pkg in ("torch", "transformers", "accelerate"):
        if not sw.packages.get(pkg):
            out.append(Finding("warn", "software", f"{pkg} is not installed; `dsr1 serve` needs it", f"pip install {pkg}"))
    return out


def run(profile_name: str | None = None, *, gpus: GpuReport | None = None, host: Host | None = None,
        software: Software | None = None, installed: dict | None = None) -> Report:
    """Probe (or take the given probes), select or check a profile, and recommend."""
    gpus = gpus if gpus is not None else probe_gpus()
    host = host if host is not None else probe_host(settings.home())
    software = software if software is not None else probe_software()
    machine = profiles.machine_from(gpus, host)
    all_profiles = profiles.load_all()
    selection = profiles.select(machine, all_profiles)
    rejected = [{"profile": name, "unmet": list(gaps)} for name, gaps in selection.rejected]
    if profile_name:
        profile = profiles.get(profile_name)
        source = "requested"
        gaps = profiles.unmet(profile.requires, machine)
    else:
        profile, source, gaps = selection.profile, "selected", []
    recs = [recommend(spec, profile_name, gpus, host, installed) for spec in catalog.models()]
    default = next((r for r in recs if r.model == profile.settings.default_model), None)
    if default is None or not default.fits:
        # The profile's default does not fit here: fall back to the largest model that does.
        fitting = [r for r in recs if r.fits and catalog.get(r.model).reasoning]
        fitting.sort(key=lambda r: catalog.get(r.model).params_b, reverse=True)
        default = fitting[0] if fitting else None
    checks = checks_for(gpus, host, software, default)
    virtual = bool(gaps) and profile.requires.gpus > len(gpus.gpus)  # planned on the profile's own hardware
    for gap in gaps:
        checks.append(Finding("info" if virtual else "fail", "profile", f"{profile.name}: {gap}",
                              "the rows below are planned for the profile's hardware, not this machine's" if virtual
                              else "run `dsr1 doctor` without --profile to see what this machine gets"))
    if virtual:
        source = "virtual"
    # A broken GPU driver is a failed check, yet the CPU can still serve: exit 0 means "something runs here"
    # (with a profile whose hardware this machine lacks: "something runs there").
    can_serve = any(r.fits for r in recs) and not any(c.level == "fail" and c.check == "profile" for c in checks)
    return Report(
        schema_version=SCHEMA_VERSION,
        machine=machine,
        profile=profile.name,
        profile_source=source,
        rejected_profiles=rejected,
        gpus=gpus,
        host=host,
        software=software,
        checks=checks,
        recommendations=recs,
        next_command=next_command(default.model, profile_name, gpus, host, installed) if default and can_serve else "",
        can_serve=can_serve,
        notes=list(profile.settings.notes),
    )
