"""The deployment plan (dsr1.plan): engine choice, sizing, environment, and its faces
(`dsr1 serve --dry-run/--emit`, doctor's Next line, pull's quantization, dsr1.Deployer)."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from dsr1 import doctor, plan
from dsr1.engines import envs
from dsr1.engines.envs import InstalledEngine
from dsr1.errors import HardwareError, UsageError
from dsr1.netenv import Interface
from tests.fake_nvml import load_snapshot
from tests.hardware import probes_for

REPO = Path(__file__).resolve().parent.parent
HELP = (Path(__file__).parent / "data" / "vllm-0.32.0-help.txt").read_text()
VLLM_CPU = InstalledEngine("vllm", "0.32.0", python="/opt/vllm/bin/python", binary=None, location="/opt/vllm",
                           origin="dsr1")


@pytest.fixture(autouse=True)
def recorded_help(monkeypatch):
    monkeypatch.setattr(envs, "help_text", lambda eng: HELP if eng.name == "vllm" else "")


def make(snapshot, model="r1-distill-qwen-7b", tmp_path=None, *, installed=None, snap=None, profile=None, **kw):
    gpus, host, _ = probes_for(snapshot, tmp_path, snap)
    return plan.make_plan(model, profile, plan.Overrides(engine_port=8100, **kw), gpus=gpus, host=host,
                          installed=installed or {}, interfaces=[Interface("eth0", (("10.0.0.2", "255.255.255.0"),))])


# --- how auto chooses ----------------------------------------------------------------------------

@pytest.mark.parametrize("snapshot,model,engine", [
    ("h100x8-ib", "r1", "sglang"),                    # R1 671B: SGLang, as DeepSeek recommends
    ("h100x8-ib", "r1-distill-llama-70b", "sglang"),  # the enterprise profile's engine
    ("h100x4-sxm", "r1-distill-llama-70b", "vllm"),   # pro
    ("a100x2-sxm", "r1-distill-qwen-32b", "vllm"),    # base
    ("rtx4090", "r1-distill-qwen-7b", "embedded"),    # single-gpu
    ("driver-missing", "r1-distill-qwen-1.5b", "embedded"),  # cpu, no vLLM installed
])
def test_auto_engine_by_profile_and_model(snapshot, model, engine, tmp_path):
    p = make(snapshot, model, tmp_path)
    assert p.engine == engine and p.engine_reason.startswith("auto:")


@pytest.mark.parametrize("flags", [["avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"],
                                   ["avx2", "avx512f", "avx512_bf16"], ["avx2"]])
@pytest.mark.parametrize("seqs", [1, 16])
@pytest.mark.parametrize("model", ["smollm2-135m", "r1-distill-qwen-1.5b"])
def test_auto_on_a_cpu_picks_the_engine_measured_fastest_on_its_class(flags, seqs, model, tmp_path):
    """With vLLM's CPU build installed, auto picks by dsr1/data/engine_speed.toml for this CPU class,
    the measured model nearest in size and the concurrency, and says the figures; a class nothing was
    measured on keeps the embedded engine."""
    from dsr1 import catalog, engine_speed

    snap = load_snapshot("driver-missing")
    snap["host"]["flags"] = flags
    p = make("driver-missing", model, tmp_path, installed={"vllm": VLLM_CPU}, snap=snap, max_concurrent=seqs)
    here = [r for r in engine_speed.rows() if r.cpu_class == engine_speed.cpu_class(flags)]
    size = min({r.model_params_b for r in here}, key=lambda b: abs(b - catalog.get(model).params_b), default=None)
    rows = {r.engine: r.at(seqs) for r in here if r.model_params_b == size}
    if set(rows) >= {"embedded", "vllm"}:
        assert p.engine == max(rows, key=rows.get), p.engine_reason
        assert all(f"{e} {v:g}" in p.engine_reason for e, v in rows.items()), p.engine_reason
    else:
        assert p.engine == "embedded" and "not measured on this CPU class" in p.engine_reason


def test_vllm_cpu_command(tmp_path):
    p = make("driver-missing", "smollm2-135m", tmp_path, installed={"vllm": VLLM_CPU}, engine="vllm")
    assert p.engine == "vllm" and p.device == "cpu" and "0.32.0" == p.engine_version
    assert p.env["VLLM_CPU_OMP_THREADS_BIND"] == "0-31"  # every core of the 32-core host: no core held back
    kv_gib = int(p.env["VLLM_CPU_KVCACHE_SPACE"])
    assert kv_gib >= 1 and kv_gib * 2**30 >= p.max_model_len * p.kv_bytes_per_token
    argv = p.nodes[0].argv
    assert argv[:3] == ("/opt/vllm/bin/python", "-m", "vllm.entrypoints.launchers.api_server.entry")
    assert "--gpu-memory-utilization" not in argv and argv[argv.index("--dtype") + 1] == "float32"  # no bf16 units
    assert p.checked_against == "vllm 0.32.0 --help"


def test_tiny_head_size_keeps_the_embedded_engine(tmp_path):
    model = tmp_path / "tiny"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
                                                   "num_attention_heads": 8, "num_key_value_heads": 2,
                                                   "intermediate_size": 128, "vocab_size": 1000}))
    p = make("driver-missing", str(model), tmp_path, installed={"vllm": VLLM_CPU})
    assert p.engine == "embedded" and "head size 8" in p.engine_reason


def test_gguf_is_served_by_llama_server(demo_gguf, tmp_path):
    p = make("driver-missing", str(demo_gguf), tmp_path)
    assert p.engine == "llamacpp" and p.model_kind == "gguf" and p.precision == "gguf"
    argv = p.nodes[0].argv
    assert argv[0] == "llama-server" and argv[argv.index("-m") + 1] == str(demo_gguf)
    slots, ctx = int(argv[argv.index("-np") + 1]), int(argv[argv.index("-c") + 1])
    assert slots == p.max_num_seqs and ctx == p.max_model_len * slots  # -c is shared by the -np slots
    assert argv[argv.index("-t") + 1] == "32" and "--jinja" in argv and "--metrics" in argv
    assert p.max_model_len <= 8192  # SmolLM2's trained context (GGUF header)
    with pytest.raises(UsageError, match="serves GGUF files"):
        make("driver-missing", "r1-distill-qwen-1.5b", tmp_path, engine="llamacpp")


# --- sizing ----------------------------------------------------------------------------------------

def test_context_is_fitted_to_the_kv_budget(tmp_path):
    p = make("h100x4-sxm", "r1-distill-llama-70b", tmp_path)
    assert p.max_model_len == 65536 <= p.kv_capacity_tokens  # pro's context fits TP=4
    kv = p.kv_bytes_per_token * p.max_model_len
    assert kv <= p.kv_budget_bytes and p.sequences_at_full_context == p.kv_capacity_tokens // 65536
    # Asking for the model's full 128K on 2x A100 (32B in bf16): refused with the number that fits.
    with pytest.raises(HardwareError) as e:
        make("a100x2-sxm", "r1-distill-qwen-32b", tmp_path, max_model_len=131072, tensor_parallel=1, precision="bf16")
    hint = e.value.hint
    fits = int(hint.split("--max-model-len ")[1].split()[0])
    assert 0 < fits < 131072
    ok = make("a100x2-sxm", "r1-distill-qwen-32b", tmp_path, max_model_len=fits, tensor_parallel=1, precision="bf16")
    assert ok.max_model_len == fits


def test_default_context_is_lowered_not_refused(tmp_path):
    p = make("a100x2-sxm", "r1-distill-qwen-32b", tmp_path, tensor_parallel=1, precision="bf16")
    assert p.max_model_len < 32768 and any("context lowered" in n for n in p.notes)


def test_small_models_become_data_parallel_replicas(tmp_path):
    p = make("h100x8-ib", "r1-distill-qwen-7b", tmp_path, engine="vllm")
    assert (p.tensor_parallel, p.data_parallel) == (1, 8)
    forced = make("h100x8-ib", "r1-distill-qwen-7b", tmp_path, engine="vllm", tensor_parallel=4)
    assert (forced.tensor_parallel, forced.data_parallel) == (4, 2)  # 28 heads: TP must divide them


def test_utilization_is_lowered_when_other_processes_hold_gpu_memory(tmp_path):
    snap = load_snapshot("a100x2-sxm")
    g = snap["nvml"]["gpus"][1]
    g["processes"] = [[4242, 20 * 10**9]]
    g["memory_free"] = g["memory_total"] - 20 * 10**9
    p = make("a100x2-sxm", "r1-distill-qwen-32b", tmp_path, snap=snap)
    assert p.memory_utilization == int((g["memory_free"] / g["memory_total"] - 0.02) * 100) / 100 < 0.9
    assert "other processes hold" in p.memory_utilization_reason
    assert p.nodes[0].argv[p.nodes[0].argv.index("--gpu-memory-utilization") + 1] == f"{p.memory_utilization:g}"


def test_embedded_plan_never_refuses_what_serve_would_measure(tmp_path):
    p = make("driver-missing", "r1-distill-qwen-1.5b", tmp_path, max_model_len=10**6)
    assert p.engine == "embedded" and p.checked_against == "dsr1 (in process)"
    assert p.nodes[0].argv[1:5] == ("-m", "dsr1", "serve", "r1-distill-qwen-1.5b")


@pytest.mark.parametrize("kw,words", [
    (dict(nodes=2), "--head"), (dict(nodes=2, head="10.0.0.1"), "HOST:PORT"),
    (dict(nodes=2, node_rank=2, head="10.0.0.1:29500"), "--node-rank 2"), (dict(engine="tgi"), "--engine"),
    (dict(precision="fp4"), "unknown precision"), (dict(tensor_parallel=0), "--tensor-parallel"),
])
def test_bad_flags_are_usage_errors(kw, words, tmp_path):
    with pytest.raises(UsageError, match=words):
        make("h100x8-ib", "r1", tmp_path, **kw)


def test_one_node_model_on_two_nodes_is_warned(tmp_path):
    p = make("h100x8-ib", "r1-distill-qwen-7b", tmp_path, engine="vllm", nodes=2, head="10.0.0.1:29500")
    assert any("fits on one node" in w for w in p.warnings)
    assert p.env["NCCL_SOCKET_IFNAME"] == "eth0"  # the interface on the head's subnet


# --- doctor, pull and serve agree ----------------------------------------------------------------------

@pytest.mark.parametrize("snapshot,line", [
    ("a100x2-sxm", "dsr1 serve r1-distill-qwen-32b"), ("h100x4-sxm", "dsr1 serve r1-distill-llama-70b"),
    ("h100x8-ib", "dsr1 serve r1"), ("rtx4090", "dsr1 serve r1-distill-qwen-7b"),
    ("driver-missing", "dsr1 serve r1-distill-qwen-1.5b"),
])
def test_doctor_next_line_is_dsr1_serve(snapshot, line, tmp_path):
    gpus, host, sw = probes_for(snapshot, tmp_path)
    assert doctor.run(gpus=gpus, host=host, software=sw, installed={}).next_command == line


def test_doctor_names_the_engine_only_when_the_user_must_choose(tmp_path):
    """base runs vLLM; with only SGLang installed, Next says so."""
    gpus, host, sw = probes_for("a100x2-sxm", tmp_path)
    sglang = InstalledEngine("sglang", "0.5.23", "/opt/sglang/bin/python", None, "/opt/sglang", "path")
    report = doctor.run(gpus=gpus, host=host, software=sw, installed={"sglang": sglang})
    assert report.next_command == "dsr1 serve r1-distill-qwen-32b --engine sglang"


def test_pull_quantizes_what_the_plan_says(tmp_path):
    from dsr1.pull import resolve_quant

    assert resolve_quant(None, "single-gpu", "r1-distill-qwen-14b") == ("int8", "profile")  # embedded, 24 GB
    assert resolve_quant(None, "base", "r1-distill-llama-70b") == ("none", "profile")  # vLLM loads AWQ, not bnb


def _dsr1(*args, env=None):
    e = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "dsr1", *args], capture_output=True, text=True, env=e, timeout=120)


def test_serve_dry_run_json_runs_nothing():
    res = _dsr1("serve", "r1-distill-qwen-1.5b", "--dry-run", "--json", "--port", "9123")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["engine"] == "embedded" and data["profile"] == "cpu" and data["port"] == 9123
    assert data["needs_pull"] is True and data["reasoning_parser"] == "deepseek_r1"
    assert data["nodes"][0]["argv"][3:5] == ["serve", "r1-distill-qwen-1.5b"]
    for key in ("served_name", "max_model_len", "max_num_seqs", "engine_port", "checked_against", "env"):
        assert key in data


def test_serve_dry_run_plans_a_cluster_from_here():
    res = _dsr1("serve", "r1", "--profile", "enterprise", "--nodes", "2", "--head", "10.0.0.1:29500",
                "--engine", "vllm", "--dry-run", "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["checked_against"] is None and data["profile_source"] == "virtual"
    assert [n["argv"][-1] for n in data["nodes"]] == [str(data["engine_port"]), "--headless"]
    human = _dsr1("serve", "r1", "--profile", "enterprise", "--nodes", "2", "--head", "10.0.0.1:29500", "--dry-run")
    assert human.returncode == 0 and "node 1 (worker)" in human.stdout and "--dist-init-addr 10.0.0.1:29500" in human.stdout


def test_serve_emit_writes_one_executable_script_per_node(tmp_path):
    out = tmp_path / "launch"
    res = _dsr1("serve", "r1", "--profile", "enterprise", "--nodes", "2", "--head", "10.0.0.1:29500", "--emit", str(out))
    assert res.returncode == 0, res.stderr
    scripts = sorted(out.iterdir())
    assert [s.name for s in scripts] == ["node-0.sh", "node-1.sh"]
    for s in scripts:
        assert s.stat().st_mode & stat.S_IXUSR
        text = s.read_text()
        assert text.startswith("#!/bin/sh") and "\n#   python3 -m sglang.launch_server " in text
        # no GPU engine was checked here: the node installs SGLang's GPU build, then dsr1 serve runs the
        # engine (and on the head dsr1's front) with the plan spelt out
        assert "\ndsr1 engine install sglang --device cuda\n" in text
        assert "\nexec dsr1 serve r1 --profile enterprise --engine sglang " in text
    assert "--node-rank 1" in scripts[1].read_text() and "--node-rank 0" in scripts[0].read_text()
    check = subprocess.run(["sh", "-n", str(scripts[0])], capture_output=True)
    assert check.returncode == 0


def test_deployer_is_the_plan_and_importing_dsr1_stays_light():
    code = ("import sys, dsr1\nassert 'dsr1.api' not in sys.modules\nfrom dsr1 import Deployer\n"
            "d = Deployer('r1-distill-qwen-7b', precision='bf16', device_map='auto')\np = d.plan(port=8123)\n"
            "print(p.engine, p.precision, p.port, p.served_name)\n"
            "print([m for m in ('torch', 'transformers') if m in sys.modules])\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n")[:2] == ["embedded bf16 8123 r1-distill-qwen-7b", "[]"]


def test_engine_docs_show_the_commands_dsr1_generates():
    """docs/engines.md and docs/multi-node.md carry generated blocks: regenerate, never hand-edit."""
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "engine_docs.py"), "--check"], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr


@pytest.mark.slow
def test_deployer_serves_the_demo_model_and_drains_on_sigterm(demo_model_dir, tmp_path):
    """The seed's example, end to end: plan, serve, answer, SIGTERM drains, exit 0."""
    import signal
    import urllib.request

    code = ("import sys\nfrom dsr1 import Deployer\n"
            f"d = Deployer({str(demo_model_dir)!r}, precision='bf16', device_map='auto')\n"
            "print('PLAN', d.plan().engine, flush=True)\n"
            "d.serve(port=0, max_concurrent=16, stream_interval=1, on_ready=lambda u: print('READY', u, flush=True))\n"
            "print('STOPPED', flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("READY "):
                break
        assert lines[0].strip() == "PLAN embedded" and lines[-1].startswith("READY "), lines + [proc.stderr.read()]
        url = lines[-1].split()[1]
        with urllib.request.urlopen(url + "/health", timeout=10) as r:
            assert r.status == 200
        body = json.dumps({"model": demo_model_dir.name, "max_tokens": 4,
                           "messages": [{"role": "user", "content": "Hi"}]}).encode()
        req = urllib.request.Request(url + "/v1/chat/completions", body, {"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            assert json.loads(r.read())["usage"]["completion_tokens"] >= 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0 and "STOPPED" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_batch_tokens_and_threads_reach_each_engine(demo_gguf, tmp_path):
    """--max-batched-tokens and --threads (what `dsr1 bench tune` varies) land in each engine's own flag."""
    v = make("driver-missing", "smollm2-135m", tmp_path, installed={"vllm": VLLM_CPU}, max_batched_tokens=2048,
             engine="vllm")
    argv = v.nodes[0].argv
    assert v.engine == "vllm" and argv[argv.index("--max-num-batched-tokens") + 1] == "2048"
    assert "--max-num-batched-tokens" not in make("driver-missing", "smollm2-135m", tmp_path, engine="vllm",
                                                  installed={"vllm": VLLM_CPU}).nodes[0].argv  # engine default
    g = make("driver-missing", str(demo_gguf), tmp_path, max_batched_tokens=4096, threads=3).nodes[0].argv
    assert g[g.index("-b") + 1] == "4096" and g[g.index("-t") + 1] == "3"
    s = make("h100x8-ib", "r1-distill-llama-70b", tmp_path, max_batched_tokens=8192)
    assert s.engine == "sglang" and s.nodes[0].argv[s.nodes[0].argv.index("--chunked-prefill-size") + 1] == "8192"
    with pytest.raises(UsageError, match="--max-batched-tokens must be at least 1"):
        make("driver-missing", "smollm2-135m", tmp_path, max_batched_tokens=0)


def test_serve_flags_reach_the_engine_or_are_refused_the_same_in_dry_run_and_check_only():
    """--reasoning-parser and --dtype reach vLLM/SGLang; bad values and flags the engine cannot honour are
    usage errors (exit 2) without a traceback, whether the run is a dry run, a node check or real."""
    base = ("serve", "r1-distill-qwen-7b", "--profile", "base", "--engine", "vllm")
    ok = _dsr1(*base, "--dry-run", "--json", "--reasoning-parser", "none", "--dtype", "fp16")
    assert ok.returncode == 0, ok.stderr
    argv = json.loads(ok.stdout)["nodes"][0]["argv"]
    assert "--reasoning-parser" not in argv and argv[argv.index("--dtype") + 1] == "float16"
    sg = _dsr1("serve", "r1-distill-qwen-7b", "--profile", "base", "--engine", "sglang", "--dry-run", "--json",
               "--dtype", "bf16")
    assert sg.returncode == 0, sg.stderr
    sg_argv = json.loads(sg.stdout)["nodes"][0]["argv"]
    assert sg_argv[sg_argv.index("--dtype") + 1] == "bfloat16" and "--reasoning-parser" in sg_argv
    for extra, needle in ((["--dtype", "foo"], "--dtype 'foo'"), (["--port", "99999"], "--port 99999"),
                          (["--reasoning-parser", "r2"], "--reasoning-parser 'r2'"),
                          (["--compile", "on"], "--compile on"), (["--dtype", "fp32"], "--dtype fp32")):
        for mode in ("--dry-run", "--check-only"):
            res = _dsr1(*base, mode, *extra)
            assert res.returncode == 2, (extra, mode, res.stderr)
            assert needle in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_compile_on_steers_auto_to_the_embedded_engine(tmp_path):
    res = _dsr1("serve", "r1-distill-qwen-1.5b", "--dry-run", "--json", "--compile", "on",
                env={"DSR1_HOME": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["engine"] == "embedded" and "--compile on" in data["engine_reason"]


def test_gpu_plan_never_launches_the_cpu_build_and_advice_converges():
    """A CPU build of vLLM installed here is not what a GPU plan runs; R1 on the base tier is refused with
    the node count that fits, and that count plans."""
    res = _dsr1("serve", "r1", "--profile", "base", "--engine", "vllm", "--dry-run")
    assert res.returncode == 5, res.stderr
    m = re.search(r"(\d+) such nodes hold it at int4 \(cognitivecomputations/DeepSeek-R1-AWQ\): --nodes (\d+)", res.stderr)
    assert m and m.group(1) == m.group(2), res.stderr
    assert "80 GiB GPU" in res.stderr and "4-bit checkpoint" not in res.stderr
    n = m.group(1)
    # with the engines CI installs (vLLM's CPU build) as this machine's engines, when they are there
    home = os.environ.get("DSR1_TEST_ENGINES_HOME")
    again = _dsr1("serve", "r1", "--profile", "base", "--engine", "vllm", "--nodes", n, "--head", "10.0.0.1:29500",
                  "--dry-run", "--json", env={"DSR1_HOME": home} if home else None)
    assert again.returncode == 0, again.stderr
    data = json.loads(again.stdout)
    assert data["precision"] == "int4" and data["checkpoint"] == "cognitivecomputations/DeepSeek-R1-AWQ"
    assert data["nodes_count"] == int(n) and "--device cuda" in " ".join(data["warnings"])
    assert data["checked_against"] is None and not any("engines/vllm" in a for node in data["nodes"] for a in node["argv"])
    if home and (Path(home) / "engines" / "vllm").is_dir():
        assert "CPU build" in data["engine_reason"], data["engine_reason"]


def test_embedded_dry_run_is_what_the_server_runs(demo_model_dir, tmp_path):
    """`dsr1 serve MODEL --engine embedded --dry-run --json` against the server's own start report, field by
    field, on the demo model: the plan decides the embedded engine's settings, the server runs them and
    measures nothing differently (its `measured` is empty). Before the first start the dtype is planned as
    timed at start; that start caches the timing and the next plan states the timed dtype."""
    from tests.serve_util import ServerProc

    home = tmp_path / "home"
    args = [str(demo_model_dir), "--engine", "embedded", "--max-concurrent", "4"]
    first = _dsr1("serve", *args, "--dry-run", "--json", env={"DSR1_HOME": str(home)})
    assert first.returncode == 0, first.stderr
    before = json.loads(first.stdout)
    srv = ServerProc(args + ["--json"], home)
    try:
        event = json.loads(srv.proc.stdout.readline())
    finally:
        assert srv.stop() == 0
    assert event["event"] == "ready"
    ran = event["plan"]
    dry = json.loads(_dsr1("serve", *args, "--dry-run", "--json", env={"DSR1_HOME": str(home)}).stdout)
    if before["dtype"] == "measure":  # no timing cached in the fresh home: timed at start, then planned
        assert ran["measured"] == {"dtype": ran["dtype"]} and dry["dtype"] == ran["dtype"]
    else:
        assert ran["measured"] == {}
    assert dry["dtype"] == ran["dtype"] and dry["dtype_reason"].startswith("cached measurement")
    pairs = {"max_model_len": "max_model_len", "max_num_seqs": "max_concurrent", "max_queue": "max_queue",
             "kv_bytes_per_token": "kv_bytes_per_token", "reasoning_parser": "reasoning_parser",
             "prefix_cache_bytes": "prefix_cache_bytes", "served_name": "served_name", "profile": "profile"}
    for planned, run in pairs.items():
        assert dry[planned] == ran[run], (planned, dry[planned], ran[run])
    assert dry["compile"] == (ran["forward"] == "compiled")
    assert (dry["fast_path_reason"] is None) == (ran["forward"] in ("fast", "compiled"))
    # the slot cache allocates one spare column per row (dsr1.serve.kvcache: the compiled step's layout)
    assert ran["kv_cache_bytes"] == dry["kv_bytes_per_token"] * dry["max_num_seqs"] * (dry["max_model_len"] + 1)


def test_a_setting_the_engine_cannot_honour_is_refused_or_steers_auto(tmp_path):
    """dsr1.honoured: an embedded-only setting with an external engine is a usage error (dry run included);
    with --engine auto it picks the embedded engine; an environment default asks nothing."""
    home = {"DSR1_HOME": str(tmp_path)}
    bad = _dsr1("serve", "smollm2-135m", "--engine", "vllm", "--speculative", "ngram", "--dry-run", env=home)
    assert bad.returncode == 2 and "--speculative cannot be honoured by vllm" in bad.stderr, bad.stderr
    tp = _dsr1("serve", "smollm2-135m", "--engine", "embedded", "--tensor-parallel-size", "2", "--dry-run", env=home)
    assert tp.returncode == 2 and "--tensor-parallel cannot be honoured by embedded" in tp.stderr, tp.stderr
    auto = _dsr1("serve", "smollm2-135m", "--prefix-cache-mb", "64", "--dry-run", "--json", env=home)
    assert auto.returncode == 0, auto.stderr
    d = json.loads(auto.stdout)
    assert d["engine"] == "embedded" and "--prefix-cache-mb" in d["engine_reason"]
    assert d["prefix_cache_bytes"] == 64 * 2**20
    env = _dsr1("serve", "smollm2-135m", "--engine", "embedded", "--dry-run",
                env={**home, "DSR1_ENGINE_PYTHON": "/opt/vllm/bin/python"})
    assert env.returncode == 0, env.stderr
