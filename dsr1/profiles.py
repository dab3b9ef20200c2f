"""Hardware profiles: data in profiles/*.toml, loaded into frozen dataclasses.

Each profile carries its own hardware requirements, so the rules that pick a
profile live with the data; `select()` only applies them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from dsr1.datafile import build, read_toml
from dsr1.errors import ConfigError, NotFoundError
from dsr1 import settings

if TYPE_CHECKING:
    from dsr1.probe.gpu import GpuReport
    from dsr1.probe.host import Host

ENGINES = ("embedded", "vllm", "sglang")
OFFLOADS = ("none", "cpu", "disk")


@dataclass(frozen=True)
class Requirements:
    gpus: int = 0
    gpu_memory_gb: float = 0.0  # per GPU, at least
    compute_capability: float = 0.0
    nvlink_gbps: float = 0.0  # per GPU, both directions
    infiniband: bool = False
    ram_gb: float = 0.0


@dataclass(frozen=True)
class Settings:
    default_model: str
    precision: str
    engine: str
    tensor_parallel: int
    pipeline_parallel: int
    max_concurrent: int
    context_length: int
    offload: str
    memory_utilization: float
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Profile:
    name: str
    rank: int
    description: str
    requires: Requirements
    settings: Settings
    path: str = ""


@dataclass(frozen=True)
class Machine:
    """What profile selection needs to know about a machine (built from doctor's probe)."""

    gpus: int
    gpu_memory_gb: float  # smallest GPU
    compute_capability: float  # lowest
    nvlink_gbps: float  # lowest per-GPU NVLink bandwidth
    infiniband: bool  # an ACTIVE InfiniBand port
    ram_gb: float


def shipped_dir() -> Path:
    here = Path(__file__).parent
    packaged = here / "_profiles"  # wheels carry profiles/ here (pyproject force-include)
    return packaged if packaged.is_dir() else here.parent / "profiles"


def _validate(p: Profile, where: str) -> Profile:
    from dsr1 import catalog, fit

    s = p.settings
    if s.engine not in ENGINES:
        raise ConfigError(f"{where}: settings.engine '{s.engine}' is not one of {', '.join(ENGINES)}")
    if s.offload not in OFFLOADS:
        raise ConfigError(f"{where}: settings.offload '{s.offload}' is not one of {', '.join(OFFLOADS)}")
    if s.precision not in fit.PRECISIONS:
        raise ConfigError(f"{where}: settings.precision '{s.precision}' is not one of {', '.join(fit.PRECISIONS)}")
    if catalog.find(s.default_model) is None:
        raise ConfigError(f"{where}: settings.default_model '{s.default_model}' is not in the catalog (`dsr1 models`)")
    if not 0.1 <= s.memory_utilization <= 1.0:
        raise ConfigError(f"{where}: settings.memory_utilization must be between 0.1 and 1.0")
    for key in ("tensor_parallel", "pipeline_parallel", "max_concurrent", "context_length"):
        if getattr(s, key) < 1:
            raise ConfigError(f"{where}: settings.{key} must be at least 1")
    return p


def load_file(path: Path) -> Profile:
    data = read_toml(path)
    where = str(path)
    profile = build(Profile, {**data, "path": where}, where)
    return _validate(profile, where)


def _files(dirs: Iterable[Path]) -> list[Path]:
    # tuned-*.toml beside the user's profiles are `dsr1 bench tune`'s results (dsr1.tuned), not hardware profiles
    return [f for d in dirs if d.is_dir() for f in sorted(d.glob("*.toml")) if not f.name.startswith("tuned-")]


def load_all() -> dict[str, Profile]:
    """Shipped profiles, then the user's (DSR1_HOME/profiles/*.toml) which may override by name."""
    out: dict[str, Profile] = {}
    for path in _files([shipped_dir(), settings.user_profiles_dir()]):
        p = load_file(path)
        out[p.name] = p
    return out


def get(name_or_path: str) -> Profile:
    """A profile by name, or a path to a profile file (`--profile PATH`)."""
    path = Path(name_or_path).expanduser()
    if name_or_path.endswith(".toml") or path.is_file():
        if not path.is_file():
            raise NotFoundError(f"profile file {path} does not exist")
        return load_file(path)
    profiles = load_all()
    if name_or_path not in profiles:
        raise NotFoundError(f"unknown profile '{name_or_path}'", hint=f"choose one of {', '.join(sorted(profiles, key=lambda n: profiles[n].rank))}, or pass a .toml path")
    return profiles[name_or_path]


def unmet(req: Requirements, m: Machine) -> list[str]:
    """Each requirement the machine misses, as a sentence (empty = all met)."""
    gaps = []
    if m.gpus < req.gpus:
        gaps.append(f"needs {req.gpus} GPU{'s' if req.gpus != 1 else ''}; found {m.gpus}")
    elif req.gpus:
        if m.gpu_memory_gb + 0.5 < req.gpu_memory_gb * 0.98:  # "80 GB" cards report 79.6 GiB
            gaps.append(f"needs {req.gpu_memory_gb:g} GB per GPU; smallest has {m.gpu_memory_gb:.0f} GB")
        if m.compute_capability < req.compute_capability:
            gaps.append(f"needs compute capability {req.compute_capability:g}; found {m.compute_capability:g}")
        if m.nvlink_gbps < req.nvlink_gbps:
            gaps.append(f"needs NVLink >= {req.nvlink_gbps:g} GB/s per GPU; found {m.nvlink_gbps:g} GB/s")
    if req.infiniband and not m.infiniband:
        gaps.append("needs an active InfiniBand port; found none")
    if m.ram_gb < req.ram_gb * 0.95:
        gaps.append(f"needs {req.ram_gb:g} GB RAM; found {m.ram_gb:.0f} GB")
    return gaps


@dataclass(frozen=True)
class Selection:
    profile: Profile
    rejected: tuple[tuple[str, tuple[str, ...]], ...]  # higher-ranked profiles and why not


def select(machine: Machine, profiles: dict[str, Profile] | None = None) -> Selection:
    """The highest-ranked profile whose requirements the machine meets, and why
    each higher one was not chosen."""
    ranked = sorted((profiles or load_all()).values(), key=lambda p: -p.rank)
    rejected = []
    for p in ranked:
        gaps = unmet(p.requires, machine)
        if not gaps:
            return Selection(p, tuple(rejected))
        rejected.append((p.name, tuple(gaps)))
    raise NotFoundError("no profile matches this machine", hint="add a profile with lower requirements under " + str(settings.user_profiles_dir()))


def machine_from(gpus: "GpuReport", host: "Host") -> Machine:
    """The facts a profile's requirements are checked against, from the probes."""
    devs = gpus.gpus
    ccs = [float(g.compute_capability) for g in devs if g.compute_capability]
    return Machine(
        gpus=len(devs),
        gpu_memory_gb=min((g.memory_total for g in devs), default=0) / 1e9,
        compute_capability=min(ccs, default=0.0),
        nvlink_gbps=min((g.nvlink_bandwidth_gbps for g in devs), default=0.0),
        infiniband=any(p.state == "ACTIVE" and p.link_layer == "InfiniBand" for p in host.infiniband),
        ram_gb=host.usable_ram / 1e9,
    )
