"""Tuned profiles: the serve settings `dsr1 bench tune` found best for one model on one machine.

A tuned profile is a TOML file `DSR1_HOME/profiles/tuned-<model>-<hardware>.toml`, beside the
hardware profiles a user may drop there (dsr1.profiles skips `tuned-*` files). `dsr1 serve MODEL`
on the same hardware picks it up and applies its settings to every option the user did not
give on the command line, and says so at start (`--no-tuned` ignores it).

    # written by dsr1 bench tune on 2026-12-03T10:00:00+00:00
    model = "smollm2-135m-bf16"
    hardware = "cpu-2c-intel-xeon-processor"
    slo = "ttft_p99=2000ms,tpot_p99=100ms"
    goodput = 2.91           # requests/s meeting the SLO, with these settings
    default_goodput = 1.70   # the same with the engine's defaults, same run
    command = "dsr1 serve smollm2-135m-bf16 --engine embedded --max-concurrent 8"
    [settings]
    engine = "embedded"
    max_concurrent = 8

Kept out of dsr1.profiles because it answers another question: a hardware profile says what a
class of machines can run; a tuned profile records what was measured fastest on this one.
"""

from __future__ import annotations

import datetime as _dt
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsr1 import servesettings, settings
from dsr1.errors import ConfigError

PREFIX = "tuned-"
# The serve settings a tuned profile may set, with their types and allowed values: declared in
# dsr1.servesettings (`tunable`); the CLI flag is --name-with-dashes.
SETTINGS: dict[str, type] = {s.name: s.base_type for s in servesettings.SETTINGS if s.tunable}
CHOICES = {s.name: s.choices for s in servesettings.SETTINGS if s.tunable and s.choices}


@dataclass(frozen=True)
class Tuned:
    model: str
    hardware: str
    settings: dict[str, Any]
    slo: str = ""
    goodput: float = 0.0
    default_goodput: float = 0.0
    command: str = ""
    created: str = ""
    path: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def flags(self) -> list[str]:
        """The settings as `dsr1 serve` flags (what the report's reproduce command shows)."""
        out = []
        for key, value in self.settings.items():
            out += [f"--{key.replace('_', '-')}", str(value)]
        return out


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "unknown"


def model_slug(model: str) -> str:
    """A stored name as is; a directory or file by its last path component."""
    p = Path(model).expanduser()
    return _slug(p.name if (p.exists() or "/" in model) else model)


def hardware_id() -> str:
    """What makes two machines comparable for tuning: the GPUs (count and model) or, without one,
    the CPU model and core count. NVML and /proc only: cheap, no torch."""
    import os

    from dsr1.probe.gpu import probe_gpus
    from dsr1.probe.host import cpu_info

    gpus = probe_gpus().gpus
    if gpus:
        names = sorted({g.name for g in gpus})
        return _slug(f"{len(gpus)}x-{'-'.join(names)}")
    return _slug(f"cpu-{os.cpu_count()}c-{cpu_info()[0]}")


def path_for(model: str, hardware: str | None = None, home: Path | None = None) -> Path:
    base = (home / "profiles") if home else settings.user_profiles_dir()
    return base / f"{PREFIX}{model_slug(model)}-{hardware or hardware_id()}.toml"


def validate(data: dict[str, Any], where: str) -> Tuned:
    """A tuned profile from parsed TOML, or ConfigError naming what is wrong and where."""
    for key in ("model", "hardware", "settings"):
        if key not in data:
            raise ConfigError(f"{where}: tuned profile lacks `{key}`", hint="re-run `dsr1 bench tune`, or delete the file")
    values = dict(data["settings"])
    for key, value in values.items():
        kind = SETTINGS.get(key)
        if kind is None:
            raise ConfigError(f"{where}: settings.{key} is not a setting a tuned profile can hold",
                              hint=f"known: {', '.join(SETTINGS)}")
        if kind is float and isinstance(value, int):
            value = values[key] = float(value)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ConfigError(f"{where}: settings.{key} must be a {kind.__name__}, not {value!r}")
        if key in CHOICES and value not in CHOICES[key]:
            raise ConfigError(f"{where}: settings.{key} {value!r} is not one of {', '.join(CHOICES[key])}")
        if kind is int and value < 1:
            raise ConfigError(f"{where}: settings.{key} must be at least 1")
    known = {"model", "hardware", "settings", "slo", "goodput", "default_goodput", "command", "created"}
    return Tuned(model=str(data["model"]), hardware=str(data["hardware"]), settings=values,
                 slo=str(data.get("slo", "")), goodput=float(data.get("goodput", 0.0)),
                 default_goodput=float(data.get("default_goodput", 0.0)), command=str(data.get("command", "")),
                 created=str(data.get("created", "")), path=where,
                 extra={k: v for k, v in data.items() if k not in known})


def load(path: Path) -> Tuned:
    from dsr1.datafile import read_toml

    return validate(read_toml(path), str(path))


def find(model: str, hardware: str | None = None) -> Tuned | None:
    """The tuned profile for `model` on this hardware, if `dsr1 bench tune` wrote one."""
    path = path_for(model, hardware)
    return load(path) if path.is_file() else None


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write(t: Tuned, path: Path) -> Path:
    """Atomically, so a crash never leaves a half-written profile that serve would then read."""
    from dsr1.fsutil import atomic_write_bytes

    created = t.created or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    lines = [f"# written by `dsr1 bench tune` on {created}; `dsr1 serve {t.model}` on this hardware uses it",
             f"# (flags given on the command line win; --no-tuned ignores it). Report: {path.with_suffix('')}/",
             f"model = {_toml_value(t.model)}", f"hardware = {_toml_value(t.hardware)}",
             f"created = {_toml_value(created)}", f"slo = {_toml_value(t.slo)}",
             f"goodput = {round(t.goodput, 4)!r}", f"default_goodput = {round(t.default_goodput, 4)!r}",
             f"command = {_toml_value(t.command)}", "", "[settings]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in t.settings.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    load(path)  # what serve will read must validate
    return path
